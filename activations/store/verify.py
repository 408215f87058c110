"""verify: decode every committed chunk and check the store's invariants, naming each damaged row range."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from activations.store.blocks import block_rows, human_size, row_blocks, row_bytes
from activations.store.format import PREVIOUS, TOKEN_COLUMNS, decode, router_key, shard_name
from activations.store.reader import ActivationStore, ShardRecord, unreadable
from activations.store.stats import SiteStats


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
    stats: dict = field(default_factory=dict)  # site -> statistics of its rows as read; None once one is unreadable

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
        missing = {name: self.store.missing_chunks(self.rec.name, name, 0, self.rec.rows) for name in arrays}
        self.stats = {site: SiteStats.zeros(self.store.width(site)) for site in self.store.sites}
        for lo, hi in row_blocks(0, self.rec.rows, block_rows(self.store)):
            block = {name: self.read(name, array, lo, hi, missing[name]) for name, array in arrays.items()}
            self.check_sites(block, lo)
            self.check_router(block, lo)
            self.check_tokens(block, lo)
            self.add_stats(block)
            bar.update(hi - lo)
        self.check_stats()
        return self.problems

    def arrays(self) -> dict | None:
        """The shard's arrays, if their shapes hold the committed rows; None when they cannot be read."""
        arrays, rows, before = {}, self.rec.rows, len(self.problems)
        for name in self.store.columns():
            array, problem = self.store.open_array(self.rec.name, name)
            if problem:
                self.problem(name, 0, rows, problem)
                continue
            if array is None:  # an optional column the store predates
                continue
            extent = array.shape[0]
            if extent < rows or (self.rec.done and extent != rows):
                done = " and is done" if self.rec.done else ""
                self.problem(name, min(extent, rows), max(extent, rows),
                             f"array has {extent} rows, the manifest commits {rows}{done}")
            else:
                arrays[name] = array
        return arrays if len(self.problems) == before else None

    def read(self, name: str, array, lo: int, hi: int, missing: dict[int, str]) -> np.ndarray | None:
        """The block's rows, or None after naming every chunk of it that is missing or unreadable."""
        c = self.store.chunk_rows
        absent = [i for i in range(lo // c, -(-hi // c)) if i in missing]
        for i in absent:
            self.problem(name, *self.chunk_of(i * c), missing[i])
        if not absent:
            try:
                return array[lo:hi]
            except Exception:  # noqa: BLE001 - any decode failure; found chunk by chunk below
                pass
        for a, b in row_blocks(lo, hi, c):
            if a // c in missing:
                continue
            try:
                array[a:b]
            except Exception as err:  # noqa: BLE001 - the codec's own words are the reason
                self.problem(name, a, b, unreadable(err))
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

    def add_stats(self, block: dict) -> None:
        """Add up each site's statistics as the writer did, from the rows as read."""
        for site, total in self.stats.items():
            x = block.get(site)
            self.stats[site] = None if x is None or total is None else total + SiteStats.of_rows(decode(x))

    def check_stats(self) -> None:
        """The statistics the manifest commits are those of the rows committed (but the dropped-row
        counts, which no row records). Sums of the same numbers added in another order differ by
        rounding only: far less than the tolerance, which a damaged number exceeds."""
        for site, read in self.stats.items():
            kept = self.rec.stats.get(site)
            if read is None or kept is None or not np.isfinite(read.norm_sum):
                continue  # unreadable chunks and non-finite rows are named already, a missing site by _check_layout
            scale = max(read.norm_sum, 1e-30)
            differ = [what for what, ok in [
                ("count", kept.count == read.count),
                ("sum", np.abs(kept.sum - read.sum).max(initial=0.0) <= 1e-6 * scale),
                ("norm_sum", abs(kept.norm_sum - read.norm_sum) <= 1e-6 * scale),
                ("max_norm", abs(kept.max_norm - read.max_norm) <= 1e-6 * max(read.max_norm, 1e-30)),
            ] if not ok]
            if differ:
                have, want = kept.summary(), read.summary()
                self.problems.append(
                    f"manifests/{self.rec.name}.json: statistics of {site} disagree with its rows in "
                    f"{', '.join(differ)} (mean norm {have['mean_norm']:.6g} committed, {want['mean_norm']:.6g} read; "
                    f"max norm {have['max_norm']:.6g}, {want['max_norm']:.6g}): the manifest is damaged; restore "
                    f"its commit before ({PREVIOUS}) over it and rerun that shard's writer")

    def check_router(self, block: dict, lo: int) -> None:
        """Expert ids name experts of the layer; gate weights are finite."""
        for layer, spec in self.store.router.items():
            ids, weights = block.get(router_key(layer, "ids")), block.get(router_key(layer, "weights"))
            if ids is not None:
                self.first_bad(router_key(layer, "ids"), lo, ((ids < 0) | (ids >= spec["n_experts"])).any(axis=1),
                               f"expert ids outside [0, {spec['n_experts']})")
            if weights is not None:
                self.first_bad(router_key(layer, "weights"), lo, ((weights & 0x7F80) == 0x7F80).any(axis=1),
                               "non-finite gate weights")

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
        # a manifest, not a temporary file or a block of committed checksums (<shard>.crc32c/<block>.json)
        if key.endswith(".json") and not name.startswith(".") and "/" not in name and name not in names:
            problems.append(f"{key}: belongs to no shard of this store (world_size {store.world_size}): "
                            "a writer ran with another harvest.world_size; remove it or use another run_name")
    for name in store.shard_groups():
        if name not in names:
            problems.append(f"shards/{name}: belongs to no shard of this store (world_size {store.world_size}): "
                            "a writer ran with another harvest.world_size; remove it or use another run_name")
    for name, rows in store.unmanifested().items():
        problems.append(f"manifests/{name}.json is missing, but shard {name} holds {rows} rows written: its manifest "
                        "was deleted, or its writer has not committed yet (or died first); restore the manifest, or rerun that "
                        "shard's writer to redo the shard")
    for rec in store.shard_records:
        if rec.torn:
            problems.append(rec.torn)
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
    read = store.n_tokens * row_bytes(store)
    state = "complete" if store.complete else "still being written: " + ", ".join(
        rec.name for rec in store.shard_records if not rec.done)
    verdict = f"{len(problems)} problem(s)" if problems else "ok"
    summary = (f"verify: {verdict}: {store.n_tokens} committed tokens in {store.world_size} shard(s), "
               f"{len(store.sites)} site(s), {human_size(read)} checked in {elapsed:.1f} s "
               f"({human_size(read / max(elapsed, 1e-9))}/s); {state}")
    return VerifyResult(problems, summary)
