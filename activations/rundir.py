"""The run directory: the only way stages talk to each other, and the only code that spells its paths.

    runs/<run_name>/
      config/<stage>.yaml     the resolved config of each stage
      activations/            the activation store (make harvest), unless store.url puts it elsewhere
      saes/<site>/            an SAE that sae_lens.SAE.load_from_disk reads, plus metrics.json (make train);
                              sweep members in saes/<site>/sweep/<tag>/, checkpoint.pt for resuming
      features/<site>/        features.parquet, examples.parquet, meta.json, experts.parquet, mining.pt
                              (make label; LabelFiles), steering.jsonl (make steer-features);
                              a split label job's slice in features/<site>/parts/<start>-<stop>/
      report/                 the static feature browser (make report)
      vectors/                steering vectors, and vectors/exports/ (steer, export)
      steer_eval/             the steering evaluation's results (make steer-eval)
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from activations.atomic import write_text
from activations.config import ModelConfig
from activations.errors import ConfigError, DialboxError
from activations.store import ActivationStore, StoreError

HARVEST_CONFIGS = ("harvest.yaml", "harvest.r0.yaml")  # one writer's, or rank 0's of a split harvest


class RunError(DialboxError, ValueError):
    """The run directory lacks what was asked for (an SAE, a model config), or holds another model's."""


def sae_metrics(sae_dir: Path) -> Path:
    """metrics.json of a trained SAE's directory (saes/<site>/, or a sweep member's under it)."""
    return Path(sae_dir) / "metrics.json"


