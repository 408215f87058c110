"""Shuffled training batches, read by a pool of threads so that a fast consumer (a GPU) is not kept waiting.

The order is the store's one shuffled order (see `ActivationStore.iter_batches`): chunks are visited in
a seeded random order and read in windows of `shuffle_chunks` chunks, the rows of each window are
permuted by a generator seeded with (seed, window), and batches are cut from the rows of one window
after another. Because every window has its own generator, windows can be read in any order and on
any thread: a pool reads the next few windows while the consumer trains on the current one, and
batches still come out in the same order, whatever the number of threads.

Reading a chunk (file read, checksum, decode) and permuting a window's rows are numpy and zarr work
that releases the GIL, so threads give real parallelism without the pickling of a process pool.
With `pin_memory`, each window is gathered straight into page-locked memory, so the consumer's
`tensor.to("cuda", non_blocking=True)` is a DMA transfer that does not hold up the host. The copy runs on
the step's own stream, before the step: at DeepSeek-V4-Flash width a 4096-row batch is 32 MiB, about
1.5 ms over PCIe 5 against a step of about 36 ms, so a side stream would win at most 4%.
"""

from __future__ import annotations

import sys
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

THREAD_PREFIX = "store-loader"


@dataclass
class Window:
    number: int  # position of its first chunk in the shuffled chunk order; seeds its row permutation
    chunks: list  # (shard, start, stop) of each of its chunks, in order
    rows: int  # rows of its chunks together
    skip: int  # leading rows of its permuted order that come before the first batch wanted


def plan_windows(store, seed: int, shuffle_chunks: int, stop_row: int, skip_rows: int) -> list[Window]:
    """The shuffled windows of rows [0, stop_row), without the `skip_rows` rows of the stream that
    come first: whole windows are dropped, so nothing before the first batch wanted is read."""
    chunks = [
        (s.name, start, min(start + store.chunk_rows, s.rows, stop_row - s.offset))
        for s in store.shard_records
        for start in range(0, min(s.rows, stop_row - s.offset), store.chunk_rows)
    ]
    order = np.random.default_rng(seed).permutation(len(chunks))
    windows = []
    for w in range(0, len(order), shuffle_chunks):
        window = [chunks[i] for i in order[w: w + shuffle_chunks]]
        rows = sum(stop - start for _, start, stop in window)
        if skip_rows >= rows:
            skip_rows -= rows
            continue
        windows.append(Window(w, window, rows, skip_rows))
        skip_rows = 0
    return windows


def read_window(store, sites: list[str], window: Window, seed: int, buffers: WindowBuffers,
                pin_memory: bool) -> dict[str, torch.Tensor]:
    """A window's rows of every site in its permuted order, in the store's dtype (bf16: a view of the stored bits).

    Each chunk's rows are scattered straight to their permuted places in the window's buffer: no
    concatenated copy of the window is made first, which would be a second pass over its bytes and a
    second fresh block of memory to fault in per window."""
    permutation = np.random.default_rng([seed, window.number]).permutation(window.rows)
    place = np.empty(window.rows, np.intp)  # where each of the window's rows goes; < 0: skipped
    place[permutation] = np.arange(window.rows) - window.skip
    out = {}
    for site in sites:
        (width,), stored = store.columns()[site]
        bits = stored == np.uint16
        buffer = buffers.take((window.rows - window.skip, width), torch.int16 if bits else torch.float32, pin_memory)
        dest, offset = buffer.numpy().view(stored), 0
        for shard, start, stop in window.chunks:
            rows, to = store.read_shard(shard, site, start, stop), place[offset: offset + stop - start]
            if window.skip:
                kept = to >= 0
                rows, to = rows[kept], to[kept]
            dest[to] = rows
            offset += stop - start
        out[site] = buffer.view(torch.bfloat16) if bits else buffer
    return out


