"""`make train`: one SAE per site (plus any sweep) from the run's activation store.

    python -m pipeline.train sae=topk sae.k=64 train.tokens=2000000
    torchrun --nproc-per-node 2 -m pipeline.train train.parallel=data

Every SAE reads the same shuffled batches, each batch read once from disk. Checkpoints
are written every `train.checkpoint_every` steps; a killed run started again with the
same config continues from the last one with the same data order. At the end each SAE
is saved where `sae_lens.SAE.load_from_disk` reads it, evaluated on held-out text, and
its metrics written to `metrics.json` beside it.
"""

from __future__ import annotations

import hydra
import torch.distributed as dist
from omegaconf import DictConfig

from pipeline.cli import one_line_errors
from pipeline.config import register_configs
from sae.training import train

register_configs()


@hydra.main(config_path="../conf", config_name="train", version_base=None)
def main(cfg: DictConfig) -> None:
    with one_line_errors("train"):
        results = train(cfg)
    for name, r in results.items():
        summary = ", ".join(f"{k} {r[k]:.4g}" for k in ("fvu", "l0", "dead_frac", "ce_loss_recovered", "tokens_per_s")
                            if r.get(k) is not None)
        print(f"train: {name}: {summary}")
        if r.get("ce_loss_recovered_note"):
            print(f"train: {name}: note: {r['ce_loss_recovered_note']}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
