"""Mining: one streaming pass of the stored activations through a trained SAE.

The store's rows are cut into fixed blocks of `context_tokens` consecutive rows (Delphi's
"contexts"); an example is one block. Per feature the miner keeps, without ever holding a
[tokens x features] matrix beyond the current batch:

  - firing count, activation sum, and a histogram over fixed log-spaced bins;
  - the top blocks by peak activation, with the per-token activations of each;
  - a uniform sample of the blocks where it fires (a reservoir with random keys), with their
    per-token activations: later split into activation quantiles;
  - for a fixed pool of random blocks, whether it fires there: its non-activating contexts;
  - for each routed layer in `expert_layers` (a store with router arrays), how often each expert
    is chosen on the tokens where it fires, and each expert's load over all tokens
    (features/experts.py turns these into lifts).

Everything is a tensor of shape [features, slots, ...], merged per batch with one `topk`, so the
pass costs little more than the SAE encode itself (see `make bench-label`). The state is a plain
dict of tensors: saved every few minutes, a killed pass resumes where it stopped.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from tqdm import tqdm

from activations.atomic import replacing
from activations.store import ActivationStore
from activations.errors import ConfigError

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
    expert_layers: tuple = ()  # routed layers whose expert choices are counted per feature


class FeatureMiner:
    """Streaming per-feature statistics and examples of one SAE over one site of a store."""

    def __init__(self, store: ActivationStore, site: str, sae, plan: MiningPlan, device: torch.device,
                 features: tuple[int, int] | None = None):
        """features: mine only SAE features [start, stop) (a slice of a split job); default all.
        State index i is then feature start + i."""
        self.store, self.site, self.sae, self.plan, self.device = store, site, sae, plan, device
        self.features = features or (0, sae.cfg.d_sae)
        self.n_features = self.features[1] - self.features[0]
        rows = store.n_tokens if not plan.max_tokens else min(plan.max_tokens, store.n_tokens)
        self.n_blocks = rows // plan.context_tokens
        if self.n_blocks < 2:
            raise ConfigError(
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

        def slots(name, k):  # k example slots per feature, best key first; key -inf = empty
            return {f"{name}_keys": torch.full((F, k), -math.inf, device=dev),
                    f"{name}_blocks": torch.full((F, k), -1, dtype=torch.long, device=dev),
                    f"{name}_peaks": torch.zeros(F, k, device=dev),
                    f"{name}_acts": torch.zeros(F, k, W, dtype=torch.float16, device=dev),
                    f"{name}_pos": torch.arange(k, device=dev).repeat(F, 1)}

        return {
            # What the state is a pass of: a checkpoint of anything else is not resumed.
            "identity": {"plan": asdict(p), "site": self.site, "rows": self.n_blocks * W, "features": list(self.features),
                         "sae_sum": float(self.sae.W_enc.detach().double().sum() + self.sae.W_dec.detach().double().sum())},
            "next_batch": 0,
            "tokens": 0,
            "fires": torch.zeros(F, dtype=torch.long, device=dev),
            "act_sum": torch.zeros(F, dtype=torch.float64, device=dev),
            "hist": torch.zeros(F, len(HIST_EDGES) - 1, dtype=torch.long, device=dev),
            **slots("top", p.top_examples),
            **slots("sample", p.sampled_examples),
            "pool": torch.from_numpy(np.sort(pool)).to(dev),
            "pool_fires": torch.zeros(len(pool), F, dtype=torch.bool, device=dev),
            **{key: torch.zeros(shape, dtype=torch.long, device=dev) for key, shape in self._expert_shapes().items()},
        }

    def _expert_shapes(self) -> dict:
        """experts_L<l> [features, experts]: tokens where the feature fires and layer l chose the expert;
        load_L<l> [experts]: tokens where layer l chose it."""
        shapes = {}
        for layer in self.plan.expert_layers:
            n_experts = self.store.router[layer]["n_experts"]
            shapes |= {f"experts_L{layer}": (self.n_features, n_experts), f"load_L{layer}": (n_experts,)}
        return shapes

    def run(self, checkpoint: Path | None = None, checkpoint_seconds: float = 180.0) -> dict:
        """Mine every remaining batch (resuming from `checkpoint` when it exists) and return the state."""
        if checkpoint is not None and checkpoint.exists():
            saved = torch.load(checkpoint, map_location=self.device, weights_only=False)
            if saved.get("identity") == self.state["identity"]:
                self.state = saved
            else:
                print(f"mine {self.site}: {checkpoint} is from another SAE, store or plan; mining again")
        W = self.plan.context_tokens
        saved = time.monotonic()
        mined = min(self.state["next_batch"] * self.plan.batch_blocks, self.n_blocks) * W
        # Closed on an error too, so a stage's one-line error comes after the bar, not before it.
        with tqdm(total=self.n_blocks * W, initial=mined, unit="tok", unit_scale=True, desc=f"mine {self.site}",
                  dynamic_ncols=True) as bar:
            for b in range(self.state["next_batch"], self.n_batches):
                first = b * self.plan.batch_blocks
                n = min(self.plan.batch_blocks, self.n_blocks - first)
                x = torch.from_numpy(self.store.read(self.site, first * W, (first + n) * W)).to(self.device)
                routes = {layer: torch.from_numpy(self.store.read_router(layer, first * W, (first + n) * W)[0])
                          for layer in self.plan.expert_layers}
                self.update(first, rearrange(self.encode(x), "(n w) f -> n w f", w=W), b, routes)
                bar.update(n * W)
                if checkpoint is not None and time.monotonic() - saved > checkpoint_seconds:
                    save_state(self.state, checkpoint)
                    saved = time.monotonic()
        if checkpoint is not None:
            save_state(self.state, checkpoint)
        return self.state

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Activations [rows, features] of the mined features; outlier rows (attention sinks) fire nothing."""
        lo, hi = self.features
        acts = self.sae.encode(x.to(self.sae.W_enc.dtype)).float()
        acts = acts if hi - lo == acts.shape[1] else acts[:, lo:hi].contiguous()
        if self.max_norm < math.inf:
            acts[x.norm(dim=1) > self.max_norm] = 0
        return acts

    @torch.no_grad()
    def update(self, first_block: int, acts: torch.Tensor, batch_index: int, routes: dict | None = None) -> None:
        """Fold one batch of blocks [n, W, F] (blocks first_block.. first_block+n-1) into the state;
        routes: {layer: chosen expert ids [n * W, top_k]} of the same rows, for plan.expert_layers."""
        s, n, F = self.state, acts.shape[0], acts.shape[2]
        flat = rearrange(acts, "n w f -> (n w) f")
        # One pass finds the firing entries; counts, sums and the histogram use only those.
        rows, feats = (flat > 0).nonzero(as_tuple=True)
        values = flat[rows, feats]
        s["fires"] += torch.bincount(feats, minlength=F)
        s["act_sum"] += torch.bincount(feats, weights=values.double(), minlength=F)
        bins = (torch.bucketize(values, self.edges) - 1).clamp_(0, len(HIST_EDGES) - 2)
        s["hist"].view(-1).index_add_(0, feats * (len(HIST_EDGES) - 1) + bins, torch.ones_like(bins))
        s["tokens"] += flat.shape[0]
        for layer, ids in (routes or {}).items():
            ids = ids.to(self.device).long()
            load = s[f"load_L{layer}"]
            load += torch.bincount(ids.flatten(), minlength=len(load))
            pairs = (feats[:, None] * len(load) + ids[rows]).flatten()  # (feature, expert) of each firing token
            s[f"experts_L{layer}"].view(-1).index_add_(0, pairs, torch.ones_like(pairs))

        peaks = acts.amax(dim=1).T.contiguous()  # [F, n]
        _merge(s, "top", peaks.masked_fill(peaks <= 0, -math.inf), peaks, first_block, acts)
        # Random keys for a uniform reservoir over the blocks where each feature fires. Drawn for
        # every SAE feature from a generator seeded by the batch, so a resumed pass and a slice
        # of the features draw the same keys as one whole pass.
        gen = torch.Generator(device=acts.device).manual_seed(self.plan.seed * 1_000_003 + batch_index)
        keys = torch.rand((self.sae.cfg.d_sae, n), generator=gen, device=acts.device)[self.features[0]:self.features[1]]
        keys.masked_fill_(peaks <= 0, -math.inf)
        _merge(s, "sample", keys, peaks, first_block, acts)

        in_batch = (s["pool"] >= first_block) & (s["pool"] < first_block + n)
        if in_batch.any():
            s["pool_fires"][in_batch] = peaks[:, s["pool"][in_batch] - first_block].T > 0
        s["next_batch"] = batch_index + 1


