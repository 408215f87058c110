"""Mining: one streaming pass of the stored activations through a trained SAE.

The store's rows are cut into fixed blocks of `context_tokens` consecutive rows (Delphi's
"contexts"); an example is one block. Per feature the miner keeps, without ever holding a
[tokens x features] matrix beyond the current batch:

  - firing count, activation sum, and a histogram over fixed log-spaced bins;
  - the top blocks by peak activation, with the per-token activations of each;
  - a uniform sample of the blocks where it fires (a reservoir with random keys), with their
    per-token activations: later split into activation quantiles;
  - for a fixed pool of random blocks, whether it fires there: its non-activating contexts.

Everything is a tensor of shape [slots, features, ...], merged per batch with one `topk`, so the
pass costs little more than the SAE encode itself (see `make bench-label`). The state is a plain
dict of tensors: saved every few minutes, a killed pass resumes where it stopped.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.store import ActivationStore

# Histogram bins: 8 per decade from 1e-3 to 1e5 covers SAE activations of every model we know,
# including the massive-activation sites of DeepSeek-V4, with no per-feature first pass.
HIST_EDGES = np.logspace(-3, 5, 65)


@dataclass
class MiningPlan:
    context_tokens: int = 32  # rows per block (one example)
    top_examples: int = 20  # highest-peak blocks kept per feature
    sampled_examples: int = 40  # activating blocks sampled uniformly per feature (for quantiles)
    pool_blocks: int = 256  # random blocks checked for every feature (non-activating contexts)
    batch_blocks: int = 128  # blocks per encode
    max_tokens: int = 0  # mine the first rows only (0 = the whole store)
    outlier_norm: float = 10.0  # rows above this multiple of the site's mean norm count as not firing
    seed: int = 0


class FeatureMiner:
    """Streaming per-feature statistics and examples of one SAE over one site of a store."""

    def __init__(self, store: ActivationStore, site: str, sae, plan: MiningPlan, device: torch.device):
        self.store, self.site, self.sae, self.plan, self.device = store, site, sae, plan, device
        self.n_features = sae.cfg.d_sae
        rows = store.n_tokens if not plan.max_tokens else min(plan.max_tokens, store.n_tokens)
        self.n_blocks = rows // plan.context_tokens
        if self.n_blocks < 2:
            raise ValueError(
                f"the store has {store.n_tokens} rows at {site}: too few for blocks of {plan.context_tokens} "
                f"tokens; harvest more or lower label.context_tokens"
            )
        self.n_batches = math.ceil(self.n_blocks / plan.batch_blocks)
        self.max_norm = plan.outlier_norm * store.stats(site)["mean_norm"] if plan.outlier_norm else math.inf
        self.edges = torch.tensor(HIST_EDGES, dtype=torch.float32, device=device)
        self.state = self._empty_state()

    def _empty_state(self) -> dict:
        F, W, p, dev = self.n_features, self.plan.context_tokens, self.plan, self.device
        pool = np.random.default_rng(p.seed).choice(self.n_blocks, min(p.pool_blocks, self.n_blocks), replace=False)

        def slots(k):  # (keys, block ids, per-token acts) of k example slots per feature
            return (torch.full((k, F), -math.inf, device=dev), torch.full((k, F), -1, dtype=torch.long, device=dev),
                    torch.zeros(k, F, W, dtype=torch.float16, device=dev))

        top, sample = slots(p.top_examples), slots(p.sampled_examples)
        return {
            "next_batch": 0,
            "tokens": 0,
            "fires": torch.zeros(F, dtype=torch.long, device=dev),
            "act_sum": torch.zeros(F, dtype=torch.float64, device=dev),
            "hist": torch.zeros(F, len(HIST_EDGES) - 1, dtype=torch.long, device=dev),
            "top_keys": top[0], "top_blocks": top[1], "top_acts": top[2],
            "sample_keys": sample[0], "sample_blocks": sample[1], "sample_acts": sample[2],
            "sample_peaks": torch.zeros(p.sampled_examples, F, device=dev),
            "pool": torch.from_numpy(np.sort(pool)).to(dev),
            "pool_fires": torch.zeros(len(pool), F, dtype=torch.bool, device=dev),
        }

    @property
    def done(self) -> bool:
        return self.state["next_batch"] >= self.n_batches

    def run(self, checkpoint: Path | None = None, checkpoint_seconds: float = 180.0) -> dict:
        """Mine every remaining batch (resuming from `checkpoint` when it exists) and return the state."""
        if checkpoint is not None and checkpoint.exists():
            self.state = torch.load(checkpoint, map_location=self.device, weights_only=False)
        W = self.plan.context_tokens
        bar = tqdm(total=self.n_blocks * W, initial=min(self.state["next_batch"] * self.plan.batch_blocks, self.n_blocks) * W,
                   unit="tok", unit_scale=True, desc=f"mine {self.site}", dynamic_ncols=True)
        saved = time.monotonic()
        for b in range(self.state["next_batch"], self.n_batches):
            first = b * self.plan.batch_blocks
            n = min(self.plan.batch_blocks, self.n_blocks - first)
            x = torch.from_numpy(self.store.read(self.site, first * W, (first + n) * W)).to(self.device)
            self.update(first, self.encode(x).view(n, W, -1), b)
            bar.update(n * W)
            if checkpoint is not None and time.monotonic() - saved > checkpoint_seconds:
                save_state(self.state, checkpoint)
                saved = time.monotonic()
        bar.close()
        if checkpoint is not None:
            save_state(self.state, checkpoint)
        return self.state

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations [rows, features]; outlier rows (attention sinks) fire nothing."""
        acts = self.sae.encode(x.to(self.sae.W_enc.dtype)).float()
        acts[x.norm(dim=1) > self.max_norm] = 0
        return acts

    @torch.no_grad()
    def update(self, first_block: int, acts: torch.Tensor, batch_index: int) -> None:
        """Fold one batch of blocks [n, W, F] (blocks first_block.. first_block+n-1) into the state."""
        s, n, F = self.state, acts.shape[0], acts.shape[2]
        flat = acts.view(-1, F)
        fired = flat > 0
        s["fires"] += fired.sum(0)
        s["act_sum"] += flat.sum(0, dtype=torch.float64)
        rows, feats = fired.nonzero(as_tuple=True)
        bins = (torch.bucketize(flat[rows, feats], self.edges) - 1).clamp_(0, len(HIST_EDGES) - 2)
        s["hist"].view(-1).index_add_(0, feats * (len(HIST_EDGES) - 1) + bins, torch.ones_like(bins))
        s["tokens"] += flat.shape[0]

        peaks = acts.amax(dim=1)  # [n, F]
        blocks = torch.arange(first_block, first_block + n, device=acts.device)
        _merge(s, "top", peaks.masked_fill(peaks <= 0, -math.inf), blocks, acts)
        # Random keys for a uniform reservoir over the blocks where each feature fires; the
        # generator is seeded by the batch so a resumed pass draws the same keys.
        gen = torch.Generator(device=acts.device).manual_seed(self.plan.seed * 1_000_003 + batch_index)
        keys = torch.rand(peaks.shape, generator=gen, device=acts.device).masked_fill_(peaks <= 0, -math.inf)
        taken = _merge(s, "sample", keys, blocks, acts)
        s["sample_peaks"] = torch.where(taken >= 0, peaks[taken.clamp(min=0), torch.arange(F, device=acts.device)],
                                        s["sample_peaks"].gather(0, (-1 - taken).clamp(min=0)))

        in_batch = (s["pool"] >= first_block) & (s["pool"] < first_block + n)
        if in_batch.any():
            s["pool_fires"][in_batch] = peaks[s["pool"][in_batch] - first_block] > 0
        s["next_batch"] = batch_index + 1


