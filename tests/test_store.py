"""The activation store on a real disk: exactness, commits, resume, shards, stats, batches."""

import json
import os
import subprocess

import numpy as np
import pytest
import torch
import zarr

from activations.store import ActivationStore, ShardWriter, StoreError
from activations.store.chunks import is_plain, read_rows
from activations.store.positions import BLOCK
from store_fixtures import A, B, SITES, append_in_batches, cut, make_rows, run_main, writer

def as_stored(x, dtype):
    """What the store keeps of a float32 tensor: bf16 rounding, or nothing for float32."""
    return x.to(torch.bfloat16).float().numpy() if dtype == "bfloat16" else x.numpy()


def manifest(root, name="r00000-of-00001"):
    return json.loads((root / "manifests" / f"{name}.json").read_text())


@pytest.mark.parametrize("background", [False, True])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_round_trip_is_exact(tmp_path, dtype, background):
    rows = make_rows(50)
    rows[A][0, 0] = 3e30  # a "massive activation": float16 would overflow, bf16 keeps it
    rows[A][1, 1] = -1e-30
    root = tmp_path / "activations"
    w = writer(root, dtype=dtype, background=background, compression="zstd")
    append_in_batches(w, rows, 7)
    w.finish()

    store = ActivationStore(tmp_path)
    assert store.n_tokens == 50 and store.dtype == dtype and store.sites == [A, B]
    for site in SITES:
        got = store.read(site, 0, 50)
        assert got.dtype == np.float32 and store.shape(site) == (50, SITES[site])
        np.testing.assert_array_equal(got, as_stored(rows[site], dtype))
    if dtype == "bfloat16":  # bit for bit, not just equal values
        bits = torch.from_numpy(store.read(A, 0, 50)).to(torch.bfloat16).view(torch.int16)
        assert torch.equal(bits, rows[A].to(torch.bfloat16).view(torch.int16))
        array = zarr.open_array(root / "shards" / "r00000-of-00001" / A, mode="r")
        assert array.dtype == np.uint16 and array.attrs["logical_dtype"] == "bfloat16"
    tokens = store.tokens(10, 20)
    for name in ("tokens", "doc_ids", "positions"):
        np.testing.assert_array_equal(tokens[name], rows[name][10:20])


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_chunk_files_read_directly_equal_zarrs_reads(tmp_path, compression):
    """Plain arrays are read from their chunk files (activations/store/chunks.py), compressed ones
    through zarr; either way every range, whole chunks, spans and a partial last chunk, reads the same."""
    rows = make_rows(70)  # chunks of 16: the fifth is partial
    w = writer(tmp_path / "activations", compression=compression)
    append_in_batches(w, rows, 9)
    w.finish()
    store = ActivationStore(tmp_path)
    shard = store.shard_records[0].name
    for name in (A, B, "tokens", "positions"):
        array = store.shard_array(shard, name)
        assert is_plain(array) == (compression is None)
        for start, stop in [(0, 16), (16, 32), (3, 5), (10, 50), (64, 70), (0, 70), (48, 70)]:
            got = store.read_shard(shard, name, start, stop)
            np.testing.assert_array_equal(got, array[start:stop], err_msg=f"{name} [{start}, {stop})")
            if compression is None:  # the direct path was taken, not zarr's
                folder = tmp_path / "activations" / "shards" / shard / name
                np.testing.assert_array_equal(read_rows(folder, array, start, stop, lambda index: None), got)


def test_uncommitted_rows_are_invisible(tmp_path):
    rows = make_rows(20)
    w = writer(tmp_path / "activations")
    w.append(cut(rows, 0, 10))  # less than a chunk: buffered, not committed
    before = ActivationStore(tmp_path)
    assert before.n_tokens == 0 and w.committed_rows == 0
    with pytest.raises(StoreError, match="0 committed rows"):
        before.read(A, 0, 1)

    w.append(cut(rows, 10, 20))  # completes one chunk of 16
    assert before.n_tokens == 0  # a reader is a snapshot of the commits when opened
    after = ActivationStore(tmp_path)
    assert after.n_tokens == 16
    np.testing.assert_array_equal(after.read(A, 0, 16), as_stored(rows[A][:16], "bfloat16"))
    with pytest.raises(StoreError):
        after.read(A, 0, 17)

    w.finish()
    assert ActivationStore(tmp_path).n_tokens == 20


