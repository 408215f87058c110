"""Synthetic stores laid out as harvests lay them out, and ways to damage one, for the store tests
(test_store, test_loader, test_store_tool, test_store_remote, test_store_damage)."""

import json

import numpy as np
import torch

from activations.store import ActivationStore, ShardWriter
from pipeline.store import main

SITES = {"L1.resid_post": 8, "L2.ffn_out": 4}
A, B = SITES
CONTEXT = 12
IDENTITY = {"model": "tiny", "d_model": 8, "hc_reduce": "mean", "data": "f00d", "context_length": CONTEXT}
ROWS_IDENTITY = {"model": "tiny", "d_model": 8}  # the stores of make_rows


def corpus(n_windows=23, seed=0) -> list[dict]:
    """The rows of each window as a harvest cuts them: documents run across windows, the BOS at
    position 0 and scattered special tokens are left out, the last window is shorter, and each
    row's activations depend only on its window and position, as a model's would."""
    rng = np.random.default_rng(seed)
    doc_starts = rng.random(n_windows * CONTEXT) < 0.08
    windows = []
    for w in range(n_windows):
        length = CONTEXT if w < n_windows - 1 else CONTEXT // 2
        positions = np.arange(1, length)
        positions = positions[rng.random(len(positions)) > 0.15]
        stream = w * CONTEXT + positions
        g = torch.Generator().manual_seed(w)
        windows.append({
            "tokens": rng.integers(0, 5000, len(positions)),
            "doc_ids": np.cumsum(doc_starts)[stream],
            "positions": positions,
            "windows": np.full(len(positions), w),
            **{site: torch.randn(len(positions), width, generator=g) * 3 for site, width in SITES.items()},
        })
    return windows


def concat(windows: list[dict]) -> dict:
    return {k: torch.cat([w[k] for w in windows]) if torch.is_tensor(windows[0][k]) else
            np.concatenate([w[k] for w in windows]) for k in windows[0]}


def write_shard(root, windows, rank, world_size, finish=True, chunk_rows=8, **kw):
    """One harvest writer: its windows (w % world_size == rank), three per append."""
    mine = [win for w, win in enumerate(windows) if w % world_size == rank]
    kw = {"fsync": False} | kw  # durability has its own tests in test_store.py; here it only costs time
    writer = ShardWriter(root, rank, world_size, SITES, IDENTITY, chunk_rows=chunk_rows, background=False, **kw)
    for i in range(0, len(mine), 3):
        writer.append(concat(mine[i : i + 3]))
    if finish:
        writer.finish()
        writer.close()
    return writer


def write_store(root, windows, world_size, **kw):
    for rank in range(world_size):
        write_shard(root, windows, rank, world_size, **kw)
    return ActivationStore(root, kw.get("storage_options"))


def all_rows(store: ActivationStore) -> dict:
    n = store.n_tokens
    return store.tokens(0, n) | {site: store.read(site, 0, n) for site in store.sites}


