"""`python -m pipeline.store info|verify|merge`: look into, check and consolidate activation stores.

    python -m pipeline.store info runs/demo [--json]
    python -m pipeline.store verify s3://bucket/big/activations
    python -m pipeline.store merge runs/big runs/big-merged/activations --order windows

A path is a run directory or a store root, local or an fsspec URL; a URL's storage options come
from --storage-options (JSON) or $DIALBOX_STORAGE_OPTIONS. Bad input is one line on stderr and
exit code 2; verify exits 1 when it finds damage, naming each damaged row range.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from pipeline.rundir import one_line_errors
from pipeline.store import (
    TOKEN_COLUMNS,
    ActivationStore,
    ShardRecord,
    ShardWriter,
    StoreError,
    as_tensor,
    chunk_keys,
    shard_name,
    store_root,
)

BLOCK_BYTES = 32 << 20  # rows read at once per shard: large reads, bounded memory
ORDERS = ("ranks", "windows")


def _row_bytes(store: ActivationStore) -> int:
    """Bytes of one row over all columns (the token columns take 24)."""
    token_bytes = sum(np.dtype(dt).itemsize for dt in TOKEN_COLUMNS.values())
    return token_bytes + sum(store.width(s) for s in store.sites) * (2 if store.dtype == "bfloat16" else 4)


def _block_rows(store: ActivationStore) -> int:
    """Whole chunks worth about BLOCK_BYTES over all columns."""
    return max(1, BLOCK_BYTES // _row_bytes(store) // store.chunk_rows) * store.chunk_rows


def _blocks(start: int, stop: int, size: int):
    for lo in range(start, stop, size):
        yield lo, min(lo + size, stop)


def _columns(store: ActivationStore) -> list[str]:
    return [*TOKEN_COLUMNS, *store.sites]


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


# ----------------------------------------------------------------------------------------
# info


def describe(store: ActivationStore) -> dict:
    """Everything `info` shows, as plain data."""
    sizes = store.root.sizes()

    def bytes_under(prefix: str) -> int:
        return sum(size for key, size in sizes.items() if key.startswith(prefix))

    shards = []
    for rec in store.shard_records:
        written = _written_rows(store, rec)
        shards.append({"name": rec.name, "rows": rec.rows, "consumed": rec.consumed, "done": rec.done,
                       "uncommitted_rows": max(written - rec.rows, 0), "bytes": bytes_under(f"shards/{rec.name}/")})
    sites = {site: {"width": store.width(site),
                    "bytes": sum(bytes_under(f"shards/{rec.name}/{site}/") for rec in store.shard_records)}
             for site in store.sites}
    return {
        "store": str(store.root), "identity": store.identity, "origin": store.origin, "dtype": store.dtype,
        "chunk_rows": store.chunk_rows, "codecs": _codecs(store), "world_size": store.world_size,
        "tokens": store.n_tokens, "complete": store.complete, "sites": sites, "shards": shards,
        "bytes": sum(sizes.values()),
    }


def _written_rows(store: ActivationStore, rec: ShardRecord) -> int:
    """Rows a shard's writer has put down, committed or not (0 before it starts)."""
    try:
        return store.shard_array(rec.name, "tokens").shape[0]
    except StoreError:
        return 0


def _codecs(store: ActivationStore) -> list[str]:
    for rec in store.shard_records:
        try:
            array = store.shard_array(rec.name, store.sites[0])
        except StoreError:
            continue
        return [codec.to_dict()["name"] for codec in array.metadata.codecs]
    return []