def _merge(state: dict, name: str, keys: torch.Tensor, blocks: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
    """Keep, per feature, the slots with the largest keys among the old ones and this batch's blocks.

    keys [n, F] for the batch's blocks (ids `blocks` [n], activations `acts` [n, W, F]).
    Returns where each kept slot came from: i >= 0 is batch block i, -1 - j is old slot j.
    """
    old_keys, old_blocks, old_acts = state[f"{name}_keys"], state[f"{name}_blocks"], state[f"{name}_acts"]
    k, F = old_keys.shape
    new_keys, where = torch.cat([old_keys, keys]).topk(k, dim=0)  # [k, F]
    from_batch = where >= k
    feature = torch.arange(F, device=keys.device).expand(k, F)
    batch_i = (where - k).clamp(min=0)
    state[f"{name}_keys"] = new_keys
    state[f"{name}_blocks"] = torch.where(from_batch, blocks[batch_i], old_blocks.gather(0, where.clamp(max=k - 1)))
    kept = torch.empty_like(old_acts)
    kept[~from_batch] = old_acts[where[~from_batch], feature[~from_batch]]
    kept[from_batch] = acts[batch_i[from_batch], :, feature[from_batch]].to(kept.dtype)
    state[f"{name}_acts"] = kept
    return torch.where(from_batch, batch_i, -1 - where)


def save_state(state: dict, path: Path) -> None:
    """Write atomically: a kill during the save leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
