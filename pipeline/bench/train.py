"""make bench-train: Dialbox's training step against sae-lens's own trainer, measured in one run.

    python -m pipeline.bench.train [--d-in 576 --d-sae 9216 --k 32 --batch 4096] [--device cuda]
    python -m pipeline.bench.train --device cuda --d-in 4096 --d-sae 65536 --k 64   # DeepSeek-V4 width

One TopK SAE configuration (AuxK on), one fixed set of synthetic activations, four ways to train:
1. Dialbox's `Trainer.step` (the loop `make train` runs), batches from memory;
2. sae-lens's `SAETrainer` in its default configuration, fed the same batches;
3. the same with `autocast=True` (bf16);
4. Dialbox again, reading the same rows back from an activation store on disk;
and on CUDA a fifth, Dialbox with `train.triton_kernels=false` (torch's decoder and dense encoder
backward), plus the decoder alone, forward and backward, Triton against torch's embedding_bag.
Each round times every way for `--steps` steps, in a rotating order; the table has the medians.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from sae_lens.config import LoggingConfig, SAETrainerConfig
from sae_lens.training.sae_trainer import SAETrainer

from activations.markdown import table
from activations.models import resolve_dtype
from pipeline.bench import make_command, write_section
from activations.config import StoreConfig
from pipeline.config import SAEConfig, TrainConfig
from activations.harvesting import chunk_rows_for
from activations.store import ActivationStore, ShardWriter
from sae.training import training_batches
from sae.architectures import build_sae, learning_rate
from sae.step import torch_decode, triton_kernels
from sae.trainer import Member, Trainer

SITE = "L15.resid_post"
QUICK = dict(d_in=64, d_sae=512, k=8, batch=256, steps=2, rounds=2, batches=6, reader_width=256, reader_rows=4096,
             reader_epochs=1)


def synthetic_activations(rows: int, d_in: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """Sparse sums of a hidden dictionary plus noise (what an SAE is meant to take apart), at mean
    norm sqrt(d_in) as the trainer normalises them, rounded to bf16 so the store holds the same rows."""
    g = torch.Generator(device).manual_seed(seed)
    features = F.normalize(torch.randn(4 * d_in, d_in, generator=g, device=device), dim=-1)
    idx = torch.randint(4 * d_in, (rows, 16), generator=g, device=device)
    x = F.embedding_bag(idx, features, per_sample_weights=torch.rand(rows, 16, generator=g, device=device), mode="sum")
    x += 0.1 * torch.randn(rows, d_in, generator=g, device=device)
    x *= d_in**0.5 / x.norm(dim=-1).mean()
    return x.bfloat16().float()


def write_store(root, blocks, width: int) -> ActivationStore:
    """Rows, given as blocks of [rows, width] tensors, stored as `make harvest` would store them
    (default dtype and chunking; no fsync: not timed)."""
    sc = StoreConfig()
    chunk_rows = chunk_rows_for([width], sc.dtype, sc.chunk_rows, sc.chunk_mib)
    with ShardWriter(root, 0, 1, {SITE: width}, {"model": "synthetic"}, dtype=sc.dtype, chunk_rows=chunk_rows,
                     fsync=False) as w:
        for x in blocks:
            n = len(x)
            w.append({"tokens": np.zeros(n, np.int32), "doc_ids": np.zeros(n, np.int64), "positions": np.zeros(n, np.int64),
                      SITE: x.cpu()})
        w.finish()
    return ActivationStore(root)


def reader_rates(root, width: int, rows: int, batch: int, rounds: int, epochs: int) -> list[float]:
    """Rows/s of the training loader alone (`ActivationStore.iter_batches`, default threads), `epochs`
    shuffled epochs per round over a bf16 store of `rows` x `width` that was just written (page cache).
    The store is synced to disk first, so that no round competes with the kernel writing it back."""
    store = write_store(root, (torch.randn(min(4096, rows - i), width) for i in range(0, rows, 4096)), width)
    os.sync()
    rates = []
    for r in range(rounds):
        start, n = time.perf_counter(), 0
        for epoch in range(epochs):  # one epoch of 65,536 rows is a third of a second: too short to time alone
            for b in store.iter_batches(SITE, batch, seed=r * epochs + epoch):
                n += len(b[SITE])
        rates.append(n / (time.perf_counter() - start))
    return rates


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float32: "float32"}[dtype]


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul in the encoder's dtype: the most the chip gives our encoder matmuls.
    (Not bf16 on a CPU without bf16 units: torch emulates it there, one 2048^3 product took 56 s on 2 AVX2 cores.)"""
    n = 8192 if device.type == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    reps = 10 if device.type == "cuda" else 2
    times = []
    for _ in range(6):
        sync(device)
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        times.append((time.perf_counter() - t) / reps)
    return 2 * n**3 / statistics.median(times[1:])  # the first one warms up


