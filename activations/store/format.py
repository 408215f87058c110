"""The store's on-disk format: names, dtypes, manifests, and the identity check that keeps one
model's rows out of another's store."""

from __future__ import annotations

import json

import numpy as np
import torch
import zarr

from activations.errors import DialboxError


FORMAT = "dialbox-activations"
FORMAT_VERSION = 1
DTYPES = ("bfloat16", "float32")
TOKEN_COLUMNS = {"tokens": np.int32, "doc_ids": np.int64, "positions": np.int32, "windows": np.int64}
# Columns a writer may be given without: stores written before they existed read them as this.
OPTIONAL_COLUMNS = {"windows": -1}
STORAGE_OPTIONS_ENV = "DIALBOX_STORAGE_OPTIONS"
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


def read_manifest(root, name: str) -> tuple[dict | None, str | None]:
    """A shard's last good commit (None before its first), and why, if it is not the newest one."""
    key = manifest_key(name)
    data = root.read(key)
    if data is None:
        return None, None
    try:
        return json.loads(data), None
    except json.JSONDecodeError as err:
        torn = f"{root}/{key} is not valid JSON ({err})"
    try:
        previous = json.loads(root.read(key + PREVIOUS) or "null")
    except json.JSONDecodeError:
        previous = None
    if previous is None:
        raise StoreError(f"{torn} and no good commit is kept before it: restore it, or delete it and rerun "
                         "that writer to redo the shard")
    return previous, (f"{torn}: read as the commit before it ({previous['rows']} rows, {key}{PREVIOUS}); "
                      "rerun that shard's writer to commit again")


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