def test_commits_are_chunk_aligned_and_never_rewrite_a_chunk(tmp_path):
    root = tmp_path / "activations"
    rows = make_rows(100)
    w = writer(root)
    first_chunk = root / "shards" / "r00000-of-00001" / A / "c" / "0" / "0"
    seen = None
    for i in range(0, 100, 7):
        w.append(cut(rows, i, i + 7))
        appended = min(i + 7, 100)
        assert w.committed_rows == appended // 16 * 16
        if w.committed_rows:
            assert manifest(root)["rows"] == w.committed_rows
            seen = seen or (first_chunk.stat().st_ino, first_chunk.stat().st_mtime_ns)
    w.finish()
    assert manifest(root) | {"stats": None, "crc32c": None} == {"rows": 100, "consumed": 100, "done": True, "stats": None,
                                                                "crc32c": None}
    assert (first_chunk.stat().st_ino, first_chunk.stat().st_mtime_ns) == seen


def test_resume_after_an_abandoned_writer(tmp_path):
    n, dropped = 120, {20, 45, 47}
    rows = make_rows(n)
    rows[A][20, 3] = float("nan")
    rows[B][45, 0] = float("inf")
    rows[A][47, 0] = float("-inf")

    clean = writer(tmp_path / "clean" / "activations")
    append_in_batches(clean, rows, 9)
    clean.finish()

    root = tmp_path / "run" / "activations"
    killed = writer(root)
    append_in_batches(killed, cut(rows, 0, 72), 9)  # never closed: it "dies" here,
    killed._lock.close()  # and the OS drops a dead process's lock
    committed, consumed = killed.committed_rows, killed.consumed
    kept = [i for i in range(n) if i not in dropped]
    assert committed == 64 and consumed == kept[committed - 1] + 1
    # A kill between a chunk write and its manifest leaves rows the manifest does not name.
    stale = zarr.open_array(root / "shards" / "r00000-of-00001" / A, mode="r+")
    stale.resize((committed + 16, 8))
    stale[committed:] = 7

    resumed = writer(root, background=True)
    assert (resumed.committed_rows, resumed.consumed, resumed.done) == (committed, consumed, False)
    assert zarr.open_array(root / "shards" / "r00000-of-00001" / A, mode="r").shape == (committed, 8)
    append_in_batches(resumed, cut(rows, consumed, n), 5)
    resumed.finish()

    want, got = ActivationStore(tmp_path / "clean"), ActivationStore(tmp_path / "run")
    assert got.n_tokens == want.n_tokens == n - len(dropped)
    assert got.shards == want.shards == [("r00000-of-00001", n - 3, n, True)]
    for site in SITES:
        np.testing.assert_array_equal(got.read(site, 0, got.n_tokens), want.read(site, 0, want.n_tokens))
        assert got.stats(site)["nonfinite_rows"] == want.stats(site)["nonfinite_rows"]
        np.testing.assert_allclose(got.stats(site)["mean_norm"], want.stats(site)["mean_norm"], rtol=1e-12)
    for name in ("tokens", "doc_ids", "positions"):
        np.testing.assert_array_equal(got.tokens(0, got.n_tokens)[name], want.tokens(0, want.n_tokens)[name])


