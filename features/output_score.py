"""The output score: does adding a feature's decoder direction move the model's next-token
distribution toward the tokens the feature promotes? (Arad, Mueller and Belinkov 2025 found that
features scoring high on it steer far better than the rest.)

For a few fixed contexts, the feature's unit direction times `strength` x the site's mean row norm
is added at the feature's site on the context's last token; the score is the probability the model
then gives the feature's top logit-lens tokens as the next token, minus the probability it gave them
unsteered, averaged over the contexts: in [-1, 1], 0 when the push moves nothing toward what the
feature writes.

Only the last token is edited, so the context before it is run once (its key-value cache copied for
each batch) and each feature costs one token's forward: features ride along the batch dimension,
each batch row carrying its own feature's direction.
"""

from __future__ import annotations

import copy

import torch
from tqdm import tqdm


@torch.no_grad()
def output_scores(adapter, site, w_dec: torch.Tensor, promoted: torch.Tensor, contexts: torch.Tensor,
                  mean_norm: float, live: torch.Tensor, strength: float = 0.5, batch: int = 128,
                  first: int = 0) -> torch.Tensor:
    """[features] output scores (nan for dead features).

    w_dec: [features, width] decoder rows of features first, first + 1, ...; promoted: [features, n]
    token ids of each feature's logit lens; contexts: [c, T] token ids; live: [features] bool.
    Feature i always rides in batch row i % batch of the batch of i // batch, whatever slice of the
    SAE is scored, so a split label job computes exactly the numbers of one pass.
    """
    device = adapter.model.get_input_embeddings().weight.device
    pushes = torch.nn.functional.normalize(w_dec.float(), dim=1) * (strength * mean_norm)
    gains = torch.zeros(len(w_dec))
    starts = range(first - first % batch, first + len(w_dec), batch)
    for ctx in contexts:
        prefix = prefix_cache(adapter.model, ctx[:-1].to(device), batch)
        last = ctx[-1:].to(device).expand(batch, 1)
        plain = next_token_probs(adapter, site, last, prefix, torch.zeros(batch, w_dec.shape[1], device=device))[0]
        for start in tqdm(starts, desc=f"output scores {site}", unit="batch", dynamic_ncols=True, leave=False):
            ids = torch.arange(max(start, first), min(start + batch, first + len(w_dec)))
            ids = ids[live[ids - first]]
            if not len(ids):
                continue
            directions = torch.zeros(batch, w_dec.shape[1], device=device)
            directions[ids - start] = pushes[ids - first].to(device)
            probs = next_token_probs(adapter, site, last, prefix, directions)[ids - start]
            tokens = promoted[ids - first].to(device)
            gains[ids - first] += (probs.gather(1, tokens).sum(1) - plain[tokens].sum(1)).cpu()
    scores = torch.full((len(w_dec),), float("nan"))
    scores[live] = gains[live] / len(contexts)
    return scores


def prefix_cache(model, prefix: torch.Tensor, batch: int):
    """The key-value cache of a context's tokens before the last, for `batch` identical rows."""
    return model(input_ids=prefix.expand(batch, -1), use_cache=True).past_key_values


def next_token_probs(adapter, site, last: torch.Tensor, prefix, directions: torch.Tensor) -> torch.Tensor:
    """[batch, vocab] next-token probabilities after the last token, row b's site shifted by directions[b]."""
    def shift(rows):  # rows [batch, 1, width]: the last token only, the prefix comes from the cache
        return rows + directions[:, None, :].to(rows.dtype)

    with torch.inference_mode(), adapter.hooks({site: shift}):
        logits = adapter.model(input_ids=last, past_key_values=copy.deepcopy(prefix), use_cache=True).logits
    return logits[:, -1].float().softmax(-1)
