import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "disabled")


from pipeline.config import compose as compose_config  # noqa: E402  (re-exported for the tests)


def run_stage(module: str, *overrides: str, check: bool = True, timeout: float = 600, **kwargs):
    """Run a stage as users do, in a real subprocess, from the repository root."""
    result = subprocess.run(
        [sys.executable, "-m", module, *overrides], cwd=ROOT, capture_output=True, text=True,
        timeout=timeout, **kwargs,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{module} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture
def runs_dir(tmp_path) -> Path:
    return tmp_path / "runs"


SMOL_RUN = ["data.context_length=64", "harvest.batch_size=8", "harvest.sites=[L3.resid_post]", "store.chunk_rows=512"]
SMOL_SAE = ["sae.expansion_factor=2", "sae.k=8", "train.batch_size=256", "eval.ce=false", "eval.tokens=256"]


def make_trained_run(runs: Path, tokens: int = 8192, data: tuple = ()) -> Path:
    """A SmolLM2 run (L3.resid_post, `tokens` harvested) with a small trained TopK SAE; returns runs."""
    from pipeline.harvest import harvest
    from pipeline.train import train

    harvest(compose_config("harvest", [f"run.runs_dir={runs}", *SMOL_RUN, f"harvest.max_tokens={tokens}", *data]))
    train(compose_config("train", [f"run.runs_dir={runs}", *SMOL_SAE]))
    return runs


@pytest.fixture(scope="session")
def smol_run(tmp_path_factory) -> Path:
    """A shared trained run; tests that write into it must copy it first (see copy_run)."""
    return make_trained_run(tmp_path_factory.mktemp("smol_runs"))


def copy_run(runs: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(runs, dest, ignore=shutil.ignore_patterns("wandb"))
    return dest
