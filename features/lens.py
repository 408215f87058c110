"""What a feature's decoder direction says on its own, without any corpus.

  logit lens   the direction through the model's final norm weight and unembedding: the tokens it
               makes more and less likely (the norm's 1/rms factor does not change the ranking).
  neighbours   the features whose decoder directions are closest by cosine.

Both work in chunks of features, so 65,536 features never need a [features x vocab] or a
[features x features] matrix at once.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def logit_lens(w_dec: torch.Tensor, model, n: int, chunk: int = 1024):
    """(top values, top ids, bottom values, bottom ids), each [features, n], or None when the
    site's width is not the model's (a concatenation of hyper-connection streams)."""
    unembed = model.get_output_embeddings().weight  # [vocab, d_model]
    if w_dec.shape[1] != unembed.shape[1]:
        return None
    norm = getattr(model.model, "norm", None)
    gain = norm.weight.float() if norm is not None and getattr(norm, "weight", None) is not None else 1.0
    unembed = unembed.float()
    results = [], [], [], []
    for lo in range(0, len(w_dec), chunk):
        logits = (w_dec[lo:lo + chunk].to(unembed.device).float() * gain) @ unembed.T
        top, bottom = logits.topk(n, dim=1), logits.topk(n, dim=1, largest=False)
        for out, t in zip(results, (top.values, top.indices, bottom.values, bottom.indices)):
            out.append(t.cpu())
    return tuple(torch.cat(r) for r in results)


@torch.no_grad()
def decoder_neighbours(w_dec: torch.Tensor, n: int, rows: tuple[int, int] | None = None, chunk: int = 1024):
    """(cosines, indices) [features, n] of the nearest other features of features rows[0]..rows[1]-1 (default all)."""
    unit = torch.nn.functional.normalize(w_dec.float(), dim=1)
    n = min(n, len(unit) - 1)
    first, stop = rows or (0, len(unit))
    cos, idx = [], []
    for lo in range(first, stop, chunk):
        sims = unit[lo:min(lo + chunk, stop)] @ unit.T
        rows = torch.arange(lo, min(lo + chunk, stop), device=sims.device)
        sims[rows - lo, rows] = -2.0  # not its own neighbour
        top = sims.topk(n, dim=1)
        cos.append(top.values.cpu())
        idx.append(top.indices.cpu())
    return torch.cat(cos), torch.cat(idx)
