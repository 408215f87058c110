"""Committed chunks of a local store, read straight from their files instead of through zarr.

zarr-python 3 runs every read on its one event-loop thread, so the training loader's reader threads
queue behind it: on the 2-core machine a 4 MiB chunk of a 4096-wide bf16 site came through zarr at
about 0.9 GB/s, against 3-8 GB/s for the same file read and crc32c-checked by the calling thread.
A store's arrays are written with two codecs only (little-endian bytes, then crc32c) and chunked
along rows alone, so a chunk file is its rows' bytes followed by a 4-byte checksum: that is all
this module reads. Any other layout (compression, a remote store) goes through zarr as before.

A chunk that is short, long or fails its checksum raises ValueError, as zarr's crc32c codec does,
and one whose checksum is not the one committed for its position raises MisplacedChunk, as the
reader's zarr store does (positions.py), so that the reader names the damage the same way whichever
path read it.
"""

from __future__ import annotations

from math import prod
from pathlib import Path

import google_crc32c
import numpy as np
import zarr

from activations.store.format import CODEC_CHAINS, chunk_keys
from activations.store.positions import check_position

PLAIN_CODECS = CODEC_CHAINS[0]


def is_plain(array: zarr.Array) -> bool:
    """Whether the array's chunk files are raw little-endian rows plus a crc32c: one codec pair,
    chunked along rows only."""
    names = [codec.to_dict()["name"] for codec in array.metadata.codecs]
    endian = array.metadata.codecs[0].to_dict().get("configuration", {}).get("endian", "little")
    return names == PLAIN_CODECS and endian == "little" and tuple(array.chunks[1:]) == tuple(array.shape[1:])


def read_rows(folder: Path, array: zarr.Array, start: int, stop: int, committed) -> np.ndarray:
    """Rows [start, stop) of a plain array whose chunk files are under `folder`, every chunk checked,
    against `committed(index)` too: the crc32c committed for the chunk at that index (None: unchecked).
    A read of exactly one whole chunk (the loader's case) returns a view of the file's bytes: no copy."""
    rows, dtype = array.chunks[0], np.dtype(array.dtype).newbyteorder("<")
    first = start // rows
    chunks = [read_chunk(folder / key, array.chunks, dtype, committed(first + i), first + i)
              for i, key in enumerate(chunk_keys(array, start, stop))]
    if len(chunks) == 1:
        lo = first * rows
        return chunks[0][start - lo: stop - lo]
    return np.concatenate(chunks)[start - first * rows: stop - first * rows]


def read_chunk(path: Path, shape: tuple, dtype: np.dtype, committed: int | None, index: int) -> np.ndarray:
    """One chunk file's rows, after checking its length, its checksum and that checksum against the
    one `committed` for its position."""
    expected = prod(shape) * dtype.itemsize + 4
    buffer = np.empty(expected + 1, np.uint8)  # one byte over: a longer file is damage too
    with open(path, "rb", buffering=0) as f:
        size = f.readinto(buffer)
    if size != expected or google_crc32c.value(buffer[: expected - 4]) != int.from_bytes(buffer[expected - 4: expected], "little"):
        raise ValueError(f"Stored and computed checksum do not match ({path.name}: {size} bytes, {expected} expected)")
    check_position(buffer[:expected], committed, index)
    return buffer[: expected - 4].view(dtype).reshape(shape)