def format_info(d: dict) -> str:
    identity = " ".join(f"{k}={v}" for k, v in d["identity"].items())
    writing = ", ".join(f"{s['name']} ({s['uncommitted_rows']} rows written past its commit)"
                        for s in d["shards"] if not s["done"])
    lines = [
        f"store     {d['store']}",
        f"identity  {identity}",
        *([f"origin    {json.dumps(d['origin'])}"] if d["origin"] else []),
        f"layout    {d['dtype']}, {d['chunk_rows']} rows per chunk, codecs {'+'.join(d['codecs']) or '-'}, "
        f"{d['world_size']} shard(s)",
        f"tokens    {d['tokens']} committed; " + ("complete" if d["complete"] else f"still being written: {writing}"),
        f"bytes     {_size(d['bytes'])} on storage",
        "",
        f"{'site':<20} {'width':>7} {'bytes':>12}",
        *(f"{site:<20} {s['width']:>7} {_size(s['bytes']):>12}" for site, s in d["sites"].items()),
        "",
        f"{'shard':<20} {'rows':>12} {'consumed':>12} {'done':>5} {'bytes':>12}",
        *(f"{s['name']:<20} {s['rows']:>12} {s['consumed']:>12} {str(s['done']).lower():>5} {_size(s['bytes']):>12}"
          for s in d["shards"]),
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# verify


@dataclass
class _WindowSpan:
    """Where one corpus window's rows sit, and the documents they come from."""

    rank: int
    first_doc: int
    last_doc: int


@dataclass
class _ShardCheck:
    """Walks one shard's committed rows block by block and collects what is wrong with them."""

    store: ActivationStore
    rank: int
    rec: ShardRecord
    windows: dict  # window index -> _WindowSpan, over all shards
    problems: list = field(default_factory=list)
    last: dict = field(default_factory=dict)  # the previous block's last row, per column

    def problem(self, name: str, lo: int, hi: int, reason: str) -> None:
        self.problems.append(f"{name} rows [{lo}, {hi}) in shard {self.rec.name}: {reason}")

    def chunk_of(self, row: int) -> tuple[int, int]:
        c = self.store.chunk_rows
        return row // c * c, min(row // c * c + c, self.rec.rows)

    def run(self, bar: tqdm) -> list[str]:
        if not self.rec.rows:  # nothing committed, nothing to check (its writer may not have started)
            return []
        arrays = self.arrays()
        if arrays is None:
            return self.problems
        missing = {name: self.missing_chunks(name, array) for name, array in arrays.items()}
        for lo, hi in _blocks(0, self.rec.rows, _block_rows(self.store)):
            block = {name: self.read(name, array, lo, hi, missing[name]) for name, array in arrays.items()}
            self.check_sites(block, lo)
            self.check_tokens(block, lo)
            bar.update(hi - lo)
        return self.problems

    def arrays(self) -> dict | None:
        """The shard's arrays, if their shapes hold the committed rows; None when they cannot be read."""
        expected = {name: ((), np.dtype(dt)) for name, dt in TOKEN_COLUMNS.items()}
        stored = np.uint16 if self.store.dtype == "bfloat16" else np.float32
        expected |= {site: ((self.store.width(site),), np.dtype(stored)) for site in self.store.sites}
        arrays, rows, before = {}, self.rec.rows, len(self.problems)
        for name, (tail, dtype) in expected.items():
            try:
                array = self.store.shard_array(self.rec.name, name)
            except StoreError:
                self.problem(name, 0, rows, "array missing")
                continue
            if array is None:  # an optional column the store predates
                continue
            extent = array.shape[0]
            if array.shape[1:] != tail or array.dtype != dtype or array.chunks[0] != self.store.chunk_rows:
                want = (rows, *tail)
                self.problem(name, 0, rows, f"array is {array.dtype} {array.shape} in chunks of {array.chunks[0]}; "
                                            f"the store says {dtype} {want} in chunks of {self.store.chunk_rows}")
            elif extent < rows or (self.rec.done and extent != rows):
                done = " and is done" if self.rec.done else ""
                self.problem(name, min(extent, rows), max(extent, rows),
                             f"array has {extent} rows, the manifest commits {rows}{done}")
            else:
                arrays[name] = array
        return arrays if len(self.problems) == before else None

    def missing_chunks(self, name: str, array) -> set[int]:
        """Chunk indices with no object on storage: zarr would quietly read them as zeros."""
        prefix = f"shards/{self.rec.name}/{name}/"
        present = set(self.store.root.sizes(prefix))
        keys = chunk_keys(array, 0, self.rec.rows)
        return {i for i, key in enumerate(keys) if prefix + key not in present}

    def read(self, name: str, array, lo: int, hi: int, missing: set[int]) -> np.ndarray | None:
        """The block's rows, or None after naming every chunk of it that is missing or unreadable."""
        c = self.store.chunk_rows
        absent = [i for i in range(lo // c, -(-hi // c)) if i in missing]
        for i in absent:
            self.problem(name, *self.chunk_of(i * c), "chunk missing")
        if not absent:
            try:
                return array[lo:hi]
            except Exception:  # noqa: BLE001 - any decode failure; found chunk by chunk below
                pass
        for a, b in _blocks(lo, hi, c):
            if a // c in missing:
                continue
            try:
                array[a:b]
            except Exception as err:  # noqa: BLE001 - the codec's own words are the reason
                first_line = (str(err).splitlines() or [""])[0]
                self.problem(name, a, b, f"unreadable ({type(err).__name__}: {first_line})")
        return None

    def check_sites(self, block: dict, lo: int) -> None:
        for site in self.store.sites:
            x = block.get(site)
            if x is None:
                continue
            if x.dtype == np.uint16:  # bf16 bits: all-ones exponent is inf or nan
                bad = ((x & 0x7F80) == 0x7F80).any(axis=1)
            else:
                bad = ~np.isfinite(x).all(axis=1)
            for i in np.unique(np.flatnonzero(bad) // self.store.chunk_rows):
                a, b = self.chunk_of(lo + i * self.store.chunk_rows)
                n = int(bad[a - lo : b - lo].sum())
                self.problem(site, a, b, f"{n} non-finite rows (writers drop those, so the chunk is damaged)")

    def check_tokens(self, block: dict, lo: int) -> None:
        """The order a harvest writes in: documents and windows move forward, positions rise
        within a window, and window w belongs to rank w % world_size."""
        cols = {name: block.get(name) for name in TOKEN_COLUMNS}
        if any(v is None for k, v in cols.items() if k != "windows"):
            self.last = {}  # an unreadable block breaks the chain; start again after it
            return
        tokens, docs, positions, windows = (cols[k] for k in TOKEN_COLUMNS)
        context = self.store.identity.get("context_length")
        self.first_bad("tokens", lo, tokens < 0, "negative token ids")
        if context:
            self.first_bad("positions", lo, (positions < 0) | (positions >= context),
                           f"positions outside [0, {context}) (context_length)")
        if not _in_harvest_order(self.store):
            return
        step, offset = self.diffs("doc_ids", docs)
        self.first_bad("doc_ids", lo, step < 0, "doc_ids go backwards", offset)
        if windows is not None and (windows >= 0).all():
            self.check_windows(lo, windows, docs, positions)
        self.last = {k: v[-1] for k, v in cols.items() if v is not None and len(v)}

    def check_windows(self, lo: int, windows, docs, positions) -> None:
        ws = self.store.world_size
        self.first_bad("windows", lo, windows % ws != self.rank,
                       f"windows of another rank (window w belongs to rank w % {ws})")
        step, offset = self.diffs("windows", windows)
        rise, _ = self.diffs("positions", positions)
        self.first_bad("windows", lo, step < 0, "windows go backwards", offset)
        self.first_bad("positions", lo, (step == 0) & (rise <= 0), "positions do not rise within a window", offset)
        starts = np.flatnonzero(np.diff(windows, prepend=windows[0] - 1))
        ends = np.append(starts[1:], len(windows)) - 1
        for w, first, end in zip(windows[starts].tolist(), docs[starts].tolist(), docs[ends].tolist()):
            span = self.windows.setdefault(w, _WindowSpan(self.rank, first, end))
            if span.rank != self.rank:
                self.problem("windows", lo, lo + len(windows),
                             f"window {w} is also in shard {shard_name(span.rank, ws)}")
            span.last_doc = end

    def diffs(self, name: str, values: np.ndarray) -> tuple[np.ndarray, int]:
        """Steps between a column's rows, the previous block's last row first (so checks span
        blocks), and the offset that turns a step's index into the index of its later row."""
        if name in self.last:
            return np.diff(np.concatenate([[self.last[name]], values])), 0
        return np.diff(values), 1

    def first_bad(self, name: str, lo: int, bad: np.ndarray, reason: str, offset: int = 0) -> None:
        """Name the chunk of the first bad row, if any (one report per check and block)."""
        hits = np.flatnonzero(bad)
        if len(hits):
            row = lo + int(hits[0]) + offset
            self.problem(name, *self.chunk_of(row), f"{reason} at row {row}")


def _in_harvest_order(store: ActivationStore) -> bool:
    """Harvested stores and window-order merges keep the corpus order; a rank-order merge
    keeps it only within each source shard."""
    return store.origin is None or store.origin["order"] == "windows"


def _check_layout(store: ActivationStore) -> list[str]:
    """Manifests and shard groups belong to this store's shards, and manifests agree with their stats."""
    names = {shard_name(r, store.world_size) for r in range(store.world_size)}
    problems = []
    for key in store.root.sizes("manifests"):
        name = key.removeprefix("manifests/").removesuffix(".json")
        if key.endswith(".json") and not name.startswith(".") and name not in names:
            problems.append(f"{key}: belongs to no shard of this store (world_size {store.world_size}): "
                            "a writer ran with another harvest.world_size; remove it or use another run_name")
    for name in store.shard_groups():
        if name not in names:
            problems.append(f"shards/{name}: belongs to no shard of this store (world_size {store.world_size}): "
                            "a writer ran with another harvest.world_size; remove it or use another run_name")
    for rec in store.shard_records:
        counts = {site: stats.count for site, stats in rec.stats.items()}
        if rec.rows and (rec.consumed < rec.rows or counts != {site: rec.rows for site in store.sites}):
            problems.append(f"manifests/{rec.name}.json: {rec.rows} rows but {rec.consumed} consumed and "
                            f"statistics of {counts} rows: the manifest is damaged")
    return problems


def _check_windows_cover(store: ActivationStore, windows: dict) -> list[str]:
    """Across shards: documents move forward from each window to the next, each shard holds
    windows rank, rank + n, ... without holes, and a complete store holds windows 0..last."""
    if not windows:
        return []
    problems = []
    order = sorted(windows)
    for a, b in zip(order, order[1:]):
        if windows[a].last_doc > windows[b].first_doc:
            problems.append(f"windows {a} and {b} (shards {shard_name(windows[a].rank, store.world_size)}, "
                            f"{shard_name(windows[b].rank, store.world_size)}): doc_ids go back from "
                            f"{windows[a].last_doc} to {windows[b].first_doc}; the shards do not hold one corpus")
    n = store.world_size
    expected = set()
    for rank in range(n):
        mine = [w for w in order if windows[w].rank == rank]
        expected |= set(range(rank, (mine[-1] if mine else rank - n) + 1, n))
    if store.complete:
        expected |= set(range(order[-1] + 1))
    holes = sorted(expected - set(order))
    if holes:
        shown = ", ".join(map(str, holes[:10])) + (" ..." if len(holes) > 10 else "")
        problems.append(f"windows {shown} ({len(holes)}) are in no shard: their rows are lost "
                        "(or every token of them was special or non-finite)")
    return problems


@dataclass
class VerifyResult:
    problems: list[str]
    summary: str

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(path, storage_options: dict | None = None, progress: bool = True) -> VerifyResult:
    """Read and check every committed row of every shard (see the module docstring)."""
    store = ActivationStore(path, storage_options)
    started = time.perf_counter()
    problems = _check_layout(store)
    windows: dict = {}
    with tqdm(total=store.n_tokens, unit="tok", unit_scale=True, desc="verify", disable=not progress,
              dynamic_ncols=True) as bar:
        for rank, rec in enumerate(store.shard_records):
            problems += _ShardCheck(store, rank, rec, windows).run(bar)
    problems += _check_windows_cover(store, windows)
    elapsed = time.perf_counter() - started
    read = store.n_tokens * _row_bytes(store)
    state = "complete" if store.complete else "still being written: " + ", ".join(
        rec.name for rec in store.shard_records if not rec.done)
    verdict = f"{len(problems)} problem(s)" if problems else "ok"
    summary = (f"verify: {verdict}: {store.n_tokens} committed tokens in {store.world_size} shard(s), "
               f"{len(store.sites)} site(s), {_size(read)} checked in {elapsed:.1f} s "
               f"({_size(read / max(elapsed, 1e-9))}/s); {state}")
    return VerifyResult(problems, summary)


# ----------------------------------------------------------------------------------------
# merge


def _plan(store: ActivationStore, order: str) -> list[tuple[str, int, int]]:
    """The merged store's rows as (shard, start, stop) ranges of the source, in output order."""
    if order == "ranks":
        return [(rec.name, 0, rec.rows) for rec in store.shard_records if rec.rows]
    runs = []  # (window, shard, start, stop)
    for rec in store.shard_records:
        for lo, hi in _blocks(0, rec.rows, 1 << 20):
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
        self.block_rows = _block_rows(store)
        self.lo = self.hi = 0
        self.data: dict = {}

    def take(self, lo: int, hi: int) -> dict:
        if not (self.lo <= lo and hi <= self.hi):
            c = self.store.chunk_rows
            self.lo = lo // c * c
            self.hi = min(self.rec.rows, max(self.lo + self.block_rows, -(-hi // c) * c))
            self.data = {name: self.store.read_shard(self.rec.name, name, self.lo, self.hi)
                         for name in _columns(self.store)}
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
    target = _block_rows(store)
    pieces, n = [], 0

    def flush():
        rows = {name: np.concatenate([p[name] for p in pieces]) for name in pieces[0]}
        writer.append({name: as_tensor(v) if name in store.sites else v for name, v in rows.items()})
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
    return "zstd" if "zstd" in _codecs(store) else None


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
                         fsync=fsync, storage_options=dst_storage_options, origin=origin)
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


# ----------------------------------------------------------------------------------------
# command line


def _options(text: str | None, flag: str) -> dict | None:
    if text is None:
        return None
    try:
        options = json.loads(text)
    except json.JSONDecodeError as err:
        options = err
    if not isinstance(options, dict):
        raise StoreError(f"{flag} is not a JSON object ({options}): give one such as "
                         '\'{"endpoint_url": "http://host:9000"}\'')
    return options


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline.store", description=__doc__.split("\n\n")[0])
    parser.add_argument("--storage-options", metavar="JSON",
                        help="fsspec options for URLs (default: $DIALBOX_STORAGE_OPTIONS)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="sites, tokens, shards, bytes and identity of a store")
    info.add_argument("path", help="run directory or store root (local path or URL)")
    info.add_argument("--json", action="store_true", help="print JSON")
    check = sub.add_parser("verify", help="read every committed chunk and check the store's invariants")
    check.add_argument("path", help="run directory or store root (local path or URL)")
    m = sub.add_parser("merge", aliases=["consolidate"], help="copy every shard's committed rows into a new one-shard store")
    m.add_argument("src", help="run directory or store root of a finished store")
    m.add_argument("dst", help="root of the new store, e.g. runs/<name>/activations")
    m.add_argument("--order", choices=ORDERS, default="ranks",
                   help="ranks: as the reader yields them; windows: as one writer would have stored them")
    m.add_argument("--dst-storage-options", metavar="JSON", help="fsspec options for dst (default: --storage-options)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    with one_line_errors(f"store {args.command}", StoreError, OSError, ValueError):
        options = _options(args.storage_options, "--storage-options")
        progress = not args.no_progress
        if args.command == "info":
            d = describe(ActivationStore(args.path, options))
            print(json.dumps(d, indent=2) if args.json else format_info(d))
        elif args.command == "verify":
            result = verify(args.path, options, progress)
            for line in result.problems:
                print(line)
            print(result.summary)
            return 0 if result.ok else 1
        else:
            dst_options = _options(args.dst_storage_options, "--dst-storage-options") or options
            merged = merge(args.src, args.dst, args.order, options, dst_options, progress)
            print(f"merge: {merged.n_tokens} tokens from {args.src} in {args.order} order into {merged.root}")
    return 0
