"""The activation store: a zarr v3 group of token rows, written by many shards, read as one.

Layout under the store root (`<run_dir>/activations/`):

    zarr.json                        root group; attrs = the store's identity and layout
    shards/r00000-of-00002/          one group per writer: tokens, doc_ids, positions, windows
                                     (the corpus window of each row, -1 if unknown) and one
                                     [rows, width] array per site (e.g. "L15.resid_post")
    manifests/r00000-of-00002.json   that shard's commit record, replaced atomically

A writer only ever writes whole chunks past its last commit, makes them durable, then
replaces its manifest. The manifest is the only thing readers trust: rows past it do not
exist, so a killed writer leaves nothing half-written behind and resumes from its manifest.
Every chunk carries a crc32c checksum, so `python -m pipeline.store verify` finds flipped bits.

zarr has no bfloat16, so bf16 rows are stored as their uint16 bit pattern (exact) with
`logical_dtype: bfloat16` in the array attributes; readers always get float32.

The root may be a local directory or an fsspec URL such as `s3://bucket/run/activations`
(storage options from the caller, else JSON in $DIALBOX_STORAGE_OPTIONS). Locally a manifest
is replaced with fsync and rename and a shard is flock-ed while open; on object storage a
manifest is one PUT, which S3 makes atomic, chunks are durable once their PUT returns, and
there is no lock: one writer per shard rests on every writer having its own harvest.rank.
"""

from __future__ import annotations

import fcntl
import json
import os
import queue
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import fsspec
import numpy as np
import torch
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.errors import ContainsGroupError
from zarr.storage import FsspecStore

from pipeline.sites import Site, SiteError

FORMAT = "dialbox-activations"
FORMAT_VERSION = 1
DTYPES = ("bfloat16", "float32")
TOKEN_COLUMNS = {"tokens": np.int32, "doc_ids": np.int64, "positions": np.int32, "windows": np.int64}
# Columns a writer may be given without: stores written before they existed read them as this.
OPTIONAL_COLUMNS = {"windows": -1}
STORAGE_OPTIONS_ENV = "DIALBOX_STORAGE_OPTIONS"


class StoreError(RuntimeError):
    """A store that is missing, mismatched, incomplete or failed to write."""


def shard_name(rank: int, world_size: int) -> str:
    return f"r{rank:05d}-of-{world_size:05d}"


# ----------------------------------------------------------------------------------------
# Statistics


@dataclass
class SiteStats:
    """Running sums over the committed rows of one site; shards merge by adding."""

    count: int
    sum: np.ndarray  # float64 [width], for the mean vector
    norm_sum: float = 0.0
    max_norm: float = 0.0
    nonfinite_rows: int = 0

    @classmethod
    def zeros(cls, width: int) -> "SiteStats":
        return cls(0, np.zeros(width, np.float64))

    @classmethod
    def of_rows(cls, x: np.ndarray) -> "SiteStats":
        # Sum in float64 without a float64 copy of the rows; float32 squares of bf16-range
        # "massive activations" would overflow.
        norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
        total = np.add.reduce(x, axis=0, dtype=np.float64)
        return cls(len(x), total, float(norms.sum()), float(norms.max(initial=0.0)))

    def __add__(self, other: "SiteStats") -> "SiteStats":
        return SiteStats(
            self.count + other.count,
            self.sum + other.sum,
            self.norm_sum + other.norm_sum,
            max(self.max_norm, other.max_norm),
            self.nonfinite_rows + other.nonfinite_rows,
        )

    def to_json(self) -> dict:
        return {
            "count": self.count,
            "sum": self.sum.tolist(),
            "norm_sum": self.norm_sum,
            "max_norm": self.max_norm,
            "nonfinite_rows": self.nonfinite_rows,
        }

    @classmethod
    def from_json(cls, d: dict) -> "SiteStats":
        return cls(d["count"], np.asarray(d["sum"], np.float64), d["norm_sum"], d["max_norm"], d["nonfinite_rows"])

    def summary(self) -> dict:
        """What the trainer and reports use. outlier_ratio = ||mean row|| / mean row norm:
        near 1 when one direction dominates every row (a constant offset), near 0 when centred."""
        mean = self.sum / max(self.count, 1)
        mean_norm = self.norm_sum / max(self.count, 1)
        return {
            "count": self.count,
            "mean": mean.astype(np.float32),
            "mean_norm": mean_norm,
            "max_norm": self.max_norm,
            "outlier_ratio": float(np.linalg.norm(mean)) / mean_norm if mean_norm > 0 else 0.0,
            "nonfinite_rows": self.nonfinite_rows,
        }