def median_seconds(fn, device: torch.device) -> float:
    """Median seconds of 10 calls of fn, after a first one that compiles."""
    times = []
    for _ in range(11):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def decoder_seconds(decode, d_in: int, d_sae: int, k: int, batch: int, device: torch.device) -> float:
    """One forward and backward of `decode` alone: `batch` tokens of k random latents."""
    g = torch.Generator(device).manual_seed(0)
    table = torch.randn(d_sae, d_in, generator=g, device=device, requires_grad=True)
    latents = torch.randint(d_sae, (batch, k), generator=g, device=device)
    weights = torch.rand(batch, k, generator=g, device=device, requires_grad=True)
    grad_out = torch.randn(batch, d_in, generator=g, device=device)

    def step():
        decode(latents, table, weights).backward(grad_out)
        table.grad = weights.grad = None
    return median_seconds(step, device)


def encoder_forward_ms(d_in: int, d_sae: int, k: int, batch: int, device: torch.device) -> dict[str, float]:
    """Each way sae/triton_encode.py can run the encoder's bf16 forward (x @ W_enc + b_enc, top k) alone,
    timed as the step's first batch times them (the fused ways that fail or disagree are left out)."""
    from sae import triton_encode  # CUDA only: CPU runs never load triton

    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(batch, d_in, generator=g, device=device).bfloat16()
    W = (torch.randn(d_in, d_sae, generator=g, device=device) / d_in**0.5).bfloat16()
    b = torch.zeros(d_sae, device=device)
    return triton_encode.time_forwards(x, W, b, k)


def cuda_notes(args, d_sae: int, encoder_ms: dict[str, float]) -> str:
    return f"""
On CUDA the step runs the Triton kernels of `sae/triton_topk.py` (`train.triton_kernels`, on by default): the
decoder, and the encoder's backward over the k active latents only, so of the three encoder matmuls counted
above it runs the forward one, fused with the top k by `sae/triton_encode.py` where that times faster (AuxK's
dead latents get their own small dense product, forward and backward);
the FLOPs per token stay those of the dense step, for comparison. "torch kernels" is the same step with
`train.triton_kernels=false` (embedding_bag, dense encoder backward), timed in the same rotation. The decoder
alone: {args.batch} tokens x k {args.k} random latents of a {d_sae} x {args.d_in} float32 decoder, one forward
and backward, median of 10 after a first call that compiles. The encoder forward alone: {args.batch} random
tokens through a bf16 {args.d_in} x {d_sae} encoder, the top {args.k} of each, by each way of
`sae/triton_encode.py`, checked against cuBLAS's answer and timed by `triton.testing.do_bench`, as the step
does on its first batch to choose the fastest:
{"; ".join(f"{name} {ms:.3g} ms" for name, ms in encoder_ms.items())}."""


def encoder_row(encoder_ms: dict[str, float]) -> list[str]:
    """cuBLAS + torch.topk against the fastest fused tile shape."""
    baseline, *fused = encoder_ms
    if not fused:
        return ["TopK encoder forward alone (bf16): fused", "no fused tile ran here (see the warnings above)", "", ""]
    best = min(fused, key=encoder_ms.get)
    return [f"TopK encoder forward alone (bf16): {baseline} / {best}",
            f"{encoder_ms[baseline]:.3g} / {encoder_ms[best]:.3g} ms",
            f"**{encoder_ms[baseline] / encoder_ms[best]:.2f}x**", ""]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-in", type=int, default=576)  # SmolLM2-135M's residual width
    parser.add_argument("--d-sae", type=int, default=9216)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=0, help="timed steps per way and round (0: 3 on cpu, 20 on cuda)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=20, help="distinct batches of data, cycled")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dead-frac", type=float, default=0.1,
                        help="latents counted dead at the start of each round, the same in every trainer (1 = all)")
    parser.add_argument("--reader-width", type=int, default=4096, help="site width of the reader-alone row (DeepSeek-V4-Flash's)")
    parser.add_argument("--reader-rows", type=int, default=65536, help="rows of the reader-alone store")
    parser.add_argument("--reader-epochs", type=int, default=4, help="epochs over it per round of the reader-alone row")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    args = parser.parse_args(argv)
    if args.quick:  # quick sizes become the defaults; flags given still win
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
    return args


