"""Whole-store walks (verify, merge) read rows in blocks of whole chunks of bounded size."""

from __future__ import annotations

import numpy as np

from activations.store.reader import ActivationStore


BLOCK_BYTES = 32 << 20  # rows read at once per shard: large reads, bounded memory
ORDERS = ("ranks", "windows")


def row_bytes(store: ActivationStore) -> int:
    """Bytes of one row over all columns (the token columns take 24, a routed layer 4 x top_k)."""
    return sum(int(np.prod(tail)) * dtype.itemsize for tail, dtype in store.columns().values())


def block_rows(store: ActivationStore) -> int:
    """Whole chunks worth about BLOCK_BYTES over all columns."""
    return max(1, BLOCK_BYTES // row_bytes(store) // store.chunk_rows) * store.chunk_rows


def row_blocks(start: int, stop: int, size: int):
    for lo in range(start, stop, size):
        yield lo, min(lo + size, stop)


def all_columns(store: ActivationStore) -> list[str]:
    return list(store.columns())


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