def assert_same_rows(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def chunk_file(root, shard, name, index):
    path = root / "shards" / shard / name / "c" / str(index)
    return path / "0" if path.is_dir() else path  # a site's chunks are 2-d, a token column's 1-d


def damage(root, kind: str, shard: str, name: str, index: int = 2, chunk_rows: int = 8) -> tuple[int, int, str]:
    """Damage one shard as `kind` says: delete, truncate or flip a bit of chunk `index` of the array
    `name`, swap it with the next chunk, link it to the next one, or put a directory in its place;
    retype the array or make it big-endian in its zarr.json (the same bytes read as other numbers); or
    (manifest_ahead) commit two chunks in its manifest that were never written.
    Returns the shard's rows [lo, hi) it hurts (for swap, the first of the two chunks) and the reason
    readers and verify give."""
    if kind == "manifest_ahead":
        path = root / "manifests" / f"{shard}.json"
        manifest = json.loads(path.read_text())
        rows = manifest["rows"]
        more = 2 * chunk_rows
        path.write_text(json.dumps(manifest | {"rows": rows + more, "consumed": manifest["consumed"] + more}))
        return rows, rows + more, f"array has {rows} rows, the manifest commits {rows + more}"
    if kind in ("retype", "big_endian"):
        path = root / "shards" / shard / name / "zarr.json"
        meta = json.loads(path.read_text())
        if kind == "retype":  # the same width of number, read as another kind
            meta["data_type"] = {"uint16": "int16", "int32": "uint32", "int64": "uint64", "float32": "int32"}[meta["data_type"]]
        else:
            meta["codecs"][0]["configuration"]["endian"] = "big"
        path.write_text(json.dumps(meta))
        rows = json.loads((root / "manifests" / f"{shard}.json").read_text())["rows"]
        return 0, rows, "array is " if kind == "retype" else "array's codecs are bytes+crc32c (big-endian)"
    path = chunk_file(root, shard, name, index)
    data = path.read_bytes()
    if kind == "delete":
        path.unlink()
    elif kind == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "swap":
        neighbour = chunk_file(root, shard, name, index + 1)
        path.write_bytes(neighbour.read_bytes())
        neighbour.write_bytes(data)
    elif kind == "link":
        path.unlink()
        path.symlink_to(chunk_file(root, shard, name, index + 1))
    elif kind == "directory":
        path.unlink()
        path.mkdir()
    else:  # one flipped bit, same length: only the checksum can tell
        path.write_bytes(data[:5] + bytes([data[5] ^ 1]) + data[6:])
    reasons = {"delete": "chunk missing", "swap": "not the chunk committed here", "link": "not the chunk committed here",
               "directory": "chunk is a directory, not a file"}
    reason = reasons.get(kind, "unreadable (ValueError: Stored and computed checksum do not match")
    return index * chunk_rows, (index + 1) * chunk_rows, reason


def _edit_json(path, edit) -> None:
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def _without(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


# Metadata a reader must refuse in one line naming its file: (the file, relative to the store; the edit;
# what the message says of it). A missing manifest is not among them: a writer may not have committed yet.
MALFORMED = {
    "manifest_list": ("manifests/{shard}.json", lambda m, site: [m], "holds list, not a commit record"),
    "manifest_null": ("manifests/{shard}.json", lambda m, site: None, "holds null, not a commit record"),
    "no_stats": ("manifests/{shard}.json", lambda m, site: _without(m, "stats"), "has no 'stats'"),
    "rows_string": ("manifests/{shard}.json", lambda m, site: m | {"rows": str(m["rows"])}, "'rows' is \""),
    "negative_rows": ("manifests/{shard}.json", lambda m, site: m | {"rows": -5880}, "'rows' is -5880, not a row count"),
    "stats_sum_length": ("manifests/{shard}.json",
                         lambda m, site: m | {"stats": m["stats"] | {site: m["stats"][site] | {"sum": m["stats"][site]["sum"][1:]}}},
                         "the statistics of {site} sum over"),
    "root_without_chunk_rows": ("zarr.json", lambda z, site: z | {"attributes": _without(z["attributes"], "chunk_rows")},
                                "has no 'chunk_rows'"),
    "array_not_json": ("shards/{shard}/{site}/zarr.json", None, "zarr.json does not load (JSONDecodeError"),
}


def malform(root, kind: str, shard: str, site: str) -> tuple[str, str]:
    """Damage a store's metadata as MALFORMED[kind] says; returns the file's path and what a reader says of it."""
    key, edit, says = MALFORMED[kind]
    path = root / key.format(shard=shard, site=site)
    if edit is None:
        path.write_text("{not json")
    else:
        _edit_json(path, lambda d: edit(d, site))
    return str(path), says.format(site=site)


def scale_norms(root, shard: str, site: str, factor: float) -> None:
    """Multiply a site's committed norm_sum by `factor` (statistics that lie about the rows)."""
    def scaled(m):
        m["stats"][site]["norm_sum"] *= factor
        return m

    _edit_json(root / "manifests" / f"{shard}.json", scaled)


def recommit(root, shard: str, name: str, *indices: int) -> None:
    """Commit chunks of an array as they now are on storage, as though their writer had written them:
    damage behind the checksums, which only verify's own checks can find (chunks in the manifest's tail)."""
    path = root / "manifests" / f"{shard}.json"
    manifest = json.loads(path.read_text())
    for index in indices:
        manifest["crc32c"][name][index] = int.from_bytes(chunk_file(root, shard, name, index).read_bytes()[-4:], "little")
    path.write_text(json.dumps(manifest))


def run_main(capsys, *argv) -> tuple[int, list[str], str]:
    try:
        code = main(["--no-progress", *map(str, argv)])
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    return code, out.strip().splitlines(), err.strip()


# ----------------------------------------------------------------------------------------
# rows whose tokens are their input index (test_store, test_loader)


def make_rows(n, start=0, seed=0, sites=SITES, doc_len=10):
    """n input rows whose tokens are their input index, so every row is recognisable."""
    index = np.arange(start, start + n)
    g = torch.Generator().manual_seed(seed)
    rows = {"tokens": index + 1000, "doc_ids": index // doc_len, "positions": index % doc_len}
    rows |= {site: torch.randn(n, width, generator=g) for site, width in sites.items()}
    return rows


def cut(rows, lo, hi):
    return {k: v[lo:hi] for k, v in rows.items()}


def writer(root, rank=0, world_size=1, **kw):
    kw = {"sites": SITES, "identity": ROWS_IDENTITY, "chunk_rows": 16, "background": False} | kw
    return ShardWriter(root, rank, world_size, **kw)


def append_in_batches(w, rows, batch, lo=0):
    n = len(rows["tokens"])
    for i in range(lo, n, batch):
        w.append(cut(rows, i, min(i + batch, n)))
