"""Damaged stores: every read path names the damage (site, rows, shard, the fix) or, for a torn
manifest, reads the last good commit. No path returns zeros, another chunk's rows or other numbers
for rows a manifest commits, and no malformed metadata escapes as a traceback."""

import itertools
import json
import shutil

import numpy as np
import pytest
import torch

from conftest import SMOL_SAE, SMOL_SITE, compose_config, copy_run, run_stage
from activations.store import ActivationStore, ShardWriter, StoreError, merge, verify
from features.mining import FeatureMiner, MiningPlan
from sae.architectures import build_sae
from sae.training import training_batches
from store_fixtures import (
    A, IDENTITY, MALFORMED, SITES, all_rows, assert_same_rows, concat, damage, malform, run_main, scale_norms, write_shard,
    write_store,
)

SHARD = "r00001-of-00002"  # the damaged shard of the `split` store: the last one
# chunks (missing, cut, changed, swapped, linked, a directory), array metadata, the manifest
KINDS = ["delete", "truncate", "flip", "swap", "link", "directory", "retype", "big_endian", "manifest_ahead"]


def tiny_sae(d_in: int):
    cfg = compose_config("train", ["sae.expansion_factor=2", "sae.k=2"])
    return build_sae(cfg.sae, d_in, {"model_name": "tiny", "hook_name": A, "context_size": 12})


def train_cfg():
    return compose_config("train", ["train.batch_size=8", "train.shuffle_chunks=2"])


# Each read path as a call on a store, and the column to damage: the first one it reads.
def read_all(store, row):
    store.read(A, 0, store.n_tokens)


def iterate(store, row):
    list(store.iter_batches(A, 8, drop_last=False))


def context(store, row):
    store.context(row)


