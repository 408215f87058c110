"""The threaded loader gives the batches the single-threaded reader gave, in the same order."""

import threading

import numpy as np
import pytest
import torch

from activations.store import ActivationStore
from activations.store.loader import THREAD_PREFIX, WindowBuffers, shuffled_batches
from store_fixtures import A, B, append_in_batches, make_rows, writer


def two_shard_store(root, dtype="float32"):
    for rank, (start, n) in enumerate([(0, 61), (61, 70)]):
        rows = make_rows(n, start=start)
        rows[A][:, 0] = torch.arange(start, start + n, dtype=torch.float32)  # the row's global index
        w = writer(root, rank, 2, dtype=dtype, chunk_rows=8)
        append_in_batches(w, rows, 13)
        w.finish()
    return ActivationStore(root)


def reference_order(store, batch_size, seed, shuffle_chunks, stop_row, drop_last):
    """Global row indices of each batch, as the reader computed them before the loader existed."""
    chunks = [(s.offset + start, s.offset + min(start + store.chunk_rows, s.rows, stop_row - s.offset))
              for s in store.shard_records for start in range(0, min(s.rows, stop_row - s.offset), store.chunk_rows)]
    order = np.random.default_rng(seed).permutation(len(chunks))
    stream = []
    for w in range(0, len(order), shuffle_chunks):
        rows = np.concatenate([np.arange(*chunks[i]) for i in order[w: w + shuffle_chunks]])
        stream.extend(rows[np.random.default_rng([seed, w]).permutation(len(rows))].tolist())
    cut = len(stream) - len(stream) % batch_size if drop_last else len(stream)
    return [stream[i: i + batch_size] for i in range(0, cut, batch_size)]


def ids(batches):
    return [b[A][:, 0].long().tolist() for b in batches]


@pytest.mark.parametrize("batch_size,shuffle_chunks,workers", [(10, 3, 1), (10, 3, 2), (7, 1, 3), (32, 2, 2), (200, 8, 2)])
@pytest.mark.parametrize("drop_last", [True, False])
def test_loader_order_is_the_old_order_and_resumes(tmp_path, batch_size, shuffle_chunks, workers, drop_last):
    store = two_shard_store(tmp_path / "activations")
    for stop_row in (None, 100):
        want = reference_order(store, batch_size, 3, shuffle_chunks, stop_row or store.n_tokens, drop_last)
        got = shuffled_batches(store, [A, B], batch_size, seed=3, shuffle_chunks=shuffle_chunks,
                               drop_last=drop_last, stop_row=stop_row, workers=workers)
        assert ids(got) == want
        for k in (1, 2, max(len(want) - 1, 0)):
            resumed = store.iter_batches([A, B], batch_size, seed=3, start_batch=k, shuffle_chunks=shuffle_chunks,
                                         drop_last=drop_last, stop_row=stop_row, workers=workers)
            assert ids(resumed) == want[k:]


def test_every_site_of_a_batch_holds_the_same_rows(tmp_path):
    store = two_shard_store(tmp_path / "activations", dtype="bfloat16")
    for batch in store.iter_batches([A, B], 16, seed=0, shuffle_chunks=2):
        assert batch[A].dtype == batch[B].dtype == torch.bfloat16
        rows = batch[A][:, 0].float().round().long()  # bf16 keeps integers below 256 exactly
        assert torch.equal(batch[B].float(), torch.from_numpy(store.read(B, 0, store.n_tokens))[rows])


def test_closing_the_loader_stops_its_threads(tmp_path):
    store = two_shard_store(tmp_path / "activations")
    batches = store.iter_batches(A, 4, seed=0, shuffle_chunks=1, workers=3)
    next(batches)
    batches.close()
    assert not [t for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX)]


def test_window_buffers_are_reused_only_when_no_batch_holds_them(tmp_path):
    store = two_shard_store(tmp_path / "activations")
    want = reference_order(store, 8, 1, 1, store.n_tokens, True)  # windows of one chunk, about a batch each
    held = list(shuffled_batches(store, [A, B], 8, seed=1, shuffle_chunks=1, workers=2))
    assert ids(held) == want  # every batch kept: none was overwritten by a later window

    buffers = WindowBuffers(most=2)
    first = buffers.take((8, 4), torch.int16, pin_memory=False)
    view = first[2:5]  # a batch cut from the window
    del first
    second = buffers.take((8, 4), torch.int16, pin_memory=False)
    assert not np.shares_memory(view.numpy(), second.numpy())  # the view still holds the first buffer
    del view
    again = buffers.take((8, 4), torch.int16, pin_memory=False)
    assert np.shares_memory(again.numpy(), buffers.kept[0])  # nothing holds it now: it comes round
    assert len(buffers.kept) == 2
