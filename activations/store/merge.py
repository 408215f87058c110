"""merge: every shard's committed rows copied into a new one-shard store, in rank or window order."""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from activations.store.blocks import ORDERS, all_columns, block_rows, row_blocks
from activations.store.format import StoreError, as_tensor
from activations.store.info import codecs_of
from activations.store.reader import ActivationStore, ShardRecord
from activations.store.roots import store_root
from activations.store.writer import ShardWriter


def _plan(store: ActivationStore, order: str) -> list[tuple[str, int, int]]:
    """The merged store's rows as (shard, start, stop) ranges of the source, in output order."""
    if order == "ranks":
        return [(rec.name, 0, rec.rows) for rec in store.shard_records if rec.rows]
    runs = []  # (window, shard, start, stop)
    for rec in store.shard_records:
        for lo, hi in row_blocks(0, rec.rows, 1 << 20):
            w = store.read_shard(rec.name, "windows", lo, hi)
            if (w < 0).any():
                raise StoreError(f"shard {rec.name} has rows without a window index (harvested before they were "
                                 "recorded): merge with --order ranks")
            starts = np.flatnonzero(np.diff(w, prepend=w[0] - 1))
            ends = np.append(starts[1:], len(w))
            runs += [(int(w[s]), rec.name, lo + int(s), lo + int(e)) for s, e in zip(starts, ends)]
    runs.sort(key=lambda r: r[0])  # stable: a window cut by a block boundary keeps its order
    plan: list[tuple[str, int, int]] = []
    for (w, shard, lo, hi), before in zip(runs, [None, *runs]):
        if before and before[0] == w and before[1] != shard:
            raise StoreError(f"window {w} is in shards {before[1]} and {shard}: run `python -m pipeline.store verify`")
        if plan and plan[-1][0] == shard and plan[-1][2] == lo:
            plan[-1] = (shard, plan[-1][1], hi)  # contiguous in one shard: one range
        else:
            plan.append((shard, lo, hi))
    return plan


class _ShardCursor:
    """Reads one shard front to back in blocks of whole chunks, serving the ranges asked for."""

    def __init__(self, store: ActivationStore, rec: ShardRecord):
        self.store, self.rec = store, rec
        self.block_rows = block_rows(store)
        self.lo = self.hi = 0
        self.data: dict = {}

    def take(self, lo: int, hi: int) -> dict:
        if not (self.lo <= lo and hi <= self.hi):
            c = self.store.chunk_rows
            self.lo = lo // c * c
            self.hi = min(self.rec.rows, max(self.lo + self.block_rows, -(-hi // c) * c))
            self.data = {name: self.store.read_shard(self.rec.name, name, self.lo, self.hi)
                         for name in all_columns(self.store)}
        return {name: v[lo - self.lo : hi - self.lo] for name, v in self.data.items()}


def _skip(plan: list[tuple[str, int, int]], rows: int):
    """The plan without its first `rows` rows (those a resumed merge already committed)."""
    for shard, lo, hi in plan:
        if rows >= hi - lo:
            rows -= hi - lo
            continue
        yield shard, lo + rows, hi
        rows = 0


def _copy(store: ActivationStore, plan, writer: ShardWriter, bar: tqdm) -> None:
    cursors = {rec.name: _ShardCursor(store, rec) for rec in store.shard_records}
    target = block_rows(store)
    pieces, n = [], 0

    def flush():
        rows = {name: np.concatenate([p[name] for p in pieces]) for name in pieces[0]}
        # Site and router arrays (2-D) go in as tensors: bf16 bits read back as bf16, not as numbers.
        writer.append({name: as_tensor(v) if v.ndim == 2 else v for name, v in rows.items()})
        bar.update(len(rows["tokens"]))

    for shard, lo, hi in _skip(plan, writer.consumed):
        pieces.append(cursors[shard].take(lo, hi))
        n += hi - lo
        if n >= target:
            flush()
            pieces, n = [], 0
    if pieces:
        flush()


def _check_destination(dst, storage_options: dict | None, origin: dict) -> None:
    """Only an unfinished (or finished) merge of the same source in the same order is resumed."""
    if store_root(dst, storage_options).read("zarr.json") is None:
        return
    found = ActivationStore(dst, storage_options).origin
    if found != origin:
        what = f"merged from {found['merged_from']} in {found['order']} order" if found else "harvested"
        raise StoreError(f"{dst} already holds a store {what}: remove it or choose another destination")


def _compression(store: ActivationStore) -> str | None:
    return "zstd" if "zstd" in codecs_of(store) else None


def merge(src, dst, order: str = "ranks", storage_options: dict | None = None,
          dst_storage_options: dict | None = None, progress: bool = True, fsync: bool = True) -> ActivationStore:
    """Write the committed rows of every shard of the finished store `src` into a new one-shard
    store rooted at `dst` (give `runs/<name>/activations` to use it as a run), with the same
    identity, sites, dtype, chunking, compression and statistics.

    order="ranks": the rows exactly as ActivationStore(src) reads them, shard by shard.
    order="windows": the rows in corpus window order, which is the order one writer stores them
    in; tokens, doc_ids, positions and windows then equal those of a one-writer harvest of the
    same corpus, and the activations equal them up to the rounding of different batch groupings
    in the forward (bit-equal where the model computes a window the same in any batch). Needs the
    per-row window column that harvests record.

    A merge that was killed resumes when run again with the same arguments (`fsync` makes its
    commits survive a power cut, as a harvest's do; local stores only).
    """
    if order not in ORDERS:
        raise StoreError(f"unknown merge order {order!r}: use {' or '.join(ORDERS)}")
    source = ActivationStore(src, storage_options)
    if not source.complete:
        writing = ", ".join(rec.name for rec in source.shard_records if not rec.done)
        raise StoreError(f"{source.root} is still being written ({writing}): finish or resume that harvest, then merge")
    plan = _plan(source, order)
    origin = {"merged_from": str(source.root), "order": order, "world_size": source.world_size}
    _check_destination(dst, dst_storage_options, origin)
    writer = ShardWriter(dst, 0, 1, {s: source.width(s) for s in source.sites}, source.identity, dtype=source.dtype,
                         chunk_rows=source.chunk_rows, compression=_compression(source),
                         fsync=fsync, storage_options=dst_storage_options, origin=origin, router=source.router)
    with writer, tqdm(total=source.n_tokens, initial=writer.consumed, unit="tok", unit_scale=True, desc="merge",
                      disable=not progress, dynamic_ncols=True) as bar:
        if not writer.done:
            _copy(source, plan, writer, bar)
            writer.finish(stats={site: source.site_stats(site) for site in source.sites})
    merged = ActivationStore(dst, dst_storage_options)
    if merged.n_tokens != source.n_tokens:
        raise StoreError(f"the merge holds {merged.n_tokens} rows, the source {source.n_tokens}: the source has "
                         "non-finite rows; run `python -m pipeline.store verify` on it")
    return merged
