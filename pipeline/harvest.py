"""`make harvest`: stream activations at chosen sites into the run's zarr store.

    python -m pipeline.harvest harvest.sites=[L9.resid_post,L15.ffn_out] model=tiny_deepseek_v4

The forward runs under inference_mode and stops after the deepest requested site; a
background thread writes and commits whole chunks while the next batch runs. A killed
harvest started again with the same config resumes after its last commit.
"""

from __future__ import annotations

import time

import hydra
from omegaconf import DictConfig

from activations.harvesting import harvest
from activations.store import ActivationStore
from pipeline.cli import one_line_errors
from pipeline.config import register_configs

register_configs()


def report(store: ActivationStore, elapsed: float) -> None:
    print(f"harvest: {store.n_tokens} tokens committed in {store.root} ({elapsed:.1f} s this run, model load included)")
    for site in store.sites:
        s = store.stats(site)
        print(f"  {site}: mean norm {s['mean_norm']:.3g}, max norm {s['max_norm']:.3g}, "
              f"outlier ratio {s['outlier_ratio']:.3f}, non-finite rows dropped {s['nonfinite_rows']}")


@hydra.main(config_path="../conf", config_name="harvest", version_base=None)
def main(cfg: DictConfig) -> None:
    with one_line_errors("harvest"):
        started = time.perf_counter()
        store = harvest(cfg)
        report(store, time.perf_counter() - started)


if __name__ == "__main__":
    main()