class WindowBuffers:
    """The tensors windows are gathered into, each handed out again once nothing holds it any more.

    A fresh 32 MiB block per window is a fresh mmap: its pages fault in on first touch and its munmap
    interrupts the other threads to flush their TLBs. On the 2-core machine that halved the reader
    (about 210k rows/s at width 4096 against 590k with the blocks reused). A buffer is numpy's, wrapped
    by torch.from_numpy, whose storage holds a reference to the array until the last view of it (the
    last batch cut from the window) is gone: the array's reference count says when it is free.
    Pinned buffers come from torch's caching host allocator, which reuses its blocks itself."""

    def __init__(self, most: int):
        self.most = most  # buffers kept for reuse; past that, windows get fresh ones
        self.kept: list[np.ndarray] = []
        self.lock = threading.Lock()

    def take(self, shape: tuple, dtype: torch.dtype, pin_memory: bool) -> torch.Tensor:
        if pin_memory:
            return torch.empty(shape, dtype=dtype, pin_memory=True)
        np_dtype = torch.empty((), dtype=dtype).numpy().dtype
        with self.lock:
            for array in self.kept:
                # references: the list, this loop's name and getrefcount's argument; a live view adds one
                if array.shape == shape and array.dtype == np_dtype and sys.getrefcount(array) == 3:
                    return torch.from_numpy(array)
            array = np.empty(shape, dtype=np_dtype)
            if len(self.kept) < self.most:
                self.kept.append(array)
            return torch.from_numpy(array)


def cut_batches(windows, sites: list[str], batch_size: int, drop_last: bool):
    """Batches of `batch_size` rows from consecutive windows' rows; a batch may span two windows."""
    carry = None  # rows left over from the windows before, fewer than a batch
    for rows in windows:
        start = 0
        if carry is not None:
            start = min(batch_size - len(carry[sites[0]]), len(rows[sites[0]]))
            head = {s: torch.cat([carry[s], rows[s][:start]]) for s in sites}
            if len(head[sites[0]]) < batch_size:
                carry = head
                continue
            yield head
        n = len(rows[sites[0]])
        full = start + (n - start) // batch_size * batch_size
        for i in range(start, full, batch_size):
            yield {s: rows[s][i: i + batch_size] for s in sites}
        carry = {s: rows[s][full:] for s in sites} if full < n else None  # an empty view would hold the window
    if carry is not None and len(carry[sites[0]]) and not drop_last:
        yield carry


def read_ahead(store, sites: list[str], windows: list[Window], seed: int, workers: int, pin_memory: bool):
    """Each window's rows, in order, with up to `workers + 1` windows being read ahead of the consumer.
    On close, reads in progress finish and queued ones are dropped: no thread reads after it returns."""
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=THREAD_PREFIX)
    # in use at once: the windows read ahead or being read (workers + 1), the one being cut, the one before
    # it while a batch spans both, and one the consumer may still hold a batch of
    buffers = WindowBuffers(most=(workers + 4) * len(sites))
    pending = deque()
    todo = iter(windows)
    try:
        while True:
            while len(pending) <= workers and (w := next(todo, None)) is not None:
                pending.append(pool.submit(read_window, store, sites, w, seed, buffers, pin_memory))
            if not pending:
                return
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def shuffled_batches(store, sites: list[str], batch_size: int, seed: int = 0, start_batch: int = 0,
                     shuffle_chunks: int = 8, drop_last: bool = True, stop_row: int | None = None,
                     workers: int = 2, pin_memory: bool = False):
    """One epoch of shuffled batches (dicts site -> tensor [batch_size, width] in the store's dtype),
    from `start_batch` on, read by `workers` threads. Arguments as `ActivationStore.iter_batches`."""
    stop_row = store.n_tokens if stop_row is None else stop_row
    windows = plan_windows(store, seed, shuffle_chunks, stop_row, start_batch * batch_size)
    return cut_batches(read_ahead(store, sites, windows, seed, workers, pin_memory), sites, batch_size, drop_last)