class Contenders:
    """The ways to train, on the same batches from the same weights: Dialbox's step from memory and from a
    store (and on CUDA with torch's kernels), sae-lens's SAETrainer by default and with autocast."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.device = args, torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        # what the Dialbox step's encoder matmul runs in here (train.bf16_encoder's default: bf16 where native)
        self.encoder_dtype = resolve_dtype("auto", self.device)
        self.steps, self.warmup = args.steps or (20 if self.cuda else 3), 3 if self.cuda else 1
        self.x = synthetic_activations(args.batches * args.batch, args.d_in, self.device)
        self.data = list(self.x.split(args.batch))
        self.sae_cfg = OmegaConf.structured(SAEConfig(k=args.k, d_sae=args.d_sae))
        self.train_cfg = OmegaConf.create({"train": OmegaConf.structured(TrainConfig(batch_size=args.batch,
                                                                                     device=args.device))})
        self.sae = self.new_sae()
        self.d_sae, self.lr = self.sae.cfg.d_sae, learning_rate(self.sae_cfg, self.sae.cfg.d_sae)
        self.dialboxes = {"dialbox": self.dialbox(self.train_cfg.train, self.sae)}
        if self.cuda:  # the same step with torch's kernels: what the Triton kernels (sae/triton_topk.py) gain
            self.dialboxes["dialbox torch kernels"] = self.dialbox(
                OmegaConf.merge(self.train_cfg.train, {"triton_kernels": False}), self.new_sae())
        self.lens = {"sae-lens": self.sae_lens(False), "sae-lens autocast": self.sae_lens(True)}
        # A fresh SAE has no dead latents for a million tokens, so AuxK would never run: every round
        # starts with the same `dead_frac` of the latents marked dead in every trainer (mark_dead).
        dead = torch.randperm(self.d_sae, generator=torch.Generator().manual_seed(1))
        self.dead = dead[:round(args.dead_frac * self.d_sae)].to(self.device)

    def new_sae(self):
        torch.manual_seed(0)  # every trainer starts from the same weights
        return build_sae(self.sae_cfg, self.args.d_in, {"hook_name": SITE}, self.args.device)

    def dialbox(self, cfg, sae) -> Trainer:
        return Trainer([Member("base", SITE, sae, 1.0, learning_rate(self.sae_cfg, sae.cfg.d_sae))], 10**9, cfg)

    def sae_lens(self, autocast: bool) -> SAETrainer:
        # sae-lens's defaults, but for what must match: lr (its runner sets lr_end = lr / 10), the batch and no wandb.
        cfg = SAETrainerConfig(total_training_samples=10**12, train_batch_size_samples=self.args.batch, lr=self.lr,
                               lr_end=self.lr / 10, device=self.args.device, autocast=autocast,
                               logger=LoggingConfig(log_to_wandb=False))
        return SAETrainer(cfg, self.new_sae(), data_provider=itertools.cycle(self.data))

    def mark_dead(self) -> None:
        """"Has not fired for longer than the dead window", in each trainer's own counter."""
        for trainer in self.dialboxes.values():
            trainer.members[0].steps_since_fired[self.dead] = 10**9
        for trainer in self.lens.values():
            trainer.n_forward_passes_since_fired[self.dead] = 10**9

    def store_steps(self, store: ActivationStore) -> int:
        """Steps of the store way per timing: whole shuffle windows (the reader reads `shuffle_chunks` chunks
        at a time), their reads included, the rate a long run sees."""
        window = max(1, self.train_cfg.train.shuffle_chunks * store.chunk_rows // self.args.batch)
        return -(-self.steps // window) * window

    def ways(self, store: ActivationStore) -> dict:
        """{name: run(n)}, each running n steps (the store way whole windows) and returning the steps it ran."""
        def from_memory(trainer):
            def run(n):
                for _ in range(n):
                    trainer.step({SITE: self.data[trainer.step_count % len(self.data)]})
                return n
            return run

        def fit(trainer):
            def run(n):  # the body of SAETrainer.fit with wandb, evals and checkpoints off
                for _ in range(n):
                    trainer.maybe_reset_sparsity()
                    trainer.step(next(trainer.data_provider))
                    trainer.n_training_steps += 1
                return n
            return run

        def from_store(n):  # what `make train` runs: shuffled batches read ahead by the loader's threads
            n = self.store_steps(store) if n == self.steps else n
            batches = training_batches(store, [SITE], self.train_cfg, 0, pin_memory=self.cuda)
            for _ in range(n):
                self.dialboxes["dialbox"].step({s: v.to(self.device, non_blocking=True) for s, v in next(batches).items()})
            batches.close()  # its reads end with it, so none goes on while another way is timed
            return n

        ways = {"dialbox": from_memory(self.dialboxes["dialbox"]), **{n: fit(t) for n, t in self.lens.items()},
                "dialbox store": from_store}
        ways.update({name: from_memory(t) for name, t in self.dialboxes.items() if name != "dialbox"})
        return ways

    def race(self, store: ActivationStore) -> dict[str, list[float]]:
        """Tokens/s of every way in each round: `steps` steps each after a warm-up, in an order rotated each
        round so that no way always runs first."""
        ways = self.ways(store)
        for run in ways.values():  # warm-up: allocator, kernels, the first dead-latent pass
            run(self.warmup)
        rates = {name: [] for name in ways}
        for r in range(self.args.rounds):
            self.mark_dead()
            for name in list(ways)[r % len(ways):] + list(ways)[:r % len(ways)]:
                sync(self.device)
                start = time.perf_counter()
                steps = ways[name](self.steps)
                sync(self.device)
                rates[name].append(steps * self.args.batch / (time.perf_counter() - start))
        return rates


def kernel_times(c: Contenders) -> tuple[float, dict, dict]:
    """(the encoder dtype's matmul peak FLOP/s, the decoder alone in ms per kernel, the encoder forward in ms per way); the
    last two on CUDA only."""
    args = c.args
    decoders = {"Triton": triton_kernels().decode, "torch embedding_bag": torch_decode} if c.cuda else {}
    decoder_ms = {name: 1e3 * decoder_seconds(fn, args.d_in, c.d_sae, args.k, args.batch, c.device)
                  for name, fn in decoders.items()}
    encoder_ms = encoder_forward_ms(args.d_in, c.d_sae, args.k, args.batch, c.device) if c.cuda else {}
    return matmul_peak(c.device, c.encoder_dtype), decoder_ms, encoder_ms


def flops_per_token(d_in: int, d_sae: int, k: int) -> int:
    """FLOPs of one Dialbox step per token: the three encoder matmuls (forward, grad W_enc, grad of the input,
    which b_dec's gradient needs) and the k decoder rows and k_aux AuxK rows, forward and two backward
    products each; elementwise work, topk and Adam not counted."""
    return 6 * d_in * (d_sae + k + min(d_in // 2, d_sae))


def result_rows(args, tps: dict[str, float], peak: float, reader_rows: float, decoder_ms: dict,
                encoder_ms: dict, peak_dtype: str = "bf16") -> list[list[str]]:
    """The table: each ratio computed from the medians it is shown beside."""
    def ratio(a: str, b: str, target: str, unit: str = "x") -> list[str]:
        value = f"{tps[a] / tps[b]:.2f}{unit}"
        return [f"{tps[a]:,.0f} / {tps[b]:,.0f} tok/s", f"**{value}**", target]

    achieved = tps["dialbox"] * flops_per_token(args.d_in, args.d_sae, args.k)
    rows = [
        ["Dialbox / sae-lens SAETrainer (default)", *ratio("dialbox", "sae-lens", ">= 3x")],
        ["Dialbox / sae-lens SAETrainer (autocast=True)", *ratio("dialbox", "sae-lens autocast", ">= 2x")],
        ["Dialbox from activation store / from memory", *ratio("dialbox store", "dialbox", ">= 0.90", unit="")],
        [f"Dialbox step / {peak_dtype} matmul peak", f"{achieved / 1e12:.3g} / {peak / 1e12:.3g} TFLOP/s",
         f"**{achieved / peak:.1%}**", ""],
        [f"store reader alone, width {args.reader_width} bf16, page cache", f"{reader_rows:,.0f} rows/s",
         f"**{reader_rows * args.reader_width * 2 / 1e9:.2f} GB/s**", ">= 1.5 GB/s"],
    ]
    if decoder_ms:  # CUDA
        rows[4:4] = [
            ["Dialbox step, Triton kernels / torch kernels", *ratio("dialbox", "dialbox torch kernels", "")],
            ["TopK decoder alone, forward + backward: torch embedding_bag / Triton",
             f"{decoder_ms['torch embedding_bag']:.3g} / {decoder_ms['Triton']:.3g} ms",
             f"**{decoder_ms['torch embedding_bag'] / decoder_ms['Triton']:.2f}x**", ""],
            encoder_row(encoder_ms),
        ]
    return rows


def notes(c: Contenders, rates: dict[str, list[float]], reader: list[float], encoder_ms: dict) -> str:
    args, cuda, train = c.args, c.cuda, c.train_cfg.train
    d_in, d_sae = args.d_in, c.d_sae
    spread = "; ".join(f"{n}: " + ", ".join(f"{v:,.0f}" for v in rates[n]) for n in rates)
    return f"""
TopK SAE d_in {d_in} -> d_sae {d_sae}, k {args.k}, AuxK coefficient {c.sae.cfg.aux_loss_coefficient:g}, with the
same {args.dead_frac:.0%} of the latents marked dead in every trainer at the start of each round (OpenAI's
ceiling for dead latents; `--dead-frac 1` is the worst case), batch {args.batch},
on {args.device}. Data: {args.batches} batches of synthetic activations (sparse sums of {4 * d_in} random unit
directions, 16 per row, plus noise; mean norm sqrt(d_in); bf16-rounded), cycled; in memory they sit on the device.
Every trainer starts from the same weights and lr ({c.lr:.3g}). Dialbox runs `sae.trainer.Trainer.step`, the loop
of `make train` (grad clipping, Adam, dead-latent counters, its logging step every {train.log_every}).
sae-lens runs the body of `SAETrainer.fit` (`maybe_reset_sparsity`, `step(next(data_provider))`) with its
default config (constant lr, Adam, fp32, no TF32) and wandb, evals and checkpoints off; `step` is the seam
`fit` itself calls. The store run writes the same rows with `ShardWriter` (bf16, default chunking) to a
temporary directory and trains from `sae.training.training_batches` (`ActivationStore.iter_batches`, read ahead
by {train.loader_workers} threads{", pinned" if cuda else ""}); each timing starts a reader and covers whole shuffle windows (the reads
of their {train.shuffle_chunks} chunks each included), as a long run sees them. The rows were just
written, so they come from the page cache.
{args.rounds} rounds x {c.steps} steps per way after {c.warmup} warm-up step(s), order rotated each round;
medians reported. Tokens/s per round: {spread}.
FLOPs per token of the Dialbox step: 6 * d_in * (d_sae + k + k_aux) = {flops_per_token(d_in, d_sae, args.k):,}: the
encoder's three matmuls (forward, grad W_enc, grad of its input for b_dec), and the k decoder and k_aux = d_in/2 AuxK
rows gathered forward and twice backward; elementwise work, topk and Adam are not counted. The peak is the
median {dtype_name(c.encoder_dtype)} FLOP/s of a {"8192" if cuda else "2048"}^3 matmul measured in this run.{cuda_notes(args, d_sae, encoder_ms) if cuda else ""}
The reader alone: {args.reader_rows:,} random rows of width {args.reader_width} written as bf16 with `ShardWriter`,
synced to disk, then read back as {args.reader_epochs} shuffled epochs of batches of {args.batch} per round (`ActivationStore.iter_batches`: chunk reads and
row shuffles on {TrainConfig().loader_workers} threads), nothing consuming them; the rows were just written, so they
come from the page cache. Rows/s per round: {", ".join(f"{v:,.0f}" for v in reader)}. Load average at the end:
{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs.
"""


def main(argv=None) -> None:
    args = parse_args(argv)
    contenders = Contenders(args)
    with tempfile.TemporaryDirectory() as tmp:
        rates = contenders.race(write_store(tmp, contenders.data, args.d_in))
        peak, decoder_ms, encoder_ms = kernel_times(contenders)
    with tempfile.TemporaryDirectory() as tmp:
        reader = reader_rates(tmp, args.reader_width, args.reader_rows, args.batch, args.rounds, args.reader_epochs)
    tps = {name: statistics.median(v) for name, v in rates.items()}
    rows = result_rows(args, tps, peak, statistics.median(reader), decoder_ms, encoder_ms,
                       dtype_name(contenders.encoder_dtype))
    body = table(["measure", "values", "ratio", "target"], rows) + "\n" + notes(contenders, rates, reader, encoder_ms)
    command = make_command("bench-train", argv if argv is not None else sys.argv[1:])
    write_section("bench-train-cuda" if contenders.cuda else "bench-train", command, body)


if __name__ == "__main__":
    main()