def _merge(state: dict, name: str, keys: torch.Tensor, peaks: torch.Tensor, first_block: int, acts: torch.Tensor) -> None:
    """Keep, per feature, the slots with the largest keys among its old ones and this batch's blocks.

    keys, peaks [F, n] for the batch's blocks (first_block + i, activations `acts` [n, W, F]).
    Keys, blocks and peaks are kept sorted, best first; the per-token activations stay where they
    were written and `<name>_pos` maps each rank to its row, so only new entries are copied.
    Only features where some block beats the current last slot are touched at all.
    """
    old_keys = state[f"{name}_keys"]
    k = old_keys.shape[1]
    keys, batch_of = keys.topk(min(k, keys.shape[1]), dim=1)  # the batch's best candidates per feature
    feats = (keys[:, 0] > old_keys[:, -1]).nonzero().flatten()
    if len(feats) == 0:
        return
    batch_of = batch_of[feats]
    new_keys, where = torch.cat([old_keys[feats], keys[feats]], dim=1).topk(k, dim=1)  # [m, k], best first
    from_batch = where >= k
    batch_i, old_i = batch_of.gather(1, (where - k).clamp(min=0)), where.clamp(max=k - 1)
    # Each row takes as many batch entries as it drops old ranks; pair them in order.
    dropped = torch.zeros_like(where).scatter_add_(1, old_i, (~from_batch).long()) == 0
    old_pos = state[f"{name}_pos"][feats]
    rows, ranks = from_batch.nonzero(as_tuple=True)
    free_pos = old_pos[dropped.nonzero(as_tuple=True)]
    new_pos = old_pos.gather(1, old_i)
    new_pos[rows, ranks] = free_pos
    state[f"{name}_acts"][feats[rows], free_pos] = acts[batch_i[rows, ranks], :, feats[rows]].to(torch.float16)
    state[f"{name}_keys"][feats] = new_keys
    state[f"{name}_pos"][feats] = new_pos
    for what, batch_value in (("blocks", first_block + batch_i), ("peaks", peaks[feats].gather(1, batch_i))):
        state[f"{name}_{what}"][feats] = torch.where(from_batch, batch_value, state[f"{name}_{what}"][feats].gather(1, old_i))


def slot_acts(state: dict, name: str, feature: int, rank: int) -> torch.Tensor:
    """The per-token activations [W] of a feature's `name` slot of that rank."""
    return state[f"{name}_acts"][feature, state[f"{name}_pos"][feature, rank]].float()


def save_state(state: dict, path: Path) -> None:
    """Write atomically: a kill during the save leaves the previous checkpoint intact."""
    with replacing(path) as tmp:
        torch.save(state, tmp)