def test_committed_checksums_of_whole_blocks_move_to_block_files(tmp_path, capsys):
    """A manifest keeps the checksums of its last chunks only; whole blocks of BLOCK go to their own files,
    which readers and verify check against as they check the manifest's (positions.py)."""
    rows, root = make_rows(4 * BLOCK + 30), tmp_path / "activations"  # chunks of 2 rows: two whole blocks and 15
    killed = writer(root, chunk_rows=2)
    append_in_batches(killed, cut(rows, 0, 2 * BLOCK + 40), 9)  # a block written, then a kill
    killed._lock.close()
    resumed = writer(root, chunk_rows=2)
    append_in_batches(resumed, cut(rows, resumed.consumed, len(rows["tokens"])), 7)
    resumed.finish()

    shard = "r00000-of-00001"
    blocks = sorted(path.name for path in (root / "manifests" / f"{shard}.crc32c").iterdir())
    assert blocks == ["000000.json", "000001.json"] and {len(v) for v in manifest(root)["crc32c"].values()} == {15}
    store = ActivationStore(tmp_path)
    np.testing.assert_array_equal(store.read(A, 0, store.n_tokens), rows[A].to(torch.bfloat16).float().numpy())
    code, lines, _ = run_main(capsys, "verify", tmp_path)
    assert code == 0 and lines[-1].startswith("verify: ok"), lines

    chunks = root / "shards" / shard / A / "c"
    first, second = (chunks / "3" / "0").read_bytes(), (chunks / str(BLOCK + 1) / "0").read_bytes()
    (chunks / "3" / "0").write_bytes(second)  # a chunk of block 0 in the place of one of block 1
    (chunks / str(BLOCK + 1) / "0").write_bytes(first)
    with pytest.raises(StoreError, match=f"{A} rows \\[6, 8\\) in shard {shard}: not the chunk committed here"):
        ActivationStore(tmp_path).read(A, 0, 10)
    code, lines, _ = run_main(capsys, "verify", tmp_path)
    assert code == 1 and [line.split(":")[0] for line in lines[:2]] == [
        f"{A} rows [6, 8) in shard {shard}", f"{A} rows [{2 * BLOCK + 2}, {2 * BLOCK + 4}) in shard {shard}"]


def test_two_shards_read_in_rank_order(tmp_path):
    root = tmp_path / "activations"
    rows0, rows1 = make_rows(45, seed=0), make_rows(30, start=45, seed=1)
    w1 = writer(root, rank=1, world_size=2, background=True)  # rank 1 first: order is by rank
    append_in_batches(w1, rows1, 8)
    w1.finish()
    w0 = writer(root, rank=0, world_size=2, background=True)
    append_in_batches(w0, rows0, 8)
    assert not ActivationStore(root).complete
    w0.finish()

    store = ActivationStore(root)
    assert store.complete and store.n_tokens == 75
    assert store.shards == [("r00000-of-00002", 45, 45, True), ("r00001-of-00002", 30, 30, True)]
    both = np.concatenate([as_stored(rows0[A], "bfloat16"), as_stored(rows1[A], "bfloat16")])
    np.testing.assert_array_equal(store.read(A, 0, 75), both)
    np.testing.assert_array_equal(store.read(A, 40, 50), both[40:50])
    np.testing.assert_array_equal(store.tokens(0, 75)["tokens"], np.arange(75) + 1000)


