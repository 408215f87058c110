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
