"""`make report`: the run's static feature browser, from the label stage's feature tables.

    python -m pipeline.report                                 # every site in runs/<run>/features
    python -m pipeline.report report.sites=[L15.resid_post]

Writes runs/<run>/report/ (index.html and its data, see features/report.py). `make browse`
serves it on 127.0.0.1; any static file server (python -m http.server) serves it as well.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from activations.rundir import RunDir
from features.report import build_report
from pipeline.cli import one_line_errors
from pipeline.config import register_configs

register_configs()


def report(cfg: DictConfig) -> None:
    run = RunDir.from_config(cfg)
    out = run.report
    sites = build_report(run.features(), out, list(cfg.report.sites), cfg.report.chunk_size,
                         cfg.report.index_top_tokens)
    run.save_config(cfg, "report")
    for s in sites:
        print(f"report: {s['site']}: {s['n_features']} features, {s['n_labelled']} labelled, "
              f"{s['n_unlabelled']} unlabelled, {s['n_dead']} dead")
    print(f"report: wrote {out}/index.html; serve it with `make browse RUN={cfg.run.run_name}`")


@hydra.main(config_path="../conf", config_name="report", version_base=None)
def main(cfg: DictConfig) -> None:
    with one_line_errors("report"):
        report(cfg)


if __name__ == "__main__":
    main()
