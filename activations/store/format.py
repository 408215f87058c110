"""The store's on-disk format: names, dtypes, manifests, and the identity check that keeps one
model's rows out of another's store."""

from __future__ import annotations

import json

import numpy as np
import torch
import zarr

from activations.errors import DialboxError


FORMAT = "dialbox-activations"
# 2: manifests commit each chunk's crc32c (positions.py); stores of version 1 still read, unchecked there.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
DTYPES = ("bfloat16", "float32")
TOKEN_COLUMNS = {"tokens": np.int32, "doc_ids": np.int64, "positions": np.int32, "windows": np.int64}
# Columns a writer may be given without: stores written before they existed read them as this.
OPTIONAL_COLUMNS = {"windows": -1}
STORAGE_OPTIONS_ENV = "DIALBOX_STORAGE_OPTIONS"
# The codec chains a store's arrays are written with: little-endian rows, optionally zstd, then crc32c.
CODEC_CHAINS = (["bytes", "crc32c"], ["bytes", "zstd", "crc32c"])
# Per routed layer, two [n, top_k] arrays: the chosen expert ids and their gate weights (bf16 bits).
ROUTER_PARTS = {"ids": np.int16, "weights": np.uint16}


class StoreError(DialboxError, RuntimeError):
    """A store that is missing, mismatched, incomplete or failed to write."""


def shard_name(rank: int, world_size: int) -> str:
    return f"r{rank:05d}-of-{world_size:05d}"


def router_key(layer: int, part: str) -> str:
    """The array name of a routed layer's ids or weights, e.g. router.L5.ids."""
    return f"router.L{layer}.{part}"


def router_columns(router: dict) -> dict[str, tuple[tuple, np.dtype]]:
    """Array name -> (row shape, stored dtype) of the router arrays of a store's router layout
    ({layer: {"top_k", "n_experts", "hashed"}})."""
    return {router_key(int(layer), part): ((spec["top_k"],), np.dtype(dt))
            for layer, spec in router.items() for part, dt in ROUTER_PARTS.items()}


def decode(stored: np.ndarray) -> np.ndarray:
    """Stored rows to float32: uint16 holds bfloat16 bits, the high half of a float32."""
    if stored.dtype == np.uint16:
        return (stored.astype(np.uint32) << 16).view(np.float32)
    return stored.astype(np.float32, copy=False)


