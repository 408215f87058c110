"""ShardWriter: one writer's rows, written chunk by chunk and committed by its manifest."""

from __future__ import annotations

import json
import queue
import threading

import numpy as np
import torch
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.errors import ContainsGroupError

from activations.sites import Site, SiteError
from activations.store.format import (
    DTYPES, FORMAT, FORMAT_VERSION, OPTIONAL_COLUMNS, PREVIOUS, TOKEN_COLUMNS, StoreError, check_same, decode,
    chunk_keys, manifest_key, read_manifest, router_columns, shard_name,
)
from activations.store.positions import CrcStore, chunk_count, commit_crcs
from activations.store.roots import store_root
from activations.store.stats import SiteStats

LOGICAL = {np.dtype(np.uint16): "bfloat16", np.dtype(np.float32): "float32"}  # stored dtype -> what it holds


class ShardWriter:
    """Appends token rows to one shard of the store and commits them chunk by chunk.

    `consumed` is the number of input rows (dropped non-finite rows included) behind the
    committed rows: a resumed harvest skips that many input rows and appends the rest.
    One writer per shard at a time; opening a shard throws away its uncommitted rows.
    `root` is a local path or an fsspec URL (see store_root); `origin`, recorded in the root's
    attributes, says where a store that was not harvested (a merge) came from. `router`
    ({layer: {"top_k", "n_experts", "hashed"}}) adds each routed layer's expert ids and gate
    weights, `router.L<layer>.ids` (int16) and `.weights` (bf16), [rows, top_k], to every row.
    """

    def __init__(
        self,
        root,
        rank: int,
        world_size: int,
        sites: dict[str, int],
        identity: dict,
        dtype: str = "bfloat16",
        chunk_rows: int = 512,
        compression: str | None = None,
        fsync: bool = True,
        background: bool = True,
        queue_size: int = 4,
        storage_options: dict | None = None,
        origin: dict | None = None,
        router: dict | None = None,
    ):
        if not 0 <= rank < world_size:
            raise StoreError(f"rank {rank} out of range for world_size {world_size}: use 0 <= rank < world_size")
        if dtype not in DTYPES:
            raise StoreError(f"unknown store dtype {dtype!r}: use one of {', '.join(DTYPES)}")
        if compression not in (None, "zstd"):
            raise StoreError(f"unknown compression {compression!r}: use zstd or null")
        if chunk_rows < 1:
            raise StoreError(f"chunk_rows must be positive, got {chunk_rows}")
        if not sites:
            raise StoreError("no sites given: pass e.g. harvest.sites=[L15.resid_post]")
        try:
            ordered = sorted(sites, key=Site.parse)
        except SiteError as err:
            raise StoreError(str(err)) from None

        self.root = store_root(root, storage_options)
        self.name = shard_name(rank, world_size)
        self.sites = {s: int(sites[s]) for s in ordered}
        self.dtype = dtype
        self.fsync = fsync
        settings = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "identity": json.loads(json.dumps(identity)),  # as it reads back from JSON
            "dtype": dtype,
            "chunk_rows": chunk_rows,
            "sites": self.sites,
            "world_size": world_size,
        } | ({"origin": json.loads(json.dumps(origin))} if origin else {}) | (
            {"router": json.loads(json.dumps(router))} if router else {})
        self.router = router_columns(settings.get("router", {}))
        group = self._open_root(settings)
        # The layout is fixed by whoever created the store, so all shards chunk alike.
        self.chunk_rows = group.attrs["chunk_rows"]
        self._arrays = self._open_arrays(group.require_group(f"shards/{self.name}"), compression)
        self._lock = self.root.lock(f"manifests/{self.name}.lock", self.name)
        self._resume()

        self._buffer: list[dict] = []  # kept rows waiting for a whole chunk
        self._buffered_rows = 0
        self._dropped = {s: np.zeros(0, np.int64) for s in self.sites}  # input indices, not yet committed
        self._seen = self._consumed  # input rows appended so far, committed or not
        self._error: BaseException | None = None
        self._closed = False
        self._queue = self._thread = None
        if background:
            self._queue = queue.Queue(maxsize=queue_size)
            self._thread = threading.Thread(target=self._work, name=f"store-{self.name}", daemon=True)
            self._thread.start()

    # -- opening ---------------------------------------------------------------------------

    def _open_root(self, settings: dict) -> zarr.Group:
        # Seeing each chunk go to storage records its crc32c, which the manifest commits (positions.py).
        self._zarr = CrcStore(self.root.zarr_store(read_only=False))
        try:
            group = zarr.open_group(self._zarr, mode="a", attributes=settings)
        except ContainsGroupError:  # another shard's writer created it a moment ago
            group = zarr.open_group(self._zarr, mode="r+")
        check_same(self.root, dict(group.attrs), settings)
        return group

    def _open_arrays(self, shard: zarr.Group, compression: str | None) -> dict:
        columns = {name: ((), np.dtype(dt)) for name, dt in TOKEN_COLUMNS.items()}
        stored = np.uint16 if self.dtype == "bfloat16" else np.float32
        columns |= {site: ((width,), np.dtype(stored)) for site, width in self.sites.items()}
        columns |= self.router
        existing = set(shard.array_keys())
        # The checksum lets verify tell a damaged chunk from data; zstd goes before it.
        codecs = [ZstdCodec(level=3), Crc32cCodec()] if compression == "zstd" else [Crc32cCodec()]
        arrays = {}
        for name, (tail, dt) in columns.items():
            if name in existing:
                array = shard[name]
            else:
                array = shard.create_array(
                    name,
                    shape=(0, *tail),
                    chunks=(self.chunk_rows, *tail),
                    dtype=dt,
                    # A shard from before an optional column existed reads it as unknown.
                    fill_value=OPTIONAL_COLUMNS.get(name, 0),
                    compressors=codecs,
                    attributes={"logical_dtype": LOGICAL[dt]} if tail and dt in LOGICAL else {},
                )
            # Write every chunk as a file even if all zeros, so fsync finds what it expects.
            arrays[name] = array.with_config({"write_empty_chunks": True})
        return arrays

    def _resume(self) -> None:
        found, _ = read_manifest(self.root, self.name, self.sites)  # a torn manifest resumes from the commit before it
        self._last_commit = json.dumps(found).encode() if found else None
        manifest = found or {"rows": 0, "consumed": 0, "done": False, "stats": {}, "crc32c": {}}
        # the committed crc32c of each array's chunks from its last block file on (positions.py)
        self._crcs = {name: list(manifest["crc32c"].get(name, [])) for name in self._arrays}
        self._committed = manifest["rows"]
        self._consumed = manifest["consumed"]
        self._done = manifest["done"]
        self._stats = {s: SiteStats.zeros(w) for s, w in self.sites.items()}
        self._stats |= {s: SiteStats.from_json(d) for s, d in manifest["stats"].items()}
        if not self._done:
            # A killed writer may have written chunks past its last commit: they never existed.
            for array in self._arrays.values():
                if array.shape[0] != self._committed:
                    array.resize((self._committed, *array.shape[1:]))

    # -- public ----------------------------------------------------------------------------

    @property
    def committed_rows(self) -> int:
        return self._committed

    @property
    def consumed(self) -> int:
        return self._consumed

    @property
    def done(self) -> bool:
        return self._done

    def stats(self, site: str) -> dict:
        """Statistics of the committed rows of this shard (see SiteStats.summary)."""
        return self._stats[site].summary()

    def append(self, rows: dict) -> None:
        """Queue rows: tokens/doc_ids/positions [n], optionally windows [n] (the corpus window of
        each row, which lets a merge restore a single writer's order), and one [n, width] float
        tensor per site."""
        self._raise_if_failed()
        if self._done:
            raise StoreError(f"shard {self.name} already finished: use another run_name to harvest more")
        if self._closed:
            raise StoreError(f"writer of shard {self.name} is closed: open a new ShardWriter to resume")
        rows = self._to_cpu(rows)
        if self._queue is not None:
            self._queue.put(rows)
        else:
            self._guard(self._ingest, rows)
            self._raise_if_failed()

    def finish(self, stats: dict[str, SiteStats] | None = None) -> None:
        """Write the partial last chunk and mark the shard done. `stats` replaces the shard's
        statistics (a merge carries its source's over, dropped-row counts included)."""
        self._stop_worker()
        self._raise_if_failed()
        if self._done:
            return
        if self._closed:
            raise StoreError(f"writer of shard {self.name} is closed: open a new ShardWriter to resume")
        self._guard(self._write_and_commit, self._buffered_rows, True, stats)
        self._raise_if_failed()

    def close(self) -> None:
        """Stop writing; rows past the last commit are dropped (a resume redoes them)."""
        self._stop_worker()
        self._closed = True
        self._lock.close()
        self._raise_if_failed()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # keep the caller's exception; the uncommitted tail is simply redone on resume
            self._stop_worker()
            self._closed = True
            self._lock.close()

    # -- the work, on the background thread or inline --------------------------------------

    def _to_cpu(self, rows: dict) -> dict:
        """Check rows and copy them to CPU now, so the caller may reuse its tensors."""
        missing = [k for k in [*TOKEN_COLUMNS, *self.sites, *self.router] if k not in rows and k not in OPTIONAL_COLUMNS]
        extra = [k for k in rows if k not in TOKEN_COLUMNS and k not in self.sites and k not in self.router]
        if missing or extra:
            raise StoreError(
                f"rows for shard {self.name}: missing {missing}, unexpected {extra}; the store's sites are {list(self.sites)}"
            )
        n = len(rows["tokens"])
        rows = {name: np.full(n, fill) for name, fill in OPTIONAL_COLUMNS.items()} | rows
        out = {}
        for name, dt in TOKEN_COLUMNS.items():
            x = rows[name]
            x = np.array(x.detach().cpu() if torch.is_tensor(x) else x, dtype=dt)
            if x.shape != (n,):
                raise StoreError(f"{name} has shape {x.shape}, expected ({n},) like tokens")
            out[name] = x
        target = torch.bfloat16 if self.dtype == "bfloat16" else torch.float32
        for site, width in self.sites.items():
            x = rows[site]
            x = x.detach() if torch.is_tensor(x) else torch.from_numpy(np.asarray(x))
            if not x.is_floating_point() or tuple(x.shape) != (n, width):
                raise StoreError(f"site {site} rows are {x.dtype} {tuple(x.shape)}; expected float [{n}, {width}]")
            # Converting on the source device halves a GPU->CPU copy for bf16.
            out[site] = x.to(target).to("cpu", copy=True).contiguous()
        for name, (tail, dt) in self.router.items():
            out[name] = _router_rows(name, rows[name], (n, *tail), dt)
        return out

    def _work(self) -> None:
        while (rows := self._queue.get()) is not None:
            if self._error is None:  # after a failure keep draining so append() never blocks
                self._guard(self._ingest, rows)

    def _stop_worker(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _guard(self, step, *args) -> None:
        """Run a write step; a failure is kept and raised by the caller's next call."""
        try:
            step(*args)
        except Exception as err:
            self._error = err

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            err = self._error
            raise StoreError(
                f"writing shard {self.name} failed ({type(err).__name__}: {err}); its {self._committed} "
                f"committed rows remain readable: fix the cause and rerun to resume"
            ) from err

    def _ingest(self, rows: dict) -> None:
        n = len(rows["tokens"])
        input_index = self._seen + np.arange(n, dtype=np.int64)
        keep = np.ones(n, bool)
        for site in self.sites:
            x = rows[site]
            finite = torch.isfinite(x).all(dim=1).numpy()  # after the bf16 cast: overflow counts too
            self._dropped[site] = np.concatenate([self._dropped[site], input_index[~finite]])
            keep &= finite
            rows[site] = x.view(torch.int16).numpy().view(np.uint16) if x.dtype == torch.bfloat16 else x.numpy()
        kept = {name: column[keep] for name, column in rows.items()}
        # Input rows consumed once this row is committed: what a resume skips.
        kept["_consumed"] = input_index[keep] + 1
        self._buffer.append(kept)
        self._buffered_rows += int(keep.sum())
        self._seen += n
        whole = self._buffered_rows // self.chunk_rows * self.chunk_rows
        if whole:
            self._write_and_commit(whole)

    def _take(self, n: int) -> dict:
        """Remove the first n buffered rows and return them as one table."""
        table = {k: np.concatenate([b[k] for b in self._buffer]) for k in self._buffer[0]} if self._buffer else {}
        head = {k: v[:n] for k, v in table.items()}
        rest = {k: v[n:] for k, v in table.items()}
        self._buffer = [rest] if self._buffered_rows > n else []
        self._buffered_rows -= n
        return head

    def _write_and_commit(self, n: int, done: bool = False, replace_stats: dict | None = None) -> None:
        """Write the first n buffered rows after the committed ones, make them durable, commit.

        n is a whole number of chunks, except at finish(), so a committed chunk is never
        rewritten and a failed write can only touch chunks no manifest names.
        """
        rows = self._take(n)
        start, stop = self._committed, self._committed + n
        if n:
            for name, array in self._arrays.items():
                array.resize((stop, *array.shape[1:]))
                array[start:stop] = rows[name]
                self._crcs[name] += self._written_crcs(name, array, start, stop)
            if self.fsync:
                self._fsync_chunks(start, stop)
            self._crcs = commit_crcs(self.root, self.name, self._crcs, chunk_count(stop, self.chunk_rows), self.fsync)

        consumed = self._seen if done else int(rows["_consumed"][-1])
        stats = {}
        for site, old in self._stats.items():
            new = SiteStats.of_rows(decode(rows[site])) if n else SiteStats.zeros(len(old.sum))
            dropped = self._dropped[site]
            new.nonfinite_rows = int((dropped < consumed).sum())
            stats[site] = old + new
        stats = replace_stats or stats
        stats_json = {s: v.to_json() for s, v in stats.items()}
        manifest = json.dumps({"rows": stop, "consumed": consumed, "done": done, "stats": stats_json,
                               "crc32c": self._crcs}).encode()
        self._replace_manifest(manifest)

        self._committed, self._consumed, self._done, self._stats = stop, consumed, done, stats
        self._dropped = {s: d[d >= consumed] for s, d in self._dropped.items()}

    def _written_crcs(self, name: str, array: zarr.Array, start: int, stop: int) -> list[int]:
        """The crc32c of the chunks just stored for rows [start, stop), a whole number of chunks from
        the commit on, as zarr handed them to storage."""
        keys = [f"shards/{self.name}/{name}/{key}" for key in chunk_keys(array, start, stop)]
        missed = [key for key in keys if key not in self._zarr.written]
        if missed:
            raise StoreError(f"{missed[0]} was not written: zarr skipped a chunk this writer stored")
        return [self._zarr.written.pop(key) for key in keys]

    def _replace_manifest(self, manifest: bytes) -> None:
        """Commit: keep the last commit beside the manifest first, so a manifest torn after all
        (a filesystem without atomic rename, a killed copy) leaves readers a good one to read."""
        key = manifest_key(self.name)
        if self._last_commit is not None:
            self.root.write_atomically(key + PREVIOUS, self._last_commit, self.fsync)
        self.root.write_atomically(key, manifest, self.fsync)
        self._last_commit = manifest

    def _fsync_chunks(self, start: int, stop: int) -> None:
        """Make the new chunks, and the metadata that sizes their arrays, durable before the
        manifest names them (a manifest that outlives its rows after a power cut is the bug)."""
        shard = f"shards/{self.name}"
        keys = ["zarr.json", "shards/zarr.json", f"{shard}/zarr.json"]
        for name, array in self._arrays.items():
            keys.append(f"{shard}/{name}/zarr.json")
            keys += [f"{shard}/{name}/{key}" for key in chunk_keys(array, start, stop)]
        self.root.sync(keys)


def _router_rows(name: str, x, shape: tuple, stored: np.dtype) -> np.ndarray:
    """A router array's rows as stored: ids as int16, weights as bf16 bits."""
    x = x.detach() if torch.is_tensor(x) else torch.from_numpy(np.asarray(x))
    if tuple(x.shape) != shape:
        raise StoreError(f"{name} rows are {tuple(x.shape)}; expected {list(shape)}")
    if stored == np.int16:
        return x.to("cpu", torch.int16).numpy()
    return x.to(torch.bfloat16).to("cpu").contiguous().view(torch.int16).numpy().view(np.uint16)
