"""Launchers (conf/launcher/): the Slurm settings each stage composes, and the same jobs run for real
by Submitit's local executor: a sharded harvest and a train job of two tasks joined by gloo."""

import os
import socket

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser

from conftest import ROOT, compose_config, run_stage
from pipeline.config import register_configs
from activations.harvesting import harvest
from activations.store import ActivationStore
from activations.store import merge

TINY = ["model=tiny_deepseek_v4", "data.context_length=64", "harvest.batch_size=8", "harvest.max_tokens=2048",
        "harvest.sites=[L1.resid_post,L2.ffn_out]", "store.chunk_rows=256"]


def hydra_config(stage: str, *overrides: str):
    """The stage's config with its `hydra` node, resolved as the launcher sees it."""
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None, job_name=stage):
        return compose(stage, list(overrides), return_hydra_config=True)


def jobs(*overrides: str) -> list[list[str]]:
    """The jobs Hydra's sweeper makes of command-line overrides."""
    return BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(list(overrides)), None)[0]


def test_local_is_the_default_and_runs_in_process():
    cfg = hydra_config("harvest")
    assert cfg.hydra.launcher._target_.endswith("BasicLauncher") and cfg.hydra.mode is None


def test_slurm_harvest_is_an_array_of_shards():
    cfg = hydra_config("harvest", "launcher=slurm", "harvest.world_size=16", "hydra.launcher.partition=gpu",
                       "hydra.launcher.account=proj", "run.runs_dir=/scratch/runs")
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and cfg.hydra.mode.name == "MULTIRUN"
    assert (launcher.partition, launcher.account) == ("gpu", "proj")
    assert (launcher.gpus_per_node, launcher.tasks_per_node) == (8, 1)
    assert cfg.hydra.sweeper.params == {"harvest.rank": "range(0,16)"}
    assert cfg.hydra.sweep.dir == "/scratch/runs/demo/jobs/harvest"


def test_slurm_train_is_one_task_per_gpu_and_label_one_gpu_per_slice():
    launcher = hydra_config("train", "launcher=slurm", "hydra.launcher.nodes=2",
                            "hydra.launcher.gpus_per_node=4").hydra.launcher
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (2, 4, 4)
    launcher = hydra_config("label", "launcher=slurm").hydra.launcher
    assert (launcher.gpus_per_node, launcher.tasks_per_node) == (1, 1)
    split = jobs("label.sites=[L20.ffn_out],[L30.ffn_out]", "label.features=[0,32768],[32768,65536]")
    assert split[1] == ["label.sites=[L20.ffn_out]", "label.features=[32768,65536]"] and len(split) == 4


@pytest.mark.slow
def test_train_cfg_hydra_shows_the_submitit_settings():
    out = run_stage("pipeline.train", "launcher=slurm", "hydra.launcher.partition=h200", "--cfg", "hydra").stdout
    for line in ("_target_: hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
                 "partition: h200", "gpus_per_node: 8", "tasks_per_node: ${.gpus_per_node}", "mode: MULTIRUN"):
        assert line in out


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    """A tiny DeepSeek-V4 harvested as 2 shards by 2 jobs of Submitit's local executor."""
    runs = tmp_path_factory.mktemp("sharded")
    run_stage("pipeline.harvest", "launcher=submitit_local", f"run.runs_dir={runs}", "harvest.world_size=2", *TINY)
    return runs


def all_rows(store: ActivationStore) -> dict:
    return {**store.tokens(0, store.n_tokens), **{s: store.read(s, 0, store.n_tokens) for s in store.sites}}


@pytest.mark.slow
def test_two_shard_harvest_by_submitit_merges_into_the_one_writer_store(sharded_run, tmp_path):
    sharded = ActivationStore(sharded_run / "demo")
    assert [s[0] for s in sharded.shards] == ["r00000-of-00002", "r00001-of-00002"] and sharded.complete
    assert all((sharded_run / "demo" / "jobs" / "harvest" / str(r) / "harvest.log").exists() for r in (0, 1))
    merged = merge(sharded_run / "demo", tmp_path / "merged" / "activations", order="windows", progress=False)
    single = harvest(compose_config("harvest", [f"run.runs_dir={tmp_path}", *TINY]))
    a, b = all_rows(merged), all_rows(single)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_train_as_two_submitit_tasks_joins_one_process_group(sharded_run):
    # MASTER_PORT: a free port, not Submitit's draw by job ID (sae/training.py; its draw once hung this test)
    run_stage("pipeline.train", "launcher=submitit_local", "hydra.launcher.tasks_per_node=2",
              f"run.runs_dir={sharded_run}", "train.parallel=site", "train.tokens=1024", "eval.ce=false",
              "eval.tokens=256", "sae.expansion_factor=2", "sae.k=8", "train.batch_size=256",
              env={**os.environ, "MASTER_PORT": str(free_port())})
    saes = sharded_run / "demo" / "saes"
    assert (saes / "checkpoint-r0.pt").exists() and (saes / "checkpoint-r1.pt").exists()  # ranks 0 and 1 of 2
    assert (saes / "L1.resid_post" / "metrics.json").exists() and (saes / "L2.ffn_out" / "metrics.json").exists()
