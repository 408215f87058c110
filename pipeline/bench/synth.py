"""make bench-synth: how faithful are the features? SAEs scored against the ground truth of SynthSAEBench-16k.

    python -m pipeline.bench.synth [--samples 1000000] [--eval-samples 50000] [--device auto]
    python -m pipeline.bench.synth --samples 200000000 --eval-samples 1000000   # the published budget (a GPU)
    python -m pipeline.bench.synth --quick   # the same recipe at 512 features in 64 dimensions: seconds

SynthSAEBench (Chanin and Garriga-Alonso, 2026) draws activations from 16,384 known feature directions
in 768 dimensions, so an SAE's latents can be checked against the features that made the data.
`sae_lens.synthetic` builds the model from its authors' config (seeded) and caches it in the Dialbox cache
(`$DIALBOX_CACHE`, else ~/.cache/dialbox): about half an hour of orthogonalisation on 2 CPU cores, once.
Then one stream of samples from the model's own sampler; each batch goes to every trainer in turn, so all
see the same rows: Dialbox's TopK, BatchTopK, Matryoshka (BatchTopK) and Matryoshka TopK through `make train`'s
trainer (`sae.trainer.Trainer.step`, the fast TopK step for TopK and Matryoshka TopK), and sae-lens's BatchTopK
and Matryoshka BatchTopK through sae-lens's `SAETrainer` at the settings of the published runs. Each SAE is scored by sae-lens's
`eval_sae_on_synthetic_data` on the same held-out samples, drawn once. The training samples are not written to
disk: handing each batch to every trainer pays the slow sampler (about 1k rows/s on 2 cores) once per run, as a
stored copy would, and the published budget (200M rows, 614 GB in float32) would not fit on one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from omegaconf import OmegaConf
from sae_lens import LoggingConfig
from sae_lens.registry import get_sae_training_class
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAEConfig
from sae_lens.saes.matryoshka_batchtopk_sae import MatryoshkaBatchTopKTrainingSAEConfig
from sae_lens.synthetic import (
    FoldedNormalMagnitudeConfig, HierarchyConfig, LinearMagnitudeConfig, LowRankCorrelationConfig,
    OrthogonalizationConfig, SyntheticDataEvalResult, SyntheticModel, SyntheticModelConfig,
    SyntheticSAERunnerConfig, ZipfianFiringProbabilityConfig, eval_sae_on_synthetic_data,
)
from sae_lens.training.activation_scaler import ActivationScaler
from sae_lens.training.sae_trainer import SAETrainer
from tqdm import tqdm

from activations.errors import ConfigError
from activations.markdown import table
from activations.models import cache_root, resolve_device
from pipeline.bench import make_command, write_section
from pipeline.bench.train import sync
from pipeline.cli import one_line_errors
from pipeline.config import SAEConfig, TrainConfig
from sae.architectures import learning_rate
from sae.trainer import Trainer, dead_window
from sae.training import start_member

SITE = "synthetic"  # the name Dialbox's trainer gives the one stream of activations
SAE_LENS_LR = 3e-4  # the published runs' learning rate (constant), with sae-lens's defaults for the rest
QUICK = dict(samples=16_384, eval_samples=4096, width=128, k=4, batch=256)
# SAELens's SynthSAEBench page: width 4096, L0 25, 200M samples, mean of 5 seeds: (F1, MCC, uniqueness, explained variance)
PUBLISHED = {"BatchTopK": (0.732, 0.757, 0.984, 0.792), "Matryoshka BatchTopK (128/512/2048)": (0.879, 0.793, 0.999, 0.779),
             "JumpReLU": (0.732, 0.753, 0.989, 0.795), "Matching pursuit": (0.446, 0.693, 0.828, 0.835),
             "Standard L1": (0.556, 0.604, 0.898, 0.765)}


def model_config(quick: bool = False) -> SyntheticModelConfig:
    """SynthSAEBench-16k as its authors built it (decoderesearch/synth-sae-bench-experiments,
    experiments/create_synth_bench_16k_model.py; sae-lens documents the recipe but ships no function for it).
    quick: the same recipe at 512 features in 64 dimensions, 4 trees instead of 128, without the
    orthogonalisation (100 steps that cost the 16k model half an hour on a CPU, and a small model seconds)."""
    return SyntheticModelConfig(
        num_features=512 if quick else 16_384,
        hidden_dim=64 if quick else 768,
        firing_probability=ZipfianFiringProbabilityConfig(max_prob=0.4, min_prob=5e-4, exponent=0.5),
        hierarchy=HierarchyConfig(total_root_nodes=4 if quick else 128, branching_factor=4, max_depth=3,
                                  mutually_exclusive_portion=1.0, mutually_exclusive_min_depth=0,
                                  compensate_probabilities=True, scale_children_by_parent=True),
        mean_firing_magnitudes=LinearMagnitudeConfig(start=5.0, end=4.0),
        std_firing_magnitudes=FoldedNormalMagnitudeConfig(mean=0.5, std=0.5),
        correlation=LowRankCorrelationConfig(rank=25, correlation_scale=0.1),
        orthogonalization=None if quick else OrthogonalizationConfig(num_steps=100, lr=3e-4),
        bias=0.5,
        seed=42,
    )


def cached_model(cfg: SyntheticModelConfig, root: Path, device: torch.device) -> SyntheticModel:
    """The model of `cfg`, built once and saved under `root` in a directory named after the config; every
    run, the first too, loads the saved files, so every run samples from the same model."""
    key = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
    path = root / f"synth-sae-bench-{cfg.num_features}x{cfg.hidden_dim}-{key}"
    if not path.is_dir():
        print(f"bench-synth: building the {cfg.num_features:,}-feature model on {device} into {path} (once)")
        root.mkdir(parents=True, exist_ok=True)
        # Built beside the target and renamed: a killed build leaves a stray temp dir, never a half model.
        tmp = Path(tempfile.mkdtemp(prefix=".synth-sae-bench-", dir=root))
        try:
            SyntheticModel(cfg, device=str(device)).save(tmp)
            os.rename(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return SyntheticModel.load_from_disk(path, device=str(device))


class Replay:
    """Stands in for the model's activation generator in `eval_sae_on_synthetic_data`, which takes its
    samples batch by batch from `sample`: it hands out feature activations drawn once, so every SAE and
    every point of a curve is scored on the same samples (and the 16k model's slow sampler runs once)."""

    def __init__(self, batches: list[torch.Tensor]):
        self.batches, self.drawn = batches, 0

    def sample(self, rows: int) -> torch.Tensor:
        batch = self.batches[self.drawn].to_dense()
        assert len(batch) == rows, "evaluate in the batch size the samples were drawn in"
        self.drawn += 1
        return batch


def draw_eval_set(model: SyntheticModel, batches: int, batch: int, seed: int) -> list[torch.Tensor]:
    """Held-out feature activations, sparse (a 16k-wide batch is 64 MiB dense, 34 features a row)."""
    torch.manual_seed(seed)
    return [model.activation_generator.sample(batch).to_sparse() for _ in range(batches)]


@dataclass
class Contender:
    """One SAE and the trainer that steps it; `scaler` maps the data to the scale it trains at."""
    name: str
    sae: torch.nn.Module
    scaler: ActivationScaler
    step: Callable[[torch.Tensor], None]
    seconds: float = 0.0  # in `step`
    snapshots: dict[int, dict] = field(default_factory=dict)  # samples seen -> weights then


def matryoshka_widths(width: int) -> list[int]:
    """The published Matryoshka runs' levels, 128/512/2048/4096 at width 4096, at any width."""
    return [width // 32, width // 8, width // 2, width]


def dialbox(architecture: str, args, steps: int, stats_batch: torch.Tensor, device) -> Contender:
    """Trained as `make train sae=<architecture> sae.k=... sae.d_sae=... train.batch_size=...` trains it,
    its other settings the defaults; the data statistics a store would give come from `stats_batch`."""
    widths = matryoshka_widths(args.width) if architecture.startswith("matryoshka") else []
    sae_cfg = OmegaConf.structured(SAEConfig(architecture=architecture, k=args.k, d_sae=args.width,
                                             matryoshka_widths=widths))
    train_cfg = OmegaConf.structured(TrainConfig(batch_size=args.batch, device=str(device), dead_tokens=args.dead_tokens))
    member = start_member("base", SITE, sae_cfg, train_cfg, stats_batch.mean(0), stats_batch.norm(dim=-1).mean().item(),
                          {"hook_name": SITE}, device)
    trainer = Trainer([member], steps, train_cfg)
    return Contender(f"Dialbox {architecture}", member.sae, ActivationScaler(member.scale),
                     lambda batch: trainer.step({SITE: batch}))


def sae_lens(sae_cfg, args, steps: int, device) -> Contender:
    """Trained by sae-lens's SAETrainer with the config SyntheticSAERunner gives it for the published runs
    (lr 3e-4 constant; autocast on a GPU, as they ran), one batch at a time through the seams `fit` calls."""
    # Only its trainer config is used (`synthetic_model` is not: the samples come from the shared stream).
    runner = SyntheticSAERunnerConfig(synthetic_model="", sae=sae_cfg, training_samples=steps * args.batch,
                                      batch_size=args.batch, lr=SAE_LENS_LR, device=str(device),
                                      autocast_sae=device.type == "cuda", logger=LoggingConfig(log_to_wandb=False))
    torch.manual_seed(args.seed)
    sae_class, _ = get_sae_training_class(sae_cfg.architecture())
    trainer = SAETrainer(runner.to_sae_trainer_config(), sae_class(sae_cfg), data_provider=iter(()))

    def step(batch):  # the body of SAETrainer.fit with wandb and checkpoints off
        trainer.maybe_reset_sparsity()
        trainer.step(batch)
        trainer.n_training_steps += 1
    return Contender(f"sae-lens {sae_cfg.architecture()}", trainer.sae, trainer.activation_scaler, step)


def contenders(args, d_in: int, steps: int, stats_batch: torch.Tensor, device) -> list[Contender]:
    common = dict(d_in=d_in, d_sae=args.width, k=args.k, device=str(device))
    return [*(dialbox(arch, args, steps, stats_batch, device) for arch in ("topk", "batchtopk", "matryoshka", "matryoshka_topk")),
            sae_lens(BatchTopKTrainingSAEConfig(**common), args, steps, device),
            sae_lens(MatryoshkaBatchTopKTrainingSAEConfig(
                **common, matryoshka_widths=matryoshka_widths(args.width), use_matryoshka_aux_loss=True),
                     args, steps, device)]  # as the published Matryoshka runs


def train(model: SyntheticModel, racers: list[Contender], steps: int, args, device) -> None:
    """Every batch of one seeded stream to every trainer in turn, each timed; weights kept at the curve's points."""
    points = {steps // 8, steps // 4, steps // 2} - {0}
    torch.manual_seed(args.seed)
    for step in tqdm(range(1, steps + 1), desc="bench-synth: training", unit="batch", dynamic_ncols=True):
        batch = model.sample(args.batch)
        for c in racers:
            sync(device)
            started = time.perf_counter()
            c.step(batch)
            sync(device)
            c.seconds += time.perf_counter() - started
        if step in points:
            for c in racers:
                c.snapshots[step * args.batch] = {k: v.detach().to("cpu", copy=True) for k, v in c.sae.state_dict().items()}


def evaluate(c: Contender, model: SyntheticModel, eval_set: list[torch.Tensor], batch: int) -> SyntheticDataEvalResult:
    """sae-lens's ground-truth metrics of the SAE as it stands, at its training scale, in batches of the
    training batch size (BatchTopK picks its top k over the batch, as in the published evaluations)."""
    result = eval_sae_on_synthetic_data(c.sae, model.feature_dict, Replay(eval_set), num_samples=len(eval_set) * batch,
                                        batch_size=batch, activation_scaler=c.scaler)
    c.sae.train()  # eval_sae_on_synthetic_data leaves it in eval mode
    return result


def curve(c: Contender, model: SyntheticModel, eval_set: list[torch.Tensor], batch: int) -> dict[int, float]:
    """F1 at each kept point (the contender's SAE is left with its final weights loaded again)."""
    final_state = {k: v.detach().clone() for k, v in c.sae.state_dict().items()}
    f1 = {}
    for samples, state in sorted(c.snapshots.items()):
        c.sae.load_state_dict(state)
        f1[samples] = evaluate(c, model, eval_set, batch).classification.f1_score
    c.sae.load_state_dict(final_state)
    return f1


def result_rows(racers: list[Contender], results: list[SyntheticDataEvalResult], samples: int) -> list[list[str]]:
    """One row per SAE; samples/s against sae-lens's trainer of the same family (BatchTopK for TopK)."""
    rate = {c.name: samples / c.seconds for c in racers}
    rows = []
    for c, r in zip(racers, results):
        base = "sae-lens matryoshka_batchtopk" if "matryoshka" in c.name else "sae-lens batchtopk"
        ratio = "" if c.name.startswith("sae-lens") else f"{rate[c.name] / rate[base]:.2f}x {base.split()[1]}"
        rows.append([c.name, f"**{r.classification.f1_score:.3f}**", f"**{r.mcc:.3f}**", f"{r.uniqueness:.3f}",
                     f"{r.explained_variance:.3f}", f"{r.classification.precision:.3f} / {r.classification.recall:.3f}",
                     f"{r.dead_latents:,}", f"{r.sae_l0:.1f}", f"{rate[c.name]:,.0f}", ratio])
    return rows


def curve_rows(curves: dict[str, dict[int, float]]) -> list[list[str]]:
    points = sorted({s for f1 in curves.values() for s in f1})
    return [[name, *(f"{f1[s]:.3f}" for s in points)] for name, f1 in curves.items()]


def notes(args, model: SyntheticModel, samples: int, eval_rows: int, true_l0: float, device) -> str:
    cfg = model.cfg
    published = table(["published SAE (200M samples)", "F1", "MCC", "uniqueness", "explained variance"],
                      [[name, *(f"{v:.3f}" for v in values)] for name, values in PUBLISHED.items()])
    widths = "/".join(str(w) for w in matryoshka_widths(args.width))
    return f"""
The model: SynthSAEBench-16k's recipe{" at a small size (`--quick`)" if args.quick else ""}: {cfg.num_features:,} features in
{cfg.hidden_dim} dimensions; Zipfian firing probabilities (exponent 0.5, from 0.4 to 5e-4); {cfg.hierarchy.total_root_nodes}
hierarchy trees, branching 4, depth 3, mutually exclusive children; low-rank correlation (rank 25, scale 0.1);
{"no orthogonalisation" if cfg.orthogonalization is None else "orthogonalised directions (100 steps, lr 3e-4)"};
mean magnitudes linear from 5 to 4 with a folded-normal spread; bias 0.5; seed 42. True L0 {true_l0:.1f} on the
evaluation samples. `sae_lens.synthetic` built it from that config on this machine and it is cached, not
downloaded: the published `decoderesearch/synth-sae-bench-16k-v1` was built on a GPU, and a build of the same
config elsewhere (a CPU) is not bit-identical to it, so the numbers compare in distribution, not sample for sample.

Training: {samples:,} samples (batch {args.batch}) from the model's sampler, seeded ({args.seed}); each batch was
handed to every trainer, so all saw the same rows in the same order (the evaluation samples are a separate
draw). Width {args.width}, k {args.k}, on {device}.
Dialbox trains as `make train` does with `sae=<architecture> sae.k={args.k} sae.d_sae={args.width}
train.batch_size={args.batch}` and the other defaults (lr {learning_rate(OmegaConf.structured(SAEConfig()), args.width):.3g}, 8e-4 / sqrt(d_sae / 16384), with 50 warm-up steps and
a linear decay over the last 20%; AuxK on latents silent for {dead_window(SAEConfig(k=args.k, d_sae=args.width), samples, args.dead_tokens):,}
samples{" (`--dead-tokens`)" if args.dead_tokens else ""}; unit-norm decoder rows; inputs scaled to mean norm sqrt(d_in) and `b_dec`
started at the mean, both from one batch drawn for the purpose; Matryoshka widths {widths}, for Matryoshka TopK
as nested losses of a per-sample TopK in the fast step, the inner ones weighted {SAEConfig.matryoshka_balance} ** their depth). sae-lens trains
with the `SAETrainer` config that `SyntheticSAERunner` builds for the published runs (lr 3e-4 constant, Adam
0.9/0.999, its defaults otherwise; Matryoshka BatchTopK widths {widths}, `use_matryoshka_aux_loss`;
autocast on a GPU only), driven a batch at a time through the seams `SAETrainer.fit` itself calls.
Samples/s are each trainer's own steps, sampling excluded; the last column divides by sae-lens's BatchTopK (its Matryoshka
for Dialbox's Matryoshka and Matryoshka TopK).

Evaluation: `eval_sae_on_synthetic_data` on the same {eval_rows:,} held-out samples for every SAE (drawn once,
seeded), in batches of {args.batch}, each SAE at its own input scale. F1, precision and recall: each latent as a
detector of its best-matching true feature (by decoder cosine), averaged over latents; MCC: the mean |cosine| of a
one-to-one matching of latents to true features; uniqueness: distinct true features matched / latents; dead:
latents that never fired on the evaluation samples.

Published numbers for reference, from SAELens's SynthSAEBench page: width 4096, L0 25, **200M samples**, lr
3e-4, batch 1024, mean of 5 seeds, on the published model; this run saw {samples / 200e6:.2%} of that budget
(`ARGS='--samples 200000000 --eval-samples 1000000'` on a GPU runs it).

{published}
"""


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # 200k samples took 5.4 minutes of sampling and training and 1.3 of evaluation on 2 idle cores (BENCHMARKS.md):
    # a million is about half an hour
    parser.add_argument("--samples", type=int, default=1_000_000,
                        help="training samples per SAE, rounded down to whole batches (about 30 minutes on 2 CPU cores)")
    parser.add_argument("--eval-samples", type=int, default=50_000, help="held-out samples, rounded down to whole batches")
    parser.add_argument("--width", type=int, default=4096, help="SAE latents")
    parser.add_argument("--k", type=int, default=25, help="active latents per sample (L0)")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0, help="the training stream's (the model keeps its own, 42)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (the GPU when there is one)")
    parser.add_argument("--cache", type=Path, default=None, help="where the model is cached (default: the Dialbox cache)")
    parser.add_argument("--dead-tokens", type=int, default=0,
                        help="Dialbox's dead-latent window (train.dead_tokens; 0: make train's default, sae/trainer.py)")
    parser.add_argument("--quick", action="store_true", help="a small model of the same recipe, small SAEs: a smoke test")
    args = parser.parse_args(argv)
    if args.quick:  # quick sizes become the defaults; flags given still win
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
    for name in ("samples", "eval_samples", "width", "k", "batch"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')}={getattr(args, name)}: must be positive")
    if args.dead_tokens < 0:
        raise ConfigError(f"--dead-tokens={args.dead_tokens}: must be 0 (the default window) or positive")
    if args.samples < args.batch or args.eval_samples < args.batch:
        raise ConfigError(f"--samples and --eval-samples must hold at least one batch of {args.batch}")
    if args.k > args.width or args.width < 32:
        raise ConfigError(f"--k={args.k}, --width={args.width}: need k <= width, and width >= 32 "
                          "(Matryoshka's smallest level is width / 32)")
    return args


def run(args, device: torch.device) -> str:
    """Build or load the model, train every SAE on one stream, score them; the section's body."""
    model = cached_model(model_config(args.quick), args.cache or cache_root(), device)
    steps, eval_batches = args.samples // args.batch, args.eval_samples // args.batch
    eval_set = draw_eval_set(model, eval_batches, args.batch, args.seed + 1)
    torch.manual_seed(args.seed + 2)
    racers = contenders(args, model.cfg.hidden_dim, steps, model.sample(args.batch), device)
    train(model, racers, steps, args, device)
    results = [evaluate(c, model, eval_set, args.batch) for c in tqdm(racers, desc="bench-synth: evaluating")]
    best = {side: max((i for i, c in enumerate(racers) if c.name.startswith(side)),
                      key=lambda i: results[i].classification.f1_score) for side in ("Dialbox", "sae-lens")}
    curves = {racers[i].name: {**curve(racers[i], model, eval_set, args.batch),
                               steps * args.batch: results[i].classification.f1_score} for i in best.values()}
    samples = steps * args.batch
    header = ["SAE", "F1", "MCC", "uniqueness", "explained variance", "precision / recall", "dead", "L0", "samples/s",
              "samples/s vs sae-lens"]
    return (table(header, result_rows(racers, results, samples))
            + "\n\nF1 against samples seen, the best Dialbox and the best sae-lens SAE:\n\n"
            + table(["SAE", *(f"{s:,}" for s in sorted(next(iter(curves.values()))))], curve_rows(curves))
            + "\n" + notes(args, model, samples, eval_batches * args.batch, results[0].true_l0, device))


def main(argv=None) -> None:
    with one_line_errors("bench-synth"):
        args = parse_args(argv)
        device = resolve_device(args.device, "--device")
        body = run(args, device)
    command = make_command("bench-synth", argv if argv is not None else sys.argv[1:])
    # the small model's section beside the 16k model's, on CPU and on a GPU
    write_section("bench-synth" + "-quick" * args.quick + "-cuda" * (device.type == "cuda"), command, body)


if __name__ == "__main__":
    main()
