"""The run directory: the only way stages talk to each other (design.md section 1)."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pipeline.store import ActivationStore, StoreError


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

    def harvest_config(self) -> DictConfig:
        """The resolved config the run's store was harvested with (rank 0's, for a split harvest)."""
        for name in ("harvest.yaml", "harvest.r0.yaml"):
            if (self.root / "config" / name).exists():
                return OmegaConf.load(self.root / "config" / name)
        raise StoreError(f"no harvest config in {self.root / 'config'}: the store was not made by `make harvest`")

    def store_location(self, store_cfg: DictConfig | None = None) -> tuple:
        """(where, fsspec options or None) of the run's activation store: `store.url` of the given
        store config, else of the run's harvest config, else <run>/activations."""
        if store_cfg is None:
            has_config = any((self.root / "config" / n).exists() for n in ("harvest.yaml", "harvest.r0.yaml"))
            store_cfg = self.harvest_config().store if has_config else {}
        url = store_cfg.get("url") or ""
        return (url or self.activations), (dict(store_cfg.get("storage_options") or {}) or None)

    def open_store(self) -> ActivationStore:
        return ActivationStore(*self.store_location())

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
