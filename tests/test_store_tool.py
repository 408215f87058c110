"""`python -m pipeline.store info|verify|merge` on stores laid out as harvests lay them out."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import zarr

from conftest import ROOT
from activations.store import ActivationStore, ShardWriter, blocks, info, merge, verify
from store_fixtures import (
    A, B, IDENTITY, SITES, all_rows, assert_same_rows, concat, damage, recommit, run_main, write_shard, write_store,
)

def test_info_tells_committed_from_still_being_written(tmp_path, windows, capsys):
    root = tmp_path / "run" / "activations"
    write_shard(root, windows, 0, 2)
    writing = write_shard(root, windows, 1, 2, finish=False)  # still running: a partial chunk in memory
    code, lines, _ = run_main(capsys, "info", "--json", tmp_path / "run")
    assert code == 0
    info = json.loads("\n".join(lines))
    rank0 = sum(len(w["tokens"]) for w in windows[0::2])
    assert info["tokens"] == rank0 + writing.committed_rows and not info["complete"]
    assert info["identity"] == IDENTITY and info["dtype"] == "bfloat16" and info["chunk_rows"] == 8
    assert info["codecs"] == ["bytes", "crc32c"] and info["world_size"] == 2 and info["origin"] is None
    assert [(s["name"], s["rows"], s["done"]) for s in info["shards"]] == [
        ("r00000-of-00002", rank0, True), ("r00001-of-00002", writing.committed_rows, False)]
    assert {site: s["width"] for site, s in info["sites"].items()} == SITES
    # bf16 rows of the committed chunks (the finished shard's last chunk is partial), plus checksums
    assert info["sites"][A]["bytes"] >= info["tokens"] * 8 * 2
    assert info["bytes"] > sum(s["bytes"] for s in info["sites"].values())

    code, lines, _ = run_main(capsys, "info", root)
    text = "\n".join(lines)
    assert code == 0 and f"tokens    {info['tokens']} committed; still being written: r00001-of-00002" in text
    assert "model=tiny d_model=8 hc_reduce=mean data=f00d context_length=12" in text
    assert "L1.resid_post" in text and "r00000-of-00002" in text
    writing.close()


# ----------------------------------------------------------------------------------------
# verify


def test_verify_passes_a_clean_store_and_one_being_written(tmp_path, windows, split, capsys):
    code, lines, _ = run_main(capsys, "verify", split.root)
    assert code == 0 and len(lines) == 1
    assert lines[0].startswith(f"verify: ok: {split.n_tokens} committed tokens in 2 shard(s)")
    assert lines[0].endswith("complete")

    root = tmp_path / "partial" / "activations"
    write_shard(root, windows, 1, 3, finish=False).close()  # ranks 0 and 2 have not started
    code, lines, _ = run_main(capsys, "verify", root)
    assert code == 0 and lines[-1].endswith("still being written: r00000-of-00003, r00001-of-00003, r00002-of-00003")


@pytest.mark.parametrize("kind", ["truncate", "flip", "delete"])
def test_verify_names_a_damaged_chunk(split, kind, capsys):
    lo, hi, reason = damage(split.root.path, kind, "r00001-of-00002", A)
    code, lines, _ = run_main(capsys, "verify", split.root)
    assert code == 1 and lines[-1].startswith("verify: 1 problem(s)")
    assert lines[0].startswith(f"{A} rows [{lo}, {hi}) in shard r00001-of-00002: {reason}")


def test_verify_finds_non_finite_rows_written_past_the_writer(split, capsys):
    array = zarr.open_array(split.root.path / "shards" / "r00000-of-00002" / B, mode="r+")
    array[9, 2] = 0x7FC0  # bf16 NaN bits, behind the writer's back (the checksum is valid)
    array[20, 0] = 0xFF80  # -inf
    recommit(split.root.path, "r00000-of-00002", B, 1, 2)
    code, lines, _ = run_main(capsys, "verify", split.root)
    assert code == 1
    assert lines[:2] == [f"{B} rows [8, 16) in shard r00000-of-00002: 1 non-finite rows (writers drop those, so the chunk is damaged)",
                         f"{B} rows [16, 24) in shard r00000-of-00002: 1 non-finite rows (writers drop those, so the chunk is damaged)"]


def test_verify_checks_the_harvest_order_within_and_across_shards(tmp_path, windows, capsys):
    root = tmp_path / "bad" / "activations"
    mixed = [dict(w) for w in windows]
    mixed[4] = mixed[4] | {"windows": np.full(len(mixed[4]["tokens"]), 5)}  # rank 0 holds rank 1's window
    assert windows[6]["doc_ids"][-1] > 0
    mixed[8] = mixed[8] | {"doc_ids": np.zeros_like(mixed[8]["doc_ids"])}  # documents run backwards
    write_store(root, mixed, 2)
    (root / "manifests" / "r00002-of-00003.json").write_text("{}")  # a writer with another world_size
    zarr.open_group(root, mode="r+").require_group("shards/r00002-of-00003")
    code, lines, _ = run_main(capsys, "verify", root)
    assert code == 1
    rows_before = [sum(len(w["tokens"]) for w in windows[0:k:2]) for k in (4, 8)]
    assert lines[0].startswith("manifests/r00002-of-00003.json: belongs to no shard of this store (world_size 2)")
    assert lines[1].startswith("shards/r00002-of-00003: belongs to no shard of this store (world_size 2)")
    expected = [
        f"windows rows [{rows_before[0] // 8 * 8}, ",  # window 4's chunk: another rank's window
        f"doc_ids rows [{rows_before[1] // 8 * 8}, ",
        "windows 4 (1) are in no shard",
    ]
    for start in expected:
        assert any(line.startswith(start) for line in lines), (start, lines)
    assert any("windows of another rank" in line for line in lines)
    assert any("doc_ids go backwards" in line for line in lines)


def test_verify_finds_a_window_lost_between_shards(tmp_path, windows, capsys):
    root = tmp_path / "lost" / "activations"
    write_store(root, windows[:9] + [windows[9] | {k: v[:0] for k, v in windows[9].items()}] + windows[10:], 2)
    code, lines, _ = run_main(capsys, "verify", root)
    assert code == 1 and lines[0].startswith("windows 9 (1) are in no shard: their rows are lost")


# ----------------------------------------------------------------------------------------
# merge


def test_merge_in_rank_order_reads_as_the_shards_do(tmp_path, split, capsys):
    code, lines, _ = run_main(capsys, "consolidate", split.root, tmp_path / "merged")
    assert code == 0 and lines == [f"merge: {split.n_tokens} tokens from {split.root} in ranks order into {tmp_path / 'merged'}"]
    merged = ActivationStore(tmp_path / "merged")
    assert merged.world_size == 1 and merged.complete and merged.n_tokens == split.n_tokens
    assert (merged.identity, merged.sites, merged.dtype, merged.chunk_rows) == (split.identity, split.sites, split.dtype, split.chunk_rows)
    assert merged.origin == {"merged_from": str(split.root), "order": "ranks", "world_size": 2}
    assert_same_rows(all_rows(merged), all_rows(split))
    for site in SITES:
        assert merged.site_stats(site).to_json() == split.site_stats(site).to_json()
    assert verify(tmp_path / "merged", progress=False).ok


@pytest.mark.parametrize("world_size", [2, 3])
def test_merge_in_window_order_equals_a_one_writer_harvest(tmp_path, windows, world_size):
    single = write_store(tmp_path / "single", windows, 1)
    sharded = write_store(tmp_path / "sharded", windows, world_size)
    assert not np.array_equal(sharded.tokens(0, sharded.n_tokens)["windows"], single.tokens(0, single.n_tokens)["windows"])

    merged = merge(tmp_path / "sharded", tmp_path / "merged", order="windows", progress=False, fsync=False)
    assert_same_rows(all_rows(merged), all_rows(single))
    assert merged.shards == [("r00000-of-00001", single.n_tokens, single.n_tokens, True)]
    for site in SITES:  # the same sums, added in another order
        want, got = single.stats(site), merged.stats(site)
        assert got["count"] == want["count"] and got["max_norm"] == want["max_norm"]
        np.testing.assert_allclose(got["mean"], want["mean"], rtol=1e-6)
        np.testing.assert_allclose(got["mean_norm"], want["mean_norm"], rtol=1e-12)
    assert verify(tmp_path / "merged", progress=False).ok


def test_merge_keeps_float32_and_compression(tmp_path, windows):
    write_store(tmp_path / "src", windows, 2, dtype="float32", compression="zstd")
    merged = merge(tmp_path / "src", tmp_path / "merged", order="windows", progress=False, fsync=False)
    assert merged.dtype == "float32" and info.describe(merged)["codecs"] == ["bytes", "zstd", "crc32c"]
    assert_same_rows(all_rows(merged), all_rows(write_store(tmp_path / "single", windows, 1, dtype="float32")))


def test_a_killed_merge_resumes(tmp_path, windows, split, monkeypatch):
    monkeypatch.setattr(blocks, "BLOCK_BYTES", 1)  # one chunk per append, so the kill lands mid-merge
    clean = merge(split.root, tmp_path / "clean", order="windows", progress=False, fsync=False)
    appends = 0

    def dying_append(self, rows, append=ShardWriter.append):
        nonlocal appends
        appends += 1
        if appends == 4:
            raise KeyboardInterrupt
        append(self, rows)

    monkeypatch.setattr(ShardWriter, "append", dying_append)
    with pytest.raises(KeyboardInterrupt):
        merge(split.root, tmp_path / "killed", order="windows", progress=False, fsync=False)
    interrupted = ActivationStore(tmp_path / "killed").n_tokens
    assert 0 < interrupted < clean.n_tokens and interrupted % 8 == 0
    monkeypatch.undo()
    resumed = merge(split.root, tmp_path / "killed", order="windows", progress=False, fsync=False)
    assert_same_rows(all_rows(resumed), all_rows(clean))
    assert merge(split.root, tmp_path / "killed", order="windows", progress=False, fsync=False).n_tokens == clean.n_tokens


def test_merge_refusals_are_one_line(tmp_path, windows, split, capsys):
    root = tmp_path / "partial" / "activations"
    write_shard(root, windows, 0, 2)
    code, lines, err = run_main(capsys, "merge", root, tmp_path / "out")
    assert code == 2 and err == (f"store merge: error: {root} is still being written (r00001-of-00002): "
                                 "finish or resume that harvest, then merge")

    old = tmp_path / "old"
    writer = ShardWriter(old, 0, 1, SITES, IDENTITY, chunk_rows=8, background=False)
    writer.append({k: v for k, v in concat(windows[:3]).items() if k != "windows"})  # a writer that knows no windows
    writer.finish()
    code, _, err = run_main(capsys, "merge", old, tmp_path / "out", "--order", "windows")
    assert code == 2 and "has rows without a window index" in err and "--order ranks" in err

    merge(split.root, tmp_path / "once", progress=False, fsync=False)
    code, _, err = run_main(capsys, "merge", split.root, tmp_path / "once", "--order", "windows")
    assert code == 2 and err.startswith(f"store merge: error: {tmp_path / 'once'} already holds a store merged from")
    assert err.endswith("remove it or choose another destination")  # another merge is not resumed into it

    for command, argv in [("info", ["info", tmp_path / "nowhere"]), ("verify", ["verify", tmp_path]),
                          ("info", ["--storage-options", "{", "info", "s3://bucket/x"])]:
        code, _, err = run_main(capsys, *argv)
        assert code == 2 and err.startswith(f"store {command}: error:") and "\n" not in err


def test_old_stores_without_a_window_column_still_read(tmp_path, windows):
    store = write_store(tmp_path / "run", windows, 1)
    for array in (tmp_path / "run" / "shards").glob("*/windows"):
        shutil.rmtree(array)
    old = ActivationStore(tmp_path / "run")
    assert (old.tokens(0, old.n_tokens)["windows"] == -1).all()
    np.testing.assert_array_equal(old.tokens(0, old.n_tokens)["doc_ids"], store.tokens(0, store.n_tokens)["doc_ids"])
    assert verify(tmp_path / "run", progress=False).ok


def test_the_command_line_entry_point(split):
    result = subprocess.run([sys.executable, "-m", "pipeline.store", "verify", str(split.root)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("verify: ok:") and "tok/s" in result.stderr  # the progress bar


def test_a_two_writer_harvest_merged_in_window_order_is_the_one_writer_harvest(tmp_path):
    from conftest import compose_config
    from activations.harvesting import harvest

    common = [f"run.runs_dir={tmp_path}", "model=tiny_deepseek_v4", "data.context_length=32", "harvest.batch_size=4",
              "harvest.sites=[L1.ffn_out]", "harvest.max_tokens=640", "store.chunk_rows=64", "store.fsync=false"]
    single = harvest(compose_config("harvest", [*common, "run.run_name=single"]))
    for rank in (1, 0):
        harvest(compose_config("harvest", [*common, "run.run_name=split", f"harvest.rank={rank}", "harvest.world_size=2"]))
    assert verify(tmp_path / "split", progress=False).ok

    merged = merge(tmp_path / "split", tmp_path / "merged" / "activations", order="windows", progress=False, fsync=False)
    want, got = all_rows(single), all_rows(merged)
    assert (got["windows"] == np.repeat(np.arange(20), 31)).all()  # each window's BOS is left out
    for key in ("tokens", "doc_ids", "positions", "windows"):
        np.testing.assert_array_equal(got[key], want[key])
    # Different batch groupings round differently; the values agree to bf16 precision.
    np.testing.assert_allclose(got["L1.ffn_out"], want["L1.ffn_out"], rtol=2e-2, atol=1e-3)
    assert verify(tmp_path / "merged", progress=False).ok
