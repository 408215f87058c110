"""ActivationStore: the committed rows of every shard, read as one store."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NoReturn

import numpy as np
import zarr

from activations.store.format import (
    FORMAT, OPTIONAL_COLUMNS, TOKEN_COLUMNS, StoreError, array_problem, chunk_keys, decode, read_manifest,
    root_problem, router_columns, router_key, shard_name,
)
from activations.store.loader import shuffled_batches
from activations.store.chunks import is_plain, read_rows
from activations.store.positions import ChunkCrcs, CrcStore, MisplacedChunk, chunk_count
from activations.store.roots import LocalRoot, store_root
from activations.store.stats import SiteStats


def unreadable(err: Exception) -> str:
    """Why a chunk does not decode, in the codec's own words (its first line: zarr's run on)."""
    if isinstance(err, MisplacedChunk):
        return str(err)
    return f"unreadable ({type(err).__name__}: {(str(err).splitlines() or [''])[0]})"


@dataclass
class ShardRecord:
    """A shard as its manifest describes it."""

    name: str
    rows: int
    consumed: int
    done: bool
    offset: int  # global index of its first row
    stats: dict = field(default_factory=dict)
    torn: str | None = None  # why its newest manifest is not the one read (see read_manifest)
    crcs: ChunkCrcs | None = None  # what its manifest commits for each chunk; None: a format-1 store
    manifest: bool = True  # False: no manifest on storage (none committed yet, or it was deleted)


class ActivationStore:
    """Read-only view of the committed rows of every shard, in rank order.

    The view is a snapshot of the manifests when opened; open a new one to see later commits.
    `path` is a run directory or a store root, local or an fsspec URL (see store_root).
    """

    def __init__(self, path, storage_options: dict | None = None):
        self._records: dict[str, ShardRecord] = {}  # by name, once the manifests are read
        given = store_root(path, storage_options)
        inner = given.child("activations")
        self.root = inner if inner.read("zarr.json") is not None else given
        if self.root.read("zarr.json") is None:
            raise StoreError(f"no activation store at {path}: run `make harvest` first")
        self._group = self._open_group()
        attrs = dict(self._group.attrs)
        if attrs.get("format") != FORMAT:
            raise StoreError(f"{self.root} is a zarr group but not a Dialbox activation store: run `make harvest`")
        problem = root_problem(attrs)
        if problem:
            raise StoreError(f"{self.root}/zarr.json: {problem}: the store's root metadata is damaged; restore it "
                             "from a copy, or harvest again into another run_name")
        self.identity: dict = attrs["identity"]
        self.dtype: str = attrs["dtype"]
        self.chunk_rows: int = attrs["chunk_rows"]
        self.world_size: int = attrs["world_size"]
        self._widths: dict = attrs["sites"]
        self.origin: dict | None = attrs.get("origin")  # set on a merged store
        # Routed layers whose choices are stored: layer -> {"top_k", "n_experts", "hashed"}.
        self.router: dict[int, dict] = {int(layer): spec for layer, spec in attrs.get("router", {}).items()}
        self._arrays = {}
        self._plain_arrays = {}  # shard array key -> whether its chunk files are read directly
        self._shards = []
        offset = 0
        for rank in range(self.world_size):
            name = shard_name(rank, self.world_size)
            m, torn = read_manifest(self.root, name, self._widths)
            if m is None:
                self._shards.append(ShardRecord(name, 0, 0, False, offset, manifest=False))
                continue
            stats = {s: SiteStats.from_json(d) for s, d in m["stats"].items()}
            crcs = ChunkCrcs(self.root, name, chunk_count(m["rows"], self.chunk_rows), m.get("crc32c", {})) if (
                attrs["format_version"] > 1) else None
            self._shards.append(ShardRecord(name, m["rows"], m["consumed"], m["done"], offset, stats, torn, crcs))
            offset += m["rows"]
        self.n_tokens: int = offset
        self._records = {s.name: s for s in self._shards}

    def _open_group(self) -> zarr.Group:
        """The store's zarr group, every committed chunk read through it checked against its position."""
        try:
            return zarr.open_group(CrcStore(self.root.zarr_store(read_only=True), self._committed_crc), mode="r")
        except (ValueError, TypeError) as err:  # zarr's words for metadata it cannot parse
            raise StoreError(f"{self.root}/zarr.json does not load ({type(err).__name__}: {err}): the store's root "
                             "metadata is damaged; restore it from a copy, or harvest again into another run_name") from None

    def _committed_crc(self, shard: str, name: str, index: int) -> int | None:
        """The crc32c committed for a chunk; None for chunks past the commit and format-1 stores (unchecked)."""
        rec = self._records.get(shard)
        if rec is None or rec.crcs is None or index >= chunk_count(rec.rows, self.chunk_rows):
            return None
        value = rec.crcs.get(name, index)
        if value is None:
            raise MisplacedChunk("has no crc32c in its shard's manifest: the manifest is damaged")
        return value

    # -- description -----------------------------------------------------------------------

    @property
    def sites(self) -> list[str]:
        return list(self._widths)

    def width(self, site: str) -> int:
        self._check_site(site)
        return self._widths[site]

    def shape(self, site: str) -> tuple[int, int]:
        return (self.n_tokens, self.width(site))

    def columns(self) -> dict[str, tuple[tuple, np.dtype]]:
        """Every array of a shard: name -> (row shape, stored dtype)."""
        stored = np.uint16 if self.dtype == "bfloat16" else np.float32
        return ({name: ((), np.dtype(dt)) for name, dt in TOKEN_COLUMNS.items()}
                | {site: ((width,), np.dtype(stored)) for site, width in self._widths.items()}
                | router_columns(self.router))

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
        return decode(self._read(site, start, stop))

    def read_router(self, layer: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows [start, stop) of a routed layer: the chosen expert ids (int16 [n, top_k], heaviest
        first) and their gate weights as the router returned them (float32 from bf16)."""
        if layer not in self.router:
            held = f"route-captured layers {sorted(self.router)}" if self.router else "no router arrays"
            raise StoreError(f"layer {layer} is not route-captured in the store at {self.root} (it has {held}): "
                             f"harvest with harvest.router_layers=[{layer}]")
        return self._read(router_key(layer, "ids"), start, stop), decode(self._read(router_key(layer, "weights"), start, stop))

    def tokens(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Per-row columns: tokens, doc_ids, positions and windows (-1 where not recorded)."""
        return {name: self._read(name, start, stop) for name in TOKEN_COLUMNS}

    def read_shard(self, shard: str, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of one shard's column or site as stored (bf16 as uint16 bits): for
        tools that walk the shards themselves. Every read of the store comes through here.

        Committed rows are checked: a chunk that is missing (zarr would read it as zeros), cut
        short or fails its crc32c raises StoreError naming it. Rows past the commit are read
        as they are, unchecked."""
        array = self.shard_array(shard, name)
        if array is None:
            return np.full(stop - start, OPTIONAL_COLUMNS[name], TOKEN_COLUMNS[name])
        committed = self._records[shard].rows
        self._check_present(shard, name, array, start, min(stop, committed))
        try:
            if stop <= committed and self._plain(shard, name, array):
                folder = self.root.path / "shards" / shard / name
                return read_rows(folder, array, start, stop, lambda index: self._committed_crc(shard, name, index))
            return array[start:stop]
        except ValueError:  # crc32c, the outermost codec, refuses a chunk that was cut or changed
            self._name_unreadable(shard, name, array, start, stop)
            raise  # no single chunk fails: not the store's bytes, so zarr's own error stands

    def _plain(self, shard: str, name: str, array: zarr.Array) -> bool:
        """Whether the array's committed chunks can be read from their files (see chunks.py)."""
        key = f"shards/{shard}/{name}"
        if key not in self._plain_arrays:
            self._plain_arrays[key] = isinstance(self.root, LocalRoot) and is_plain(array)
        return self._plain_arrays[key]

    def _check_present(self, shard: str, name: str, array: zarr.Array, start: int, stop: int) -> None:
        """Committed rows [start, stop) must be on storage: zarr reads a missing chunk as zeros."""
        if start >= stop:
            return
        committed = self._records[shard].rows
        if array.shape[0] < stop:
            self._damaged(shard, name, array.shape[0], committed,
                          f"array has {array.shape[0]} rows, the manifest commits {committed}")
        missing = self.missing_chunks(shard, name, start, stop)
        if missing:
            index, reason = next(iter(missing.items()))
            self._damaged(shard, name, *self._chunk_rows(shard, index), reason)

    def missing_chunks(self, shard: str, name: str, start: int, stop: int) -> dict[int, str]:
        """The chunks holding rows [start, stop) of a shard's array that are not files on storage, by
        index, with why (missing, or something else in the chunk's place)."""
        keys = chunk_keys(self.shard_array(shard, name), start, stop)
        absent = self.root.missing(f"shards/{shard}/{name}/", keys)
        first = start // self.chunk_rows
        return {first + i: absent[key] for i, key in enumerate(keys) if key in absent}

    def _name_unreadable(self, shard: str, name: str, array: zarr.Array, start: int, stop: int) -> None:
        """Raise StoreError naming the first chunk of rows [start, stop) that does not decode."""
        c = self.chunk_rows
        for index in range(start // c, -(-stop // c)):
            try:
                array[max(index * c, start) : min(index * c + c, stop)]
            except ValueError as err:
                self._damaged(shard, name, *self._chunk_rows(shard, index), unreadable(err))

    def _chunk_rows(self, shard: str, index: int) -> tuple[int, int]:
        """The committed rows of a shard's chunk."""
        lo = index * self.chunk_rows
        return lo, min(lo + self.chunk_rows, self._records[shard].rows)

    def _damaged(self, shard: str, name: str, lo: int, hi: int, reason: str) -> NoReturn:
        """Refuse to read rows that are committed but not there as written (verify's words)."""
        raise StoreError(f"{name} rows [{lo}, {hi}) in shard {shard}: {reason}; the store is damaged: run "
                         f"`python -m pipeline.store verify {self.root}` to list every damaged chunk")

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
        tail, dtype = self.columns()[name]
        return np.zeros((0, *tail), dtype)

    def shard_array(self, shard: str, name: str) -> zarr.Array | None:
        """One shard's zarr array, once its metadata is checked against the store's format; None for
        an optional column the store predates."""
        key = f"shards/{shard}/{name}"
        if key not in self._arrays:
            array, problem = self.open_array(shard, name)
            if problem:
                self._damaged(shard, name, 0, self._records[shard].rows, problem)
            self._arrays[key] = array
        return self._arrays[key]

    def open_array(self, shard: str, name: str) -> tuple[zarr.Array | None, str | None]:
        """A shard's zarr array and what is wrong with its metadata, if anything (verify's words)."""
        key = f"shards/{shard}/{name}"
        try:
            array = self._group[key]
        except KeyError:
            return None, None if name in OPTIONAL_COLUMNS else "array missing"
        except (ValueError, TypeError) as err:  # zarr's words for metadata it cannot parse
            return None, f"{self.root}/{key}/zarr.json does not load ({type(err).__name__}: {(str(err).splitlines() or [''])[0]})"
        tail, dtype = self.columns()[name]
        return array, array_problem(array, tail, dtype, self.chunk_rows)

    def unmanifested(self) -> dict[str, int]:
        """Shards with no manifest whose arrays hold rows, and how many: a deleted manifest, or a writer
        that died before its first commit. Their rows are not read."""
        written = {}
        for rec in self._shards:
            if not rec.manifest:
                array, problem = self.open_array(rec.name, "tokens")
                if array is not None and not problem and array.shape[0]:
                    written[rec.name] = array.shape[0]
        return written

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
        stop_row: int | None = None, workers: int = 2, pin_memory: bool = False,
    ):
        """One epoch of shuffled batches: dicts site -> tensor [batch_size, width] in the store's
        dtype (bfloat16 or float32; converting on the consumer's device halves the bytes moved).

        Chunks are visited in a seeded random order, read whole, and their rows shuffled
        within windows of `shuffle_chunks` chunks. The same seed gives the same batches;
        `start_batch=k` gives the batches from the k-th on without reading the windows
        before it. Use seed + epoch for a new order each epoch. `stop_row` leaves out the rows
        from that global index on (a held-out tail). `workers` threads read windows ahead of the
        consumer; `pin_memory` puts batches in page-locked memory for fast copies to a GPU
        (activations/store/loader.py).
        """
        sites = [sites] if isinstance(sites, str) else list(sites)
        for site in sites:
            self._check_site(site)
        if batch_size < 1 or shuffle_chunks < 1 or start_batch < 0:
            raise StoreError("iter_batches needs batch_size >= 1, shuffle_chunks >= 1 and start_batch >= 0")
        return shuffled_batches(self, sites, batch_size, seed, start_batch, shuffle_chunks, drop_last, stop_row,
                                workers, pin_memory)