def as_tensor(stored: np.ndarray) -> torch.Tensor:
    """Stored rows as a tensor without a copy: uint16 bits become a bfloat16 view."""
    if stored.dtype == np.uint16:
        return torch.from_numpy(np.ascontiguousarray(stored).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(stored)


def manifest_key(name: str) -> str:
    return f"manifests/{name}.json"


# Beside each manifest, its writer keeps the commit before it: a reader falls back to that one
# when the manifest does not parse (torn by a copy or a filesystem without atomic rename).
PREVIOUS = ".prev"


def read_manifest(root, name: str, widths: dict) -> tuple[dict | None, str | None]:
    """A shard's last good commit (None before its first), and why, if it is not the newest one.
    `widths` are the store's sites' widths, which the statistics must sum over."""
    key = manifest_key(name)
    data = root.read(key)
    if data is None:
        return None, None
    try:
        return _commit_record(json.loads(data), f"{root}/{key}", widths), None
    except json.JSONDecodeError as err:
        torn = f"{root}/{key} is not valid JSON ({err})"
    kept = root.read(key + PREVIOUS)
    try:
        previous = _commit_record(json.loads(kept), f"{root}/{key}{PREVIOUS}", widths) if kept is not None else None
    except (json.JSONDecodeError, StoreError):
        previous = None
    if previous is None:
        raise StoreError(f"{torn} and no good commit is kept before it: restore it, or delete it and rerun "
                         "that writer to redo the shard")
    return previous, (f"{torn}: read as the commit before it ({previous['rows']} rows, {key}{PREVIOUS}); "
                      "rerun that shard's writer to commit again")


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _manifest_problem(m, widths: dict) -> str | None:
    """What makes a parsed manifest not a commit record a writer wrote, if anything."""
    if not isinstance(m, dict):
        return f"holds {type(m).__name__ if m is not None else 'null'}, not a commit record"
    for field, valid, what in [("rows", _is_count, "a row count"), ("consumed", _is_count, "a row count"),
                               ("done", lambda v: isinstance(v, bool), "true or false"),
                               ("stats", lambda v: isinstance(v, dict), "an object")]:
        if field not in m:
            return f"has no {field!r}"
        if not valid(m[field]):
            return f"{field!r} is {json.dumps(m[field])[:40]}, not {what}"
    for site, stats in m["stats"].items():
        if not isinstance(stats, dict) or not all(_is_count(stats.get(k)) for k in ("count", "nonfinite_rows")) or not (
                _is_number(stats.get("norm_sum")) and _is_number(stats.get("max_norm"))
                and isinstance(stats.get("sum"), list) and all(map(_is_number, stats["sum"]))):
            return f"the statistics of {site} are not count, sum, norm_sum, max_norm and nonfinite_rows"
        if len(stats["sum"]) != widths.get(site):
            return (f"the statistics of {site} sum over {len(stats['sum'])} dimensions; the store has "
                    + (f"width {widths[site]}" if site in widths else "no such site"))
    crcs = m.get("crc32c", {})
    if not isinstance(crcs, dict) or not all(isinstance(v, list) and all(map(_is_count, v)) for v in crcs.values()):
        return "'crc32c' is not an object of lists of checksums"
    return None


def _commit_record(m, where: str, widths: dict) -> dict:
    """A parsed manifest, refused in one line naming it when it is not a commit record."""
    problem = _manifest_problem(m, widths)
    if problem:
        raise StoreError(f"{where}: {problem}: the manifest is damaged; restore it (its commit before is kept as "
                         f"{PREVIOUS}), or delete it and rerun that shard's writer to redo the shard")
    return m


def root_problem(attrs: dict) -> str | None:
    """What the root's attributes lack for a reader to lay out the store, if anything."""
    if attrs.get("format_version") not in READABLE_VERSIONS:
        return f"format version {attrs.get('format_version')}; this code reads {' and '.join(map(str, READABLE_VERSIONS))}"
    checks = [("identity", lambda v: isinstance(v, dict), "an object"),
              ("dtype", lambda v: v in DTYPES, f"one of {', '.join(DTYPES)}"),
              ("chunk_rows", lambda v: _is_count(v) and v > 0, "a positive row count"),
              ("world_size", lambda v: _is_count(v) and v > 0, "a positive count"),
              ("sites", lambda v: isinstance(v, dict) and v and all(_is_count(w) and w > 0 for w in v.values()),
               "an object of site widths"),
              ("router", lambda v: isinstance(v, dict), "an object")]
    for field, valid, what in checks:
        if field not in attrs and field != "router":  # router: only stores that hold routing
            return f"has no {field!r}"
        if field in attrs and not valid(attrs[field]):
            return f"{field!r} is {json.dumps(attrs[field])[:40]}, not {what}"
    return None


def array_problem(array: zarr.Array, tail: tuple, dtype: np.dtype, chunk_rows: int) -> str | None:
    """How an array's metadata departs from what the store's format fixes for it (dtype, row shape,
    chunking along rows only, codecs), if it does: a reader would decode its chunks as other numbers."""
    codecs = [codec.to_dict() for codec in array.metadata.codecs]
    names = [codec["name"] for codec in codecs]
    endian = codecs[0].get("configuration", {}).get("endian") if codecs else None
    if array.dtype != dtype or array.shape[1:] != tail or array.chunks != (chunk_rows, *tail):
        want = ", ".join(map(str, ("rows", *tail)))
        return (f"array is {array.dtype} {list(array.shape)} in chunks of {list(array.chunks)}; the store says "
                f"{dtype} [{want}] in chunks of {[chunk_rows, *tail]}")
    if names not in CODEC_CHAINS or endian != "little":
        return (f"array's codecs are {'+'.join(names)} ({endian}-endian); the store writes "
                f"{' or '.join('+'.join(c) for c in CODEC_CHAINS)}, little-endian")
    return None


def _describe(settings: dict, keys) -> str:
    def show(value):
        return json.dumps(value, separators=(",", ":")) if isinstance(value, (dict, list)) else str(value)

    return ", ".join(f"{k}={show(settings.get(k))}" for k in keys)


def check_same(root, stored: dict, wanted: dict) -> None:
    """Refuse to mix rows of different models, sites or dtypes in one store."""
    if stored.get("format") != FORMAT:
        raise StoreError(f"{root} is a zarr group but not a Dialbox activation store: use another run_name")
    if stored.get("format_version") != FORMAT_VERSION:
        raise StoreError(
            f"store at {root} has format version {stored.get('format_version')}, this code writes "
            f"{FORMAT_VERSION}: use another run_name"
        )
    layout = ("dtype", "sites", "router", "world_size", "origin")
    flat_stored = {**stored["identity"], **{k: stored.get(k) for k in layout}}
    flat_wanted = {**wanted["identity"], **{k: wanted.get(k) for k in layout}}
    differ = [k for k in {**flat_stored, **flat_wanted} if flat_stored.get(k) != flat_wanted.get(k)]
    if differ:
        raise StoreError(
            f"store at {root} was harvested with {_describe(flat_stored, differ)}; "
            f"this run has {_describe(flat_wanted, differ)}: use another run_name"
        )


def chunk_keys(array: zarr.Array, start: int, stop: int) -> list[str]:
    """Keys (relative to the array) of the chunks that hold rows [start, stop)."""
    rows, tail = array.chunks[0], (0,) * (array.ndim - 1)
    return [array.metadata.encode_chunk_key((i, *tail)) for i in range(start // rows, -(-stop // rows))]