class LabelFiles:
    """The label stage's files for one site (runs/<run>/features/<site>/), or for one slice of its features
    (parts/<start>-<stop>/ under it: a split label job's, merged by the job that completes the cover)."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)

    features = property(lambda self: self.dir / "features.parquet")  # one row per feature
    examples = property(lambda self: self.dir / "examples.parquet")  # one row per example context
    meta = property(lambda self: self.dir / "meta.json")
    experts = property(lambda self: self.dir / "experts.parquet")  # MoE sites: the experts' table
    mining = property(lambda self: self.dir / "mining.pt")  # the mining pass's checkpoint
    steering = property(lambda self: self.dir / "steering.jsonl")  # make steer-features' results, a line each

    def part(self, lo: int, hi: int) -> "LabelFiles":
        return LabelFiles(self.dir / "parts" / f"{lo:07d}-{hi:07d}")

    def parts(self) -> list["LabelFiles"]:
        return [LabelFiles(d) for d in sorted((self.dir / "parts").glob("*-*"))]

    def complete(self) -> bool:
        """Whether the tables a finished label job leaves are all here."""
        return all(p.exists() for p in (self.meta, self.features, self.examples))


class RunDir:
    def __init__(self, runs_dir: str, run_name: str):
        if not run_name or "/" in run_name or run_name.startswith("."):
            raise ConfigError(f"bad run.run_name {run_name!r}: use a plain directory name such as demo")
        self.root = Path(runs_dir) / run_name

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "RunDir":
        return cls(cfg.run.runs_dir, cfg.run.run_name)

    @classmethod
    def at(cls, path) -> "RunDir":
        """The run directory at a path (runs/<name>)."""
        path = Path(path)
        return cls(str(path.parent), path.name)

    # -- paths ------------------------------------------------------------------------------

    @property
    def activations(self) -> Path:
        return self.root / "activations"

    def saes(self, site: str = "") -> Path:
        return self.root / "saes" / str(site) if site else self.root / "saes"

    def sweep_sae(self, site: str, tag: str) -> Path:
        return self.saes(site) / "sweep" / tag

    def train_checkpoint(self, rank: int | None = None) -> Path:
        """The training checkpoint: one per run, or one per rank when ranks train different sites."""
        return self.saes() / ("checkpoint.pt" if rank is None else f"checkpoint-r{rank}.pt")

    def features(self, site: str = "") -> Path:
        return self.root / "features" / str(site) if site else self.root / "features"

    def label_files(self, site: str) -> "LabelFiles":
        return LabelFiles(self.features(site))

    def feature_table_path(self, site: str) -> Path:
        return self.label_files(site).features

    @property
    def llm_cache(self) -> Path:
        return self.features() / "llm-cache.jsonl"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def vectors(self) -> Path:
        return self.root / "vectors"

    @property
    def exports(self) -> Path:
        return self.vectors / "exports"

    @property
    def steer_eval(self) -> Path:
        return self.root / "steer_eval"

    @property
    def steer_eval_results(self) -> Path:
        return self.steer_eval / "results.json"

    @property
    def steer_eval_report(self) -> Path:
        return self.steer_eval / "report.md"

    @property
    def judge_cache(self) -> Path:
        """The LLM judge's replies (make steer-eval and steer-features with judge=openai)."""
        return self.steer_eval / "judge_cache.jsonl"

    def config_path(self, stage: str) -> Path:
        return self.root / "config" / f"{stage}.yaml"

    def trained_sites(self) -> list[str]:
        """Sites with a trained SAE, in name order."""
        return sorted(p.parent.name for p in self.saes().glob("*/cfg.json"))

    # -- loaders ----------------------------------------------------------------------------

    def harvest_config(self) -> DictConfig:
        """The resolved config the run's store was harvested with (rank 0's, for a split harvest)."""
        for name in HARVEST_CONFIGS:
            if (self.root / "config" / name).exists():
                return OmegaConf.load(self.root / "config" / name)
        raise StoreError(f"no harvest config in {self.root / 'config'}: the store was not made by `make harvest`")

    def has_harvest_config(self) -> bool:
        return any((self.root / "config" / n).exists() for n in HARVEST_CONFIGS)

    def model_config(self, given=None) -> DictConfig:
        """The model the run studies, every field filled in: the harvested one, or `given` (which
        must then be the same model)."""
        harvested = self.harvest_config().model if self.has_harvest_config() else None
        if given is None:
            if harvested is None:
                raise RunError(f"{self.root} has no harvest config to say which model it studies: "
                                 "pass model=<name>, e.g. model=smollm2_135m")
            given = harvested
        elif harvested is not None and harvested.name != given.name:
            raise RunError(f"run {self.root} was harvested with model {harvested.name}, not {given.name}: "
                              f"pass model={harvested.name} or another run.run_name")
        return OmegaConf.merge(OmegaConf.structured(ModelConfig), given)

    def store_location(self, store_cfg: DictConfig | None = None) -> tuple:
        """(where, fsspec options or None) of the run's activation store: `store.url` of the given
        store config, else of the run's harvest config, else <run>/activations."""
        if store_cfg is None:
            store_cfg = self.harvest_config().store if self.has_harvest_config() else {}
        url = store_cfg.get("url") or ""
        return (url or self.activations), (dict(store_cfg.get("storage_options") or {}) or None)

    def open_store(self) -> ActivationStore:
        return ActivationStore(*self.store_location())

    def load_sae(self, site, device: str = "cpu"):
        """The trained SAE at a site (sae-lens's SAE), or a RunError saying how to train one."""
        from sae_lens import SAE  # slow to import; most stages that make a RunDir never need it

        path = self.saes(str(site))
        if not (path / "cfg.json").exists():
            raise RunError(f"no SAE at {path}: train one (make train ARGS='train.sites=[{site}]') or steer with a vector")
        return SAE.load_from_disk(str(path), device=str(device))

    def feature_table(self, site: str, columns: list[str] | None = None) -> dict | None:
        """Columns of the label stage's feature table as lists (None when the site is not labelled;
        a column the table lacks is left out)."""
        path = self.feature_table_path(site)
        if not path.exists():
            return None
        import pyarrow.parquet as pq

        names = pq.read_schema(path).names
        wanted = [c for c in columns if c in names] if columns else None
        return pq.read_table(path, columns=wanted).to_pydict()

    # -- writing ------------------------------------------------------------------------------

    def save_config(self, cfg: DictConfig, stage: str) -> Path:
        """Write the resolved config next to what it produced (atomically: a reader never sees half)."""
        path = self.config_path(stage)
        write_text(path, OmegaConf.to_yaml(cfg, resolve=True))
        return path
