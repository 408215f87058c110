"""The run directory: the only way stages talk to each other (design.md section 1)."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


class RunDir:
    def __init__(self, runs_dir: str, run_name: str):
        if not run_name or "/" in run_name or run_name.startswith("."):
            raise ValueError(f"bad run.run_name {run_name!r}: use a plain directory name such as demo")
        self.root = Path(runs_dir) / run_name

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "RunDir":
        return cls(cfg.run.runs_dir, cfg.run.run_name)

    @property
    def activations(self) -> Path:
        return self.root / "activations"

    def saes(self, site: str = "") -> Path:
        return self.root / "saes" / site if site else self.root / "saes"

    def save_config(self, cfg: DictConfig, stage: str) -> Path:
        """Write the resolved config next to what it produced (atomically: a reader never sees half)."""
        path = self.root / "config" / f"{stage}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True))
        os.replace(tmp, path)
        return path


@contextlib.contextmanager
def one_line_errors(stage: str, *kinds: type[BaseException]):
    """Turn the expected kinds of bad input into one line on stderr and exit code 2."""
    try:
        yield
    except kinds as e:
        print(f"{stage}: error: {e}", file=sys.stderr)
        sys.exit(2)
