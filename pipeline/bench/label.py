"""make bench-label: the mining pass of `make label` against the bare SAE encode of the same rows.

    python -m pipeline.bench.label [--d-in 576 --d-sae 9216 --k 32 --rows 131072] [--device cuda]

Both read the same activation store from disk in the same batches; the baseline only encodes,
the miner also keeps every feature's statistics, top and sampled contexts and histogram. Rounds
alternate the two; the table has the medians. A second measurement mines 65,536 features and
reports the miner's state size and the process's peak memory (the scale the issue asks for).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import psutil
import torch
from omegaconf import OmegaConf

from features.mining import FeatureMiner, MiningPlan
from activations.markdown import table
from pipeline.bench import write_section
from pipeline.bench.train import SITE, synthetic_activations, write_store
from pipeline.config import SAEConfig
from sae.architectures import build_sae


def random_sae(d_in: int, d_sae: int, k: int, device):
    torch.manual_seed(0)
    return build_sae(OmegaConf.structured(SAEConfig(d_sae=d_sae, k=k)), d_in, {"model_name": "synthetic", "hook_name": SITE},
                     str(device)).requires_grad_(False)


def bare_encode(store, sae, plan: MiningPlan, device) -> float:
    """Seconds to read and encode the rows the miner reads, in its batches, keeping nothing."""
    rows = plan.batch_blocks * plan.context_tokens
    n = (store.n_tokens // plan.context_tokens) * plan.context_tokens
    start = time.perf_counter()
    with torch.no_grad():
        for lo in range(0, n, rows):
            acts = sae.encode(torch.from_numpy(store.read(SITE, lo, min(lo + rows, n))).to(device))
            acts.sum().item()  # wait for the device
    return time.perf_counter() - start


def mine(store, sae, plan: MiningPlan, device) -> float:
    start = time.perf_counter()
    FeatureMiner(store, SITE, sae, plan, device).run()
    return time.perf_counter() - start


def state_mib(miner_state: dict) -> float:
    return sum(t.numel() * t.element_size() for t in miner_state.values() if torch.is_tensor(t)) / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-in", type=int, default=576)
    p.add_argument("--d-sae", type=int, default=9216)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--rows", type=int, default=131072)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = p.parse_args()
    device = torch.device(args.device)
    plan = MiningPlan(outlier_norm=0)
    with tempfile.TemporaryDirectory() as tmp:
        store = write_store(tmp, synthetic_activations(args.rows, args.d_in, torch.device("cpu")).split(4096), args.d_in)
        sae = random_sae(args.d_in, args.d_sae, args.k, device)
        mine(store, sae, MiningPlan(max_tokens=plan.batch_blocks * plan.context_tokens), device)  # warm-up
        bare, mined = [], []
        for _ in range(args.rounds):
            bare.append(bare_encode(store, sae, plan, device))
            mined.append(mine(store, sae, plan, device))
        tokens = (store.n_tokens // plan.context_tokens) * plan.context_tokens
        b, m = statistics.median(bare), statistics.median(mined)

        wide = random_sae(args.d_in, 65536, args.k, device)
        big = FeatureMiner(store, SITE, wide, MiningPlan(outlier_norm=0, max_tokens=16384), device)
        big_state = big.run()
        peak = psutil.Process().memory_info().rss / 2**30

    rows = [
        ["bare SAE encode (baseline)", f"{tokens / b:,.0f} tok/s", "1.00"],
        ["mining pass (`make label`)", f"{tokens / m:,.0f} tok/s", f"**{b / m:.2f}** (target >= 0.7)"],
    ]
    body = (f"{args.d_in} -> {args.d_sae} TopK k={args.k}, {tokens:,} stored rows (bf16 store on disk), "
            f"{args.rounds} alternating rounds, medians.\n\n" + table(["pass", "throughput", "ratio"], rows) +
            f"\n\nAt 65,536 features the miner's whole state (top and sampled contexts with per-token activations, "
            f"histograms, pool) is {state_mib(big_state):,.0f} MiB; this process peaked at {peak:.1f} GiB RSS.")
    command = "make bench-label" if args.d_sae == 9216 else f"python -m pipeline.bench.label --d-in {args.d_in} --d-sae {args.d_sae}"
    if args.no_write:
        print(body)
    else:
        write_section("bench-label" if args.device == "cpu" else f"bench-label-{args.device}", command, body)


if __name__ == "__main__":
    main()
