"""Harvesting: stream activations at chosen sites of a model into a run's zarr store.

The forward runs under inference_mode and stops after the deepest requested site; a
background thread writes and commits whole chunks while the next batch runs. A killed
harvest started again with the same config resumes after its last commit.
"""

from __future__ import annotations

import itertools
import math
import time

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from activations.adapters import make_adapter
from activations.corpus import Window, fingerprint, iter_windows, windows_for_tokens
from activations.models import load_model
from activations.routing import router_layers
from activations.rundir import RunDir
from activations.sites import parse_sites
from activations.store import ActivationStore, ShardWriter, StoreError


def chunk_rows_for(widths: list[int], dtype: str, chunk_rows: int, chunk_mib: float) -> int:
    """Rows per chunk: as configured, or a power of two near `chunk_mib` MiB for the widest site."""
    if chunk_rows:
        return chunk_rows
    bytes_per_row = max(widths) * (2 if dtype == "bfloat16" else 4)
    return max(64, 2 ** round(math.log2(chunk_mib * 2**20 / bytes_per_row)))


def skip_committed(windows, consumed: int):
    """Drop the rows an earlier run already committed: whole windows unseen, a straddling
    window run again (the model needs its full context) with its first rows left out."""
    for window in windows:
        kept = np.flatnonzero(window.keep)
        if consumed >= len(kept):
            consumed -= len(kept)
            continue
        if consumed:
            window.keep[kept[:consumed]] = False
            consumed = 0
        yield window


def batches(windows, batch_size: int):
    """Consecutive windows of equal length (only the corpus's last window is shorter)."""
    batch: list[Window] = []
    for window in windows:
        if batch and (len(batch) == batch_size or len(window.tokens) != len(batch[0].tokens)):
            yield batch
            batch = []
        batch.append(window)
    if batch:
        yield batch


def rows_of(batch: list[Window], acts: dict) -> dict:
    """The kept rows of a batch, flattened to one row per token."""
    keep = np.concatenate([w.keep for w in batch])
    keep_t = torch.from_numpy(keep)
    length = len(batch[0].tokens)
    rows = {
        "tokens": np.concatenate([w.tokens for w in batch])[keep].astype(np.int32),
        "doc_ids": np.concatenate([w.doc_ids for w in batch])[keep],
        "positions": np.tile(np.arange(length, dtype=np.int32), len(batch))[keep],
        # The corpus window of each row: lets a merge of several writers' shards restore one writer's order.
        "windows": np.repeat([w.index for w in batch], length)[keep],
    }
    for site, tensor in acts.items():
        flat = tensor.reshape(-1, tensor.shape[-1])
        rows[str(site)] = flat[keep_t.to(flat.device)]
    return rows


def check_same_model(cfg: DictConfig) -> None:
    """Fail before loading a large model when the run already holds another model's store."""
    try:
        store = ActivationStore(*RunDir.from_config(cfg).store_location(cfg.store))
    except StoreError:  # no store yet
        return
    stored = store.identity.get("model")
    if stored != cfg.model.name:
        raise StoreError(
            f"{store.root} holds activations of model={stored}, not {cfg.model.name}: use another run.run_name"
        )


def harvest(cfg: DictConfig) -> ActivationStore:
    """Load the model (only the blocks the sites need) and harvest."""
    sites = parse_sites(cfg.harvest.sites)
    check_same_model(cfg)
    deepest = max([s.layer for s in sites] + [int(layer) for layer in cfg.harvest.router_layers])
    model, tokenizer = load_model(cfg.model, max_layer=deepest)
    store, _ = harvest_with(cfg, model, tokenizer)
    return store


def harvest_with(cfg: DictConfig, model, tokenizer) -> tuple[ActivationStore, float]:
    """Harvest with a loaded model; returns the store and the seconds spent harvesting."""
    run = RunDir.from_config(cfg)
    h = cfg.harvest
    if not 0 <= h.rank < h.world_size:
        raise StoreError(f"harvest.rank={h.rank} is not in 0..world_size-1={h.world_size - 1}")
    adapter = make_adapter(model, cfg.model)
    sites = parse_sites(h.sites, adapter.n_layers)
    run.save_config(cfg, "harvest" if h.world_size == 1 else f"harvest.r{h.rank}")

    max_windows = windows_for_tokens(h.max_tokens, cfg.data.context_length)
    windows = iter_windows(cfg.data, tokenizer, h.rank, h.world_size, max_windows)
    first = next(windows, None)  # an empty or unreadable corpus fails here, before a store exists
    windows = itertools.chain([first] if first else [], windows)

    widths = {str(s): adapter.width(s) for s in sites}
    router = adapter.router_layout(router_layers(h.router, h.router_layers, sites, adapter.n_layers))
    identity = {**adapter.describe(), "model": cfg.model.name, "data": fingerprint(cfg.data, tokenizer),
                "context_length": cfg.data.context_length}
    location, storage_options = run.store_location(cfg.store)
    writer = ShardWriter(
        location, h.rank, h.world_size, widths, identity, dtype=cfg.store.dtype,
        chunk_rows=chunk_rows_for(list(widths.values()), cfg.store.dtype, cfg.store.chunk_rows, cfg.store.chunk_mib),
        compression=cfg.store.compression, fsync=cfg.store.fsync, queue_size=h.queue_batches,
        storage_options=storage_options, router=router,
    )
    if writer.done:
        writer.close()
        print(f"harvest: shard {h.rank} of {h.world_size} is already complete ({writer.committed_rows} tokens)")
        return ActivationStore(location, storage_options), 0.0

    expected = max_windows // h.world_size * cfg.data.context_length if max_windows else None
    device = next(model.parameters()).device
    started = time.perf_counter()
    with writer, tqdm(total=expected, initial=writer.consumed, unit="tok", unit_scale=True,
                      desc=f"harvest r{h.rank}", dynamic_ncols=True) as bar:
        for batch in batches(skip_committed(windows, writer.consumed), h.batch_size):
            input_ids = torch.from_numpy(np.stack([w.tokens for w in batch])).to(device)
            rows = rows_of(batch, adapter.capture(sites, input_ids, routes=router))
            writer.append(rows)
            bar.update(len(rows["tokens"]))
        writer.finish()
    elapsed = time.perf_counter() - started
    store = ActivationStore(location, storage_options)
    return store, elapsed
