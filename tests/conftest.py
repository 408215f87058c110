import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "disabled")


def compose_config(stage: str, overrides: list[str]):
    """The config a stage would see for these command-line overrides."""
    import pipeline.config

    pipeline.config.register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return compose(stage, overrides)


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