# ----------------------------------------------------------------------------------------
# Small helpers shared by writer and reader


def _decode(stored: np.ndarray) -> np.ndarray:
    """Stored rows to float32: uint16 holds bfloat16 bits, the high half of a float32."""
    if stored.dtype == np.uint16:
        return (stored.astype(np.uint32) << 16).view(np.float32)
    return stored.astype(np.float32, copy=False)


def as_tensor(stored: np.ndarray) -> torch.Tensor:
    """Stored rows as a tensor without a copy: uint16 bits become a bfloat16 view."""
    if stored.dtype == np.uint16:
        return torch.from_numpy(np.ascontiguousarray(stored).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(stored)


def _read_manifest(root, name: str) -> dict | None:
    key = f"manifests/{name}.json"
    data = root.read(key)
    if data is None:
        return None
    try:
        return json.loads(data)
    except json.JSONDecodeError as err:
        raise StoreError(f"{root}/{key} is not valid JSON ({err}): restore it, or delete it and rerun "
                         "that writer to redo the shard") from None


def _describe(settings: dict, keys) -> str:
    def show(value):
        return json.dumps(value, separators=(",", ":")) if isinstance(value, (dict, list)) else str(value)

    return ", ".join(f"{k}={show(settings.get(k))}" for k in keys)


def _check_same(root, stored: dict, wanted: dict) -> None:
    """Refuse to mix rows of different models, sites or dtypes in one store."""
    if stored.get("format") != FORMAT:
        raise StoreError(f"{root} is a zarr group but not a Dialbox activation store: use another run_name")
    if stored.get("format_version") != FORMAT_VERSION:
        raise StoreError(
            f"store at {root} has format version {stored.get('format_version')}, this code writes "
            f"{FORMAT_VERSION}: use another run_name"
        )
    layout = ("dtype", "sites", "world_size", "origin")
    flat_stored = {**stored["identity"], **{k: stored.get(k) for k in layout}}
    flat_wanted = {**wanted["identity"], **{k: wanted.get(k) for k in layout}}
    differ = [k for k in {**flat_stored, **flat_wanted} if flat_stored.get(k) != flat_wanted.get(k)]
    if differ:
        raise StoreError(
            f"store at {root} was harvested with {_describe(flat_stored, differ)}; "
            f"this run has {_describe(flat_wanted, differ)}: use another run_name"
        )


# ----------------------------------------------------------------------------------------
# Where a store lives: a local directory or an fsspec URL, behind one small interface


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _LocalRoot:
    """A store in a local directory: manifests replaced by rename, fsync on request, flock."""

    def __init__(self, path):
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    def child(self, name: str) -> "_LocalRoot":
        return _LocalRoot(self.path / name)

    def zarr_store(self, read_only: bool):
        return self.path  # zarr opens a LocalStore on it, creating directories as needed

    def read(self, key: str) -> bytes | None:
        try:
            return (self.path / key).read_bytes()
        except FileNotFoundError:
            return None

    def write_atomically(self, key: str, data: bytes, fsync: bool) -> None:
        """Readers see the old file or the new one, never a torn one, even if the disk fills."""
        path = self.path / key
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                if fsync:
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if fsync:
            _fsync(path.parent)

    def lock(self, key: str, shard: str):
        """An exclusive lock held while a writer has the shard open (the OS drops it if we die):
        a second writer would throw away the first one's uncommitted rows."""
        path = self.path / key
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise StoreError(f"shard {shard} is being written by another process: wait for it, or give this "
                             "writer another harvest.rank") from None
        return handle

    def sync(self, keys) -> None:
        """fsync the files and every directory between them and the root: a new file survives a
        power cut only once the directory naming it does."""
        files = [self.path / k for k in keys]
        dirs = set()
        for f in files:
            d = f.parent
            while d != self.path:
                dirs.add(d)
                d = d.parent
        for path in [*files, *sorted(dirs), self.path]:
            _fsync(path)

    def sizes(self, prefix: str = "") -> dict[str, int]:
        """Bytes of every file under `prefix`, by key."""
        out = {}
        for folder, _, names in os.walk(self.path / prefix):
            for name in names:
                path = Path(folder) / name
                out[path.relative_to(self.path).as_posix()] = path.stat().st_size
        return out


class _NoLock:
    def close(self) -> None:
        pass


class _RemoteRoot:
    """A store behind an fsspec URL (s3://, gs://, memory://, ...): every object is written by
    one PUT, which is atomic and durable once it returns, so there is nothing to fsync."""

    def __init__(self, url: str, storage_options: dict):
        self.url = url.rstrip("/")
        self.options = storage_options
        try:
            self.fs, self.path = fsspec.core.url_to_fs(self.url, **storage_options)
        except (ImportError, ValueError) as err:
            raise StoreError(f"cannot open {self.url}: {err}") from None

    def __str__(self) -> str:
        return self.url

    def child(self, name: str) -> "_RemoteRoot":
        return _RemoteRoot(f"{self.url}/{name}", self.options)

    def zarr_store(self, read_only: bool):
        return FsspecStore.from_url(self.url, storage_options=self.options, read_only=read_only)

    def read(self, key: str) -> bytes | None:
        try:
            return self.fs.cat_file(f"{self.path}/{key}")
        except FileNotFoundError:
            return None

    def write_atomically(self, key: str, data: bytes, fsync: bool) -> None:
        self.fs.pipe_file(f"{self.path}/{key}", data)

    def lock(self, key: str, shard: str) -> _NoLock:
        return _NoLock()  # object stores have no locks; harvest.rank keeps writers apart

    def sync(self, keys) -> None:
        pass

    def sizes(self, prefix: str = "") -> dict[str, int]:
        self.fs.invalidate_cache()  # a listing cached earlier would miss new chunks
        found = self.fs.find(f"{self.path}/{prefix}".rstrip("/"), detail=True)
        return {key[len(self.path) + 1 :]: info["size"] for key, info in found.items()}


def store_root(path, storage_options: dict | None = None):
    """Where a store lives: a local path, or a URL with fsspec storage options (by default the
    JSON object in $DIALBOX_STORAGE_OPTIONS; s3fs also reads the usual AWS_* variables)."""
    if isinstance(path, (_LocalRoot, _RemoteRoot)):
        return path
    text = str(path)
    if fsspec.utils.get_protocol(text) in ("file", "local"):
        return _LocalRoot(text.removeprefix("file://"))
    if storage_options is None:
        try:
            storage_options = json.loads(os.environ.get(STORAGE_OPTIONS_ENV) or "{}")
        except json.JSONDecodeError as err:
            raise StoreError(f"${STORAGE_OPTIONS_ENV} is not JSON ({err}): give an object such as "
                             '{"endpoint_url": "http://host:9000"}') from None
    return _RemoteRoot(text, storage_options)


# ----------------------------------------------------------------------------------------
# Writer


class ShardWriter:
    """Appends token rows to one shard of the store and commits them chunk by chunk.

    `consumed` is the number of input rows (dropped non-finite rows included) behind the
    committed rows: a resumed harvest skips that many input rows and appends the rest.
    One writer per shard at a time; opening a shard throws away its uncommitted rows.
    `root` is a local path or an fsspec URL (see store_root); `origin`, recorded in the root's
    attributes, says where a store that was not harvested (a merge) came from.
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
        } | ({"origin": json.loads(json.dumps(origin))} if origin else {})
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
        try:
            group = zarr.open_group(self.root.zarr_store(read_only=False), mode="a", attributes=settings)
        except ContainsGroupError:  # another shard's writer created it a moment ago
            group = zarr.open_group(self.root.zarr_store(read_only=False), mode="r+")
        _check_same(self.root, dict(group.attrs), settings)
        return group

    def _open_arrays(self, shard: zarr.Group, compression: str | None) -> dict:
        columns = {name: ((), np.dtype(dt)) for name, dt in TOKEN_COLUMNS.items()}
        stored = np.uint16 if self.dtype == "bfloat16" else np.float32
        columns |= {site: ((width,), np.dtype(stored)) for site, width in self.sites.items()}
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
                    attributes={"logical_dtype": self.dtype} if tail else {},
                )
            # Write every chunk as a file even if all zeros, so fsync finds what it expects.
            arrays[name] = array.with_config({"write_empty_chunks": True})
        return arrays

    def _resume(self) -> None:
        manifest = _read_manifest(self.root, self.name) or {"rows": 0, "consumed": 0, "done": False, "stats": {}}
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
        missing = [k for k in [*TOKEN_COLUMNS, *self.sites] if k not in rows and k not in OPTIONAL_COLUMNS]
        extra = [k for k in rows if k not in TOKEN_COLUMNS and k not in self.sites]
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
            if self.fsync:
                self._fsync_chunks(start, stop)

        consumed = self._seen if done else int(rows["_consumed"][-1])
        stats = {}
        for site, old in self._stats.items():
            new = SiteStats.of_rows(_decode(rows[site])) if n else SiteStats.zeros(len(old.sum))
            dropped = self._dropped[site]
            new.nonfinite_rows = int((dropped < consumed).sum())
            stats[site] = old + new
        stats = replace_stats or stats
        stats_json = {s: v.to_json() for s, v in stats.items()}
        manifest = {"rows": stop, "consumed": consumed, "done": done, "stats": stats_json}
        self.root.write_atomically(f"manifests/{self.name}.json", json.dumps(manifest).encode(), self.fsync)

        self._committed, self._consumed, self._done, self._stats = stop, consumed, done, stats
        self._dropped = {s: d[d >= consumed] for s, d in self._dropped.items()}

    def _fsync_chunks(self, start: int, stop: int) -> None:
        """Make the new chunks, and the metadata that sizes their arrays, durable before the
        manifest names them (a manifest that outlives its rows after a power cut is the bug)."""
        shard = f"shards/{self.name}"
        keys = ["zarr.json", "shards/zarr.json", f"{shard}/zarr.json"]
        for name, array in self._arrays.items():
            keys.append(f"{shard}/{name}/zarr.json")
            keys += [f"{shard}/{name}/{key}" for key in chunk_keys(array, start, stop)]
        self.root.sync(keys)


def chunk_keys(array: zarr.Array, start: int, stop: int) -> list[str]:
    """Keys (relative to the array) of the chunks that hold rows [start, stop)."""
    rows, tail = array.chunks[0], (0,) * (array.ndim - 1)
    return [array.metadata.encode_chunk_key((i, *tail)) for i in range(start // rows, -(-stop // rows))]


# ----------------------------------------------------------------------------------------
# Reader


@dataclass
class ShardRecord:
    """A shard as its manifest describes it."""

    name: str
    rows: int
    consumed: int
    done: bool
    offset: int  # global index of its first row
    stats: dict = field(default_factory=dict)


class ActivationStore:
    """Read-only view of the committed rows of every shard, in rank order.

    The view is a snapshot of the manifests when opened; open a new one to see later commits.
    `path` is a run directory or a store root, local or an fsspec URL (see store_root).
    """

    def __init__(self, path, storage_options: dict | None = None):
        given = store_root(path, storage_options)
        inner = given.child("activations")
        self.root = inner if inner.read("zarr.json") is not None else given
        if self.root.read("zarr.json") is None:
            raise StoreError(f"no activation store at {path}: run `make harvest` first")
        self._group = zarr.open_group(self.root.zarr_store(read_only=True), mode="r")
        attrs = dict(self._group.attrs)
        if attrs.get("format") != FORMAT:
            raise StoreError(f"{self.root} is a zarr group but not a Dialbox activation store: run `make harvest`")
        self.identity: dict = attrs["identity"]
        self.dtype: str = attrs["dtype"]
        self.chunk_rows: int = attrs["chunk_rows"]
        self.world_size: int = attrs["world_size"]
        self._widths: dict = attrs["sites"]
        self.origin: dict | None = attrs.get("origin")  # set on a merged store
        self._arrays = {}
        self._shards = []
        offset = 0
        for rank in range(self.world_size):
            name = shard_name(rank, self.world_size)
            m = _read_manifest(self.root, name)
            if m is None:
                self._shards.append(ShardRecord(name, 0, 0, False, offset))
                continue
            stats = {s: SiteStats.from_json(d) for s, d in m["stats"].items()}
            self._shards.append(ShardRecord(name, m["rows"], m["consumed"], m["done"], offset, stats))
            offset += m["rows"]
        self.n_tokens: int = offset

    # -- description -----------------------------------------------------------------------

    @property
    def sites(self) -> list[str]:
        return list(self._widths)

    def width(self, site: str) -> int:
        self._check_site(site)
        return self._widths[site]

    def shape(self, site: str) -> tuple[int, int]:
        return (self.n_tokens, self.width(site))

    @property
    def shards(self) -> list[tuple[str, int, int, bool]]:
        """(name, committed rows, input rows consumed, done) of every shard, in rank order."""
        return [(s.name, s.rows, s.consumed, s.done) for s in self._shards]

    @property
    def shard_records(self) -> list[ShardRecord]:
        return list(self._shards)

    def shard_groups(self) -> list[str]:
        """Names of the shard groups on storage, whichever writers made them."""
        return sorted(self._group["shards"].group_keys()) if "shards" in self._group else []

    @property
    def complete(self) -> bool:
        return all(s.done for s in self._shards)

    def stats(self, site: str) -> dict:
        """Statistics of the committed rows of a site over all shards (see SiteStats.summary)."""
        return self.site_stats(site).summary()

    def site_stats(self, site: str) -> SiteStats:
        """The running sums behind stats(), over all shards."""
        total = SiteStats.zeros(self.width(site))
        for s in self._shards:
            if site in s.stats:
                total = total + s.stats[site]
        return total

    # -- random access ---------------------------------------------------------------------

    def read(self, site: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a site as float32 [stop - start, width]."""
        self._check_site(site)
        return _decode(self._read(site, start, stop))

    def tokens(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Per-row columns: tokens, doc_ids, positions and windows (-1 where not recorded)."""
        return {name: self._read(name, start, stop) for name in TOKEN_COLUMNS}

    def read_shard(self, shard: str, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of one shard's column or site as stored (bf16 as uint16 bits),
        committed or not: for tools that walk the shards themselves."""
        array = self.shard_array(shard, name)
        if array is None:
            return np.full(stop - start, OPTIONAL_COLUMNS[name], TOKEN_COLUMNS[name])
        return array[start:stop]

    def context(self, index: int, before: int = 16, after: int = 8) -> tuple[np.ndarray, int]:
        """Token ids around row `index`, within its document: (ids, offset of index in ids)."""
        self._check_range(index, index + 1)
        shard = next(s for s in reversed(self._shards) if s.offset <= index and s.rows)
        lo = max(index - before, shard.offset)  # a document never spans two shards
        hi = min(index + after + 1, shard.offset + shard.rows)
        rows = self.tokens(lo, hi)
        same_doc = rows["doc_ids"] == rows["doc_ids"][index - lo]
        first = last = index - lo
        while first > 0 and same_doc[first - 1]:
            first -= 1
        while last + 1 < len(same_doc) and same_doc[last + 1]:
            last += 1
        return rows["tokens"][first : last + 1], index - lo - first

    def _read(self, name: str, start: int, stop: int) -> np.ndarray:
        self._check_range(start, stop)
        pieces = []
        for s in self._shards:
            lo, hi = max(start, s.offset), min(stop, s.offset + s.rows)
            if lo < hi:
                pieces.append(self.read_shard(s.name, name, lo - s.offset, hi - s.offset))
        if pieces:
            return np.concatenate(pieces)
        if name in TOKEN_COLUMNS:
            return np.zeros(0, TOKEN_COLUMNS[name])
        return np.zeros((0, self._widths[name]), np.uint16 if self.dtype == "bfloat16" else np.float32)

    def shard_array(self, shard: str, name: str) -> zarr.Array | None:
        """One shard's zarr array; None for an optional column the store predates."""
        key = f"shards/{shard}/{name}"
        if key not in self._arrays:
            try:
                self._arrays[key] = self._group[key]
            except KeyError:
                if name not in OPTIONAL_COLUMNS:
                    raise StoreError(f"{self.root}/{key} is missing: the store is damaged; run "
                                     "`python -m pipeline.store verify` on it") from None
                self._arrays[key] = None
        return self._arrays[key]

    def _check_site(self, site: str) -> None:
        if site not in self._widths:
            raise StoreError(f"site {site} is not in the store at {self.root}: it has {', '.join(self._widths)}")

    def _check_range(self, start: int, stop: int) -> None:
        if not 0 <= start <= stop <= self.n_tokens:
            raise StoreError(
                f"rows [{start}, {stop}) out of range: the store at {self.root} has {self.n_tokens} committed rows"
            )

    # -- training stream -------------------------------------------------------------------

    def iter_batches(
        self, sites, batch_size: int, seed: int = 0, start_batch: int = 0, shuffle_chunks: int = 8, drop_last: bool = True,
        stop_row: int | None = None,
    ):
        """One epoch of shuffled batches: dicts site -> tensor [batch_size, width] in the store's
        dtype (bfloat16 or float32; converting on the consumer's device halves the bytes moved).

        Chunks are visited in a seeded random order, read whole, and their rows shuffled
        within windows of `shuffle_chunks` chunks. The same seed gives the same batches;
        `start_batch=k` gives the batches from the k-th on without reading the windows
        before it. Use seed + epoch for a new order each epoch. `stop_row` leaves out the rows
        from that global index on (a held-out tail).
        """
        sites = [sites] if isinstance(sites, str) else list(sites)
        for site in sites:
            self._check_site(site)
        if batch_size < 1 or shuffle_chunks < 1 or start_batch < 0:
            raise StoreError("iter_batches needs batch_size >= 1, shuffle_chunks >= 1 and start_batch >= 0")
        batches = self._batches(sites, batch_size, seed, start_batch, shuffle_chunks, drop_last,
                                self.n_tokens if stop_row is None else stop_row)
        return _prefetch(batches, depth=4)

    def _batches(self, sites, batch_size, seed, start_batch, shuffle_chunks, drop_last, stop_row):
        chunks = [
            (s.name, start, min(start + self.chunk_rows, s.rows, stop_row - s.offset))
            for s in self._shards
            for start in range(0, min(s.rows, stop_row - s.offset), self.chunk_rows)
        ]
        order = np.random.default_rng(seed).permutation(len(chunks))
        skip = start_batch * batch_size  # rows of the stream before the first batch wanted
        carry = None  # rows left over from the previous window, fewer than a batch
        for w in range(0, len(order), shuffle_chunks):
            window = [chunks[i] for i in order[w : w + shuffle_chunks]]
            n = sum(stop - start for _, start, stop in window)
            if skip >= n:
                skip -= n
                continue
            # Each window has its own generator, so skipping windows leaves later ones unchanged.
            perm = np.random.default_rng([seed, w]).permutation(n)[skip:]
            skip = 0
            rows = {}
            for site in sites:
                whole = np.concatenate([self.read_shard(shard, site, start, stop) for shard, start, stop in window])
                rows[site] = whole[perm]
                if carry is not None:
                    rows[site] = np.concatenate([carry[site], rows[site]])
            m = len(rows[sites[0]])
            full = m - m % batch_size
            for i in range(0, full, batch_size):
                yield {site: as_tensor(rows[site][i : i + batch_size]) for site in sites}
            carry = {site: rows[site][full:] for site in sites}
        if carry is not None and len(carry[sites[0]]) and not drop_last:
            yield {site: as_tensor(carry[site]) for site in sites}


def _prefetch(items, depth: int):
    """Run a generator on a background thread, `depth` items ahead of the consumer."""
    q = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(item) -> bool:
        """Wait for room, unless the consumer has gone away."""
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce():
        try:
            for item in items:
                if not put(item):
                    return
            put(end)
        except Exception as err:  # hand the error to the consumer
            put(err)

    thread = threading.Thread(target=produce, name="store-prefetch", daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not end:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


if __name__ == "__main__":  # python -m pipeline.store info|verify|merge ...
    from pipeline.storetool import main

    sys.exit(main())
