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
                  mean_norm: float, live: torch.Tensor, strength: float = 0.5, batch: int = 128) -> torch.Tensor:
    """[features] output scores (nan for dead features).

    w_dec: [features, width] decoder rows; promoted: [features, n] token ids of each feature's logit
    lens; contexts: [c, T] token ids; live: [features] bool.
    """
    device = adapter.model.get_input_embeddings().weight.device
    pushes = torch.nn.functional.normalize(w_dec.float(), dim=1) * (strength * mean_norm)
    features = torch.nonzero(live).flatten()
    gains = torch.zeros(len(w_dec))
    for ctx in contexts:
        prefix = prefix_cache(adapter.model, ctx[:-1].to(device), batch)
        last = ctx[-1:].to(device).expand(batch, 1)
        plain = next_token_probs(adapter, site, last, prefix, torch.zeros(batch, w_dec.shape[1], device=device))[0]
        for lo in tqdm(range(0, len(features), batch), desc=f"output scores {site}", unit="batch",
                       dynamic_ncols=True, leave=False):
            chunk = features[lo:lo + batch]
            directions = torch.zeros(batch, w_dec.shape[1], device=device)  # the last batch is padded
            directions[: len(chunk)] = pushes[chunk].to(device)
            probs = next_token_probs(adapter, site, last, prefix, directions)[: len(chunk)]
            ids = promoted[chunk].to(device)
            gains[chunk] += (probs.gather(1, ids).sum(1) - plain[ids].sum(1)).cpu()
    scores = torch.full((len(w_dec),), float("nan"))
    scores[features] = gains[features] / len(contexts)
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
