"""`make label` / `python -m pipeline.label`: every feature of every trained SAE mined, labelled
and scored into runs/<run>/features/<site>/ (features.parquet, examples.parquet, meta.json).

The explainer is a config group: `explainer=heuristic` (default, no LLM), `explainer=local`
(a transformers model here; the run's own model unless explainer.local_path says otherwise) or
`explainer=openai explainer.base_url=... explainer.model=...` (any OpenAI-compatible endpoint).
"""

from __future__ import annotations

import hydra
import pandas as pd
import torch
from omegaconf import DictConfig

from activations.rundir import RunDir
from features.label import label
from pipeline.cli import one_line_errors
from pipeline.config import register_configs

register_configs()


def show_best(run: RunDir, site: str, n: int = 5) -> None:
    """Print a few labelled features: LLM labels first, best scores first."""
    columns = run.feature_table(site)
    if columns is None:  # a slice of a split job: the site's table is merged by the last slice
        return
    table = pd.DataFrame(columns)
    table = table[table.label.notna()].assign(llm=lambda t: t.label_source.str.startswith("llm"))
    for row in table.sort_values(["llm", "score"], ascending=False).head(n).itertuples():
        score = "unscored" if row.score != row.score else f"score {row.score:.2f}"
        print(f"  {row.feature_id:<24} {row.label}  ({row.label_source}, {score}, density {row.density:.2%})")


@hydra.main(config_path="../conf", config_name="label", version_base=None)
def main(cfg: DictConfig) -> None:
    torch.set_grad_enabled(False)
    with one_line_errors("label"):
        run = RunDir.from_config(cfg)
        for site in label(cfg):
            show_best(run, site)


if __name__ == "__main__":
    main()