def test_nonfinite_rows_are_dropped_and_counted(tmp_path):
    rows = make_rows(40)
    rows[A][3, 0] = float("nan")
    rows[A][10, 1] = float("inf")
    rows[B][10, 2] = float("nan")
    rows[B][20, 3] = float("-inf")
    rows[A][30, 0] = 3.4e38  # finite in float32, infinite once rounded to bf16
    w = writer(tmp_path / "activations")
    append_in_batches(w, rows, 11)
    w.finish()

    store = ActivationStore(tmp_path)
    kept = [i for i in range(40) if i not in {3, 10, 20, 30}]
    assert store.n_tokens == len(kept) and store.shards[0][2] == 40
    np.testing.assert_array_equal(store.tokens(0, store.n_tokens)["tokens"], rows["tokens"][kept])
    for site in SITES:
        np.testing.assert_array_equal(store.read(site, 0, store.n_tokens), as_stored(rows[site][kept], "bfloat16"))
    assert store.stats(A)["nonfinite_rows"] == 3 and store.stats(B)["nonfinite_rows"] == 2
    assert store.stats(A)["count"] == len(kept)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_stats_match_numpy(tmp_path, dtype):
    root = tmp_path / "activations"
    for rank, n in enumerate([37, 50]):
        rows = make_rows(n, seed=rank)
        rows[A] += torch.linspace(0, 5, 8)  # a shared offset, so outlier_ratio is far from 0
        rows[A][5, 2] = 3e30  # a massive activation: its square overflows float32
        w = writer(root, rank, 2, dtype=dtype)
        append_in_batches(w, rows, 13)
        w.finish()
        x = w.stats(A)
        assert x["count"] == n

    store = ActivationStore(root)
    for site in SITES:
        x = store.read(site, 0, store.n_tokens).astype(np.float64)
        norms = np.linalg.norm(x, axis=1)
        stats = store.stats(site)
        assert stats["count"] == 87 and stats["nonfinite_rows"] == 0
        np.testing.assert_allclose(stats["mean"], x.mean(0), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(stats["mean_norm"], norms.mean(), rtol=1e-9)
        np.testing.assert_allclose(stats["max_norm"], norms.max(), rtol=1e-9)
        np.testing.assert_allclose(stats["outlier_ratio"], np.linalg.norm(x.mean(0)) / norms.mean(), rtol=1e-9)
    assert store.stats(A)["outlier_ratio"] > 0.5 > store.stats(B)["outlier_ratio"]


def test_a_different_run_is_refused(tmp_path):
    root = tmp_path / "activations"
    identity = {"model": "smollm2_135m", "d_model": 576, "hc_reduce": "mean"}
    writer(root, identity=identity).finish()
    writer(root, identity=dict(reversed(identity.items()))).close()  # same identity: fine

    with pytest.raises(StoreError) as err:
        writer(root, identity=identity | {"model": "tiny_deepseek_v4", "d_model": 64})
    message = str(err.value)
    assert "\n" not in message and "use another run_name" in message
    assert "model=smollm2_135m, d_model=576; this run has model=tiny_deepseek_v4, d_model=64" in message
    assert "hc_reduce" not in message
    with pytest.raises(StoreError, match="world_size=1; this run has world_size=2"):
        writer(root, rank=1, world_size=2, identity=identity)
    with pytest.raises(StoreError, match="dtype=bfloat16; this run has dtype=float32"):
        writer(root, identity=identity, dtype="float32")
    with pytest.raises(StoreError, match="sites="):
        writer(root, identity=identity, sites={A: 16})


def test_iter_batches_covers_each_row_once_in_a_seeded_order(tmp_path):
    root = tmp_path / "activations"
    for rank, (start, n) in enumerate([(0, 37), (37, 50)]):
        rows = make_rows(n, start=start)
        rows[A][:, 0] = torch.arange(start, start + n, dtype=torch.float32)  # the row's global index
        rows[B] = -rows[A][:, :4]
        w = writer(root, rank, 2, dtype="float32", chunk_rows=8)
        append_in_batches(w, rows, 10)
        w.finish()
    store = ActivationStore(root)

    def ids(batches):
        return [b[A][:, 0].long().tolist() for b in batches]

    epoch = list(store.iter_batches([A, B], 10, seed=1, shuffle_chunks=3, drop_last=False))
    assert [len(b[A]) for b in epoch] == [10] * 8 + [7]
    assert sorted(sum(ids(epoch), [])) == list(range(87))
    assert all(b[A].dtype == torch.float32 and torch.equal(b[B], -b[A][:, :4]) for b in epoch)
    assert ids(store.iter_batches([A, B], 10, seed=1, shuffle_chunks=3, drop_last=False)) == ids(epoch)
    assert ids(store.iter_batches(A, 10, seed=2, shuffle_chunks=3, drop_last=False)) != ids(epoch)
    for k in (1, 3, 8, 9, 20):
        resumed = store.iter_batches([A, B], 10, seed=1, start_batch=k, shuffle_chunks=3, drop_last=False)
        assert ids(resumed) == ids(epoch)[k:]

    full = ids(store.iter_batches(A, 10, seed=1, shuffle_chunks=3))
    assert full == ids(epoch)[:8]
    flat = sum(ids(store.iter_batches(A, 16, seed=5)), [])
    assert len(flat) == 80 and len(set(flat)) == 80


def test_context_stays_within_a_document(tmp_path):
    root = tmp_path / "activations"
    rows = make_rows(40)
    rows["doc_ids"] = np.repeat([0, 1, 2], [10, 15, 15])
    w = writer(root, 0, 2)
    w.append(rows)
    w.finish()
    w = writer(root, 1, 2)
    w.append(make_rows(20, start=40) | {"doc_ids": np.full(20, 2)})  # same doc id, other shard
    w.finish()
    store = ActivationStore(root)

    tokens, offset = store.context(12, before=5, after=3)
    assert tokens.tolist() == list(range(1010, 1016)) and offset == 2
    tokens, offset = store.context(30)
    assert tokens.tolist() == list(range(1025, 1039)) and offset == 5
    tokens, offset = store.context(39)
    assert tokens.tolist() == list(range(1025, 1040)) and offset == 14
    tokens, offset = store.context(40, before=4, after=2)
    assert tokens.tolist() == [1040, 1041, 1042] and offset == 0


def test_missing_store_is_a_clear_error(tmp_path):
    for path in (tmp_path, tmp_path / "nowhere"):
        with pytest.raises(StoreError, match="no activation store at .*: run `make harvest` first") as err:
            ActivationStore(path)
        assert "\n" not in str(err.value)


def test_finished_shard_refuses_appends(tmp_path):
    root = tmp_path / "activations"
    w = writer(root)
    w.append(make_rows(5))
    w.finish()
    w.finish()  # idempotent
    with pytest.raises(StoreError, match="already finished"):
        w.append(make_rows(5))
    w.close()
    again = writer(root)
    assert again.done and again.committed_rows == 5
    with pytest.raises(StoreError, match="already finished"):
        again.append(make_rows(5))


def test_bad_rows_are_refused_and_the_writer_goes_on(tmp_path):
    w = writer(tmp_path / "activations")
    rows = make_rows(4)
    with pytest.raises(StoreError, match="missing"):
        w.append({k: v for k, v in rows.items() if k != B})
    with pytest.raises(StoreError, match=r"expected float \[4, 8\]"):
        w.append(rows | {A: torch.zeros(4, 9)})
    w.append(rows)
    w.finish()
    assert w.committed_rows == 4


def test_an_exception_leaves_the_partial_chunk_uncommitted(tmp_path):
    root = tmp_path / "activations"
    with pytest.raises(ValueError):
        with writer(root, background=True) as w:
            w.append(make_rows(20))
            raise ValueError("the model crashed")
    assert manifest(root) | {"stats": None, "crc32c": None} == {"rows": 16, "consumed": 16, "done": False, "stats": None,
                                                                "crc32c": None}
    assert ActivationStore(root).n_tokens == 16


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs, so the disk really fills up."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)]
    mounted = subprocess.run(mount, capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.parametrize("background", [False, True])
def test_disk_full_keeps_committed_rows_readable(tiny_disk, background):
    sites = {A: 256}
    rows = make_rows(50 * 60, sites=sites)  # 3000 rows of 1 KiB: three times the disk
    w = writer(tiny_disk / "activations", sites=sites, dtype="float32", chunk_rows=32, background=background)
    with pytest.raises(StoreError) as err:
        append_in_batches(w, rows, 50)
        w.finish()
    message = str(err.value)
    assert "No space left on device" in message and "committed rows remain readable" in message
    assert "\n" not in message
    with pytest.raises(StoreError):  # the writer stays failed
        w.close()

    store = ActivationStore(tiny_disk)
    n = store.n_tokens
    assert n > 0 and n % 32 == 0 and n == manifest(tiny_disk / "activations")["rows"]
    np.testing.assert_array_equal(store.read(A, 0, n), rows[A][:n].numpy())
    np.testing.assert_array_equal(store.tokens(0, n)["tokens"], rows["tokens"][:n])


def test_a_shard_has_one_writer_at_a_time(tmp_path):
    first = ShardWriter(tmp_path / "activations", 0, 1, {"L0.ffn_out": 4}, {"model": "m"}, background=False)
    with pytest.raises(StoreError, match="shard r00000-of-00001 is being written by another process"):
        ShardWriter(tmp_path / "activations", 0, 1, {"L0.ffn_out": 4}, {"model": "m"}, background=False)
    first.close()
    ShardWriter(tmp_path / "activations", 0, 1, {"L0.ffn_out": 4}, {"model": "m"}, background=False).close()


def test_bf16_batches_come_as_bfloat16_views_of_the_stored_bits(tmp_path):
    w = writer(tmp_path / "activations", dtype="bfloat16", chunk_rows=8)
    w.append(make_rows(32))
    w.finish()
    store = ActivationStore(tmp_path)
    batches = list(store.iter_batches(A, 32, seed=0, shuffle_chunks=1))
    assert batches[0][A].dtype == torch.bfloat16
    got = torch.sort(batches[0][A].float(), dim=0).values
    want = torch.sort(torch.from_numpy(store.read(A, 0, 32)), dim=0).values
    assert torch.equal(got, want)