def train(store, row):
    for _ in itertools.islice(training_batches(store, [A], train_cfg(), 0), store.n_tokens // 8 + 1):
        pass  # one epoch and a batch: every chunk is read


def mine(store, row):
    FeatureMiner(store, A, tiny_sae(8), MiningPlan(context_tokens=4, top_examples=2, sampled_examples=2, pool_blocks=4,
                                                   batch_blocks=4), torch.device("cpu")).run()


def merge_it(store, row):
    merge(store.root, store.root.path.parent / "merged", progress=False, fsync=False)


PATHS = {"read": (read_all, A), "iter_batches": (iterate, A), "context": (context, "tokens"), "train": (train, A),
         "label": (mine, A), "merge": (merge_it, "tokens")}


def names(message: str, column: str, kind: str, lo: int, hi: int, reason: str) -> bool:
    """Whether a message names the damage; either chunk of a swapped pair, whichever was read first."""
    ranges = [(lo, hi), (hi, 2 * hi - lo)] if kind == "swap" else [(lo, hi)]
    return any(message.startswith(f"{column} rows [{a}, {b}) in shard {SHARD}: {reason}") for a, b in ranges)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("path", PATHS)
def test_every_read_path_names_the_damage(split, kind, path):
    read, column = PATHS[path]
    lo, hi, reason = damage(split.root.path, kind, SHARD, column)
    store = ActivationStore(split.root)
    offset = store.shard_records[1].offset
    with pytest.raises(StoreError) as caught:
        read(store, offset + lo + 1)
    message = str(caught.value)
    assert names(message, column, kind, lo, hi, reason), message
    assert f"run `python -m pipeline.store verify {split.root}`" in message and "\n" not in message


def test_reads_that_miss_the_damage_still_work(split, windows):
    clean = all_rows(split)
    damage(split.root.path, "delete", SHARD, A)
    store = ActivationStore(split.root)
    first = store.shard_records[1].offset
    np.testing.assert_array_equal(store.read(A, 0, first + 16), clean[A][: first + 16])
    np.testing.assert_array_equal(store.tokens(0, store.n_tokens)["tokens"], clean["tokens"])
    with pytest.raises(StoreError, match="chunk missing"):
        store.read(A, first + 23, first + 24)  # one row of the missing chunk is enough


@pytest.mark.parametrize("kind", KINDS)
def test_verify_names_what_the_readers_name(split, kind):
    lo, hi, reason = damage(split.root.path, kind, SHARD, A)
    problems = verify(split.root, progress=False).problems
    assert any(names(p, A, kind, lo, hi, reason) for p in problems), problems
    if kind in ("delete", "link", "directory"):  # one chunk hurt: one problem
        assert len(problems) == 1, problems


def test_swapped_chunks_of_a_compressed_store_are_named_through_zarr(tmp_path, windows):
    """Compressed chunks are read by zarr, not from their files: the store zarr reads through checks them."""
    root = tmp_path / "zstd" / "activations"
    write_store(root, windows, 2, compression="zstd")
    lo, hi, reason = damage(root, "swap", SHARD, A)
    store = ActivationStore(root)
    offset = store.shard_records[1].offset
    with pytest.raises(StoreError) as caught:
        store.read(A, offset + lo, offset + hi)
    assert names(str(caught.value), A, "swap", lo, hi, reason), caught.value
    problems = verify(root, progress=False).problems
    assert len(problems) == 2 and all(names(p, A, "swap", lo, hi, reason) for p in problems), problems


# ----------------------------------------------------------------------------------------
# metadata: malformed, missing, or lying about the rows


@pytest.mark.parametrize("kind", MALFORMED)
def test_malformed_metadata_is_one_line_naming_its_file(split, kind, capsys):
    path, says = malform(split.root.path, kind, SHARD, A)
    with pytest.raises(StoreError) as caught:
        read_all(ActivationStore(split.root), 0)
    message = str(caught.value)
    assert f"{path}: {says}" in message or f"{path} does not load" in message, message
    assert "\n" not in message
    code, lines, err = run_main(capsys, "verify", split.root)
    if kind.startswith("array"):  # one array of one shard: a damaged range among verify's problems
        assert code == 1 and message.startswith(f"{lines[0]}; the store is damaged"), lines
    else:
        assert code == 2 and err == f"store verify: error: {message}"


def test_train_refuses_malformed_metadata_in_one_line(tiny_harvest, tmp_path):
    for kind in MALFORMED:
        runs = copy_run(tiny_harvest, tmp_path / kind)
        path, says = malform(runs / "demo" / "activations", kind, "r00000-of-00001", "L2.ffn_out")
        with pytest.raises(StoreError) as caught:
            train_stage(runs)
        assert path in str(caught.value) and says in str(caught.value) and "\n" not in str(caught.value), kind


def train_stage(runs, *overrides):
    from sae.training import train as train_sae

    return train_sae(compose_config("train", [f"run.runs_dir={runs}", "train.batch_size=256", "eval.ce=false",
                                              "eval.tokens=256", "train.tokens=512", *overrides]))


def test_a_missing_manifest_with_rows_on_disk_is_named(split, tiny_harvest, tmp_path):
    (split.root.path / "manifests" / f"{SHARD}.json").unlink()
    written = split.shard_records[1].rows
    result = verify(split.root, progress=False)
    assert not result.ok and result.problems[0].startswith(
        f"manifests/{SHARD}.json is missing, but shard {SHARD} holds {written} rows written"), result.problems

    runs = copy_run(tiny_harvest, tmp_path / "runs")
    store = runs / "demo" / "activations"
    rows = ActivationStore(store).n_tokens
    (store / "manifests" / "r00000-of-00001.json").unlink()
    with pytest.raises(StoreError, match=f"0 committed tokens; shard r00000-of-00001 has {rows} rows written but no "
                                         "manifest"):
        train_stage(runs)


def test_verify_recomputes_the_statistics(split):
    scale_norms(split.root.path, SHARD, A, 100)
    problems = verify(split.root, progress=False).problems
    assert len(problems) == 1 and problems[0].startswith(
        f"manifests/{SHARD}.json: statistics of {A} disagree with its rows in norm_sum"), problems


def test_train_refuses_statistics_that_disagree_with_its_rows(tiny_harvest, tmp_path):
    runs = copy_run(tiny_harvest, tmp_path / "runs")
    scale_norms(runs / "demo" / "activations", "r00000-of-00001", "L2.ffn_out", 100)
    with pytest.raises(StoreError, match="L2.ffn_out: the statistics of the store in .* give a mean row norm of .*, its "
                                         "first batch of 256 rows .*: its manifests are damaged; run `python -m "
                                         "pipeline.store verify"):
        train_stage(runs)


# ----------------------------------------------------------------------------------------
# torn manifests


def tear(root, shard: str) -> None:
    """Cut a manifest mid-write, as a copy or a filesystem without atomic rename can."""
    path = root / "manifests" / f"{shard}.json"
    path.write_bytes(path.read_bytes()[:40])


def test_a_torn_manifest_reads_as_the_commit_before_it(tmp_path, windows):
    root = tmp_path / "run" / "activations"
    clean = all_rows(write_store(tmp_path / "clean", windows, 2))
    write_store(root, windows, 2)
    previous = json.loads((root / "manifests" / f"{SHARD}.json.prev").read_text())
    tear(root, SHARD)

    store = ActivationStore(root)
    rows = store.shard_records[0].rows + previous["rows"]
    assert store.shards[1] == (SHARD, previous["rows"], previous["consumed"], False) and store.n_tokens == rows
    assert 0 < previous["rows"] and rows < len(clean["tokens"])
    assert_same_rows(all_rows(store), {name: column[:rows] for name, column in clean.items()})  # as written
    assert sum(len(b[A]) for b in store.iter_batches(A, 8, drop_last=False)) == rows
    assert len(store.context(rows - 1)[0]) > 0
    mine(store, 0)
    assert len(list(itertools.islice(training_batches(store, [A], train_cfg(), 0), 3))) == 3
    with pytest.raises(StoreError, match=f"still being written \\({SHARD}\\)"):
        merge_it(store, 0)  # the commit before the last one is not done

    problem = next(p for p in verify(root, progress=False).problems if "not valid JSON" in p)
    assert problem.startswith(f"{root}/manifests/{SHARD}.json is not valid JSON")
    assert f"read as the commit before it ({previous['rows']} rows" in problem

    resume(root, windows, 1, 2)  # the shard's writer commits again from there
    assert verify(root, progress=False).ok
    assert_same_rows(all_rows(merge(root, tmp_path / "merged", progress=False, fsync=False)), clean)


def resume(root, windows, rank: int, world_size: int) -> None:
    """Rerun one harvest writer: it skips the input rows its last commit consumed."""
    writer = ShardWriter(root, rank, world_size, SITES, IDENTITY, chunk_rows=8, background=False, fsync=False)
    rows = concat([w for i, w in enumerate(windows) if i % world_size == rank])
    writer.append({name: column[writer.consumed :] for name, column in rows.items()})
    writer.finish()
    writer.close()


def test_a_torn_first_commit_is_named(tmp_path, windows):
    root = tmp_path / "run" / "activations"
    writer = write_shard(root, windows[:2], 0, 1, finish=False)  # one commit, nothing kept before it
    writer.close()
    assert not (root / "manifests" / "r00000-of-00001.json.prev").exists()
    tear(root, "r00000-of-00001")
    with pytest.raises(StoreError, match="is not valid JSON .* no good commit is kept before it: restore it"):
        ActivationStore(root)


# ----------------------------------------------------------------------------------------
# the stages: one line on stderr, exit 2


@pytest.mark.slow
@pytest.mark.parametrize("stage,kind", [("pipeline.train", "flip"), ("pipeline.label", "delete")])
def test_train_and_label_stop_with_one_line_naming_the_damage(smol_runs, tmp_path, stage, kind):
    runs = copy_run(smol_runs, tmp_path / "runs")
    store = runs / "demo" / "activations"
    shard = "r00000-of-00001"
    lo, hi, reason = damage(store, kind, shard, SMOL_SITE, index=3, chunk_rows=512)
    if stage == "pipeline.train":
        shutil.rmtree(runs / "demo" / "saes")  # else train resumes from its finished checkpoint: nothing to read
    extra = SMOL_SAE if stage == "pipeline.train" else ["label.context_tokens=16"]
    result = run_stage(stage, f"run.runs_dir={runs}", *extra, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]  # after the progress bars
    name = stage.removeprefix("pipeline.")
    assert line.startswith(f"{name}: error: {SMOL_SITE} rows [{lo}, {hi}) in shard {shard}: {reason}"), line
    assert f"`python -m pipeline.store verify {store}`" in line
