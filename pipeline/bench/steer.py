"""make bench-steer: what one active intervention costs in generation, measured in one run.

    python -m pipeline.bench.steer [--model smollm2_135m] [--site L15.resid_post] [--tokens 64] [--batch 8]

The same prompts generate the same number of tokens (greedy, end-of-turn suppressed until the last)
with no intervention, with one `add` and with one `project` of a random vector at one site, in
rounds with the order rotated; medians reported. Target: steered / unsteered >= 0.95.
Also the wall time of one `python -m pipeline.steer` as a user runs it (imports, model load, one prompt
unsteered and steered, 64 tokens each). Target: at most 30 s on an idle 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from steering.steerer import Steerer
from steering.vectors import SteeringVector
from activations.markdown import table
from pipeline.bench import make_command, write_section
from pipeline.config import compose
from activations.sites import Site
from steering.contrast import read_prompts

def tokens_per_s(steerer: Steerer, prompts: list[str], interventions: list, tokens: int) -> float:
    start = time.perf_counter()
    out = steerer.generate(prompts, interventions, max_new_tokens=tokens, min_new_tokens=tokens)
    seconds = time.perf_counter() - start
    assert all(len(g.tokens) == tokens for g in out), "every prompt must generate the same number of tokens"
    return len(prompts) * tokens / seconds


def one_prompt_seconds(runs: Path, model: str) -> float:
    """Wall time of the steer stage in a fresh process, as `make steer` runs it."""
    command = [sys.executable, "-m", "pipeline.steer", f"run.runs_dir={runs}", "run.run_name=bench", f"model={model}",
               "steer.prompt=Tell me about your weekend.", 'steer.interventions=["add scale=1"]', "steer.max_new_tokens=64"]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, cwd=Path(__file__).resolve().parents[2])
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--site", default="L15.resid_post")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    site = Site.parse(args.site)
    with tempfile.TemporaryDirectory() as tmp:
        steerer = Steerer(Path(tmp) / "bench", compose("steer", [f"model={args.model}"]).model)
        width = steerer.adapter.site(site).width
        direction = torch.randn(width, generator=torch.Generator().manual_seed(0))
        for op in ("add", "project"):
            SteeringVector(op, site.kind, op, "raw" if op == "add" else "fraction", {site.layer: direction},
                           steerer.identity).save(steerer.run.vectors)
        prompts = read_prompts("heldout.txt")[: args.batch]
        ways = {"none": [], "add": ["add scale=1"], "project": ["project scale=0.5"]}
        tokens_per_s(steerer, prompts, [], 4)  # warm-up
        rates = {way: [] for way in ways}
        for r in range(args.rounds):
            order = list(ways)[r % len(ways):] + list(ways)[: r % len(ways)]
            for way in order:
                rates[way].append(tokens_per_s(steerer, prompts, ways[way], args.tokens))
        one_prompt = one_prompt_seconds(Path(tmp), args.model)
    median = {way: statistics.median(v) for way, v in rates.items()}
    rows = [[f"one `{way}` at {args.site} / none", f"{median[way]:,.1f} / {median['none']:,.1f} tok/s",
             f"**{median[way] / median['none']:.3f}**", ">= 0.95"] for way in ("add", "project")]
    rows.append(["one-prompt `python -m pipeline.steer` (imports, model load, 2 x 64 tokens)",
                 f"{one_prompt:.1f} s wall", "", "<= 30 s"])
    per_round = "; ".join(f"{way}: " + ", ".join(f"{x:,.1f}" for x in v) for way, v in rates.items())
    notes = (f"\nModel {args.model}, {len(prompts)} held-out prompts in one left-padded batch, {args.tokens} new tokens "
             f"each (greedy, end of turn suppressed so every way generates the same tokens count), KV cache on. "
             f"{args.rounds} rounds, order rotated each round, medians reported. Tokens/s per round: {per_round}. "
             f"Load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
             + (" (above the CPU count: other jobs shared the machine and the ratios are noise)" if os.getloadavg()[0] > os.cpu_count() else "")
             + ".\n")
    write_section("bench-steer", make_command("bench-steer", argv or sys.argv[1:]), table(["measure", "values", "ratio", "target"], rows) + "\n" + notes)


if __name__ == "__main__":
    main()
