"""make quality: does an SAE trained by Dialbox on the embedded model reach published quality?

    python -m pipeline.bench.quality [--tokens 2000000] [--run quality]

Harvests SmolLM2-135M-Instruct `L15.resid_post` (resuming a harvest already under way),
trains TopK k=32 at 16x expansion on every harvested token, evaluates on held-out text
and writes the metrics against the targets (FVU <= 0.25, dead <= 10%,
CE loss recovered >= 0.85) to BENCHMARKS.md. It takes about an hour on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import sys

from activations.markdown import table
from pipeline.bench import write_section
from pipeline.config import compose
from activations.harvesting import harvest
from sae.training import train

SITE = "L15.resid_post"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2_100_000,
                        help="tokens to harvest (the Bible has about 1.08M: it is harvested whole)")
    parser.add_argument("--train-tokens", type=int, default=2_100_000, help="tokens trained (epochs as needed)")
    parser.add_argument("--run", default="quality")
    parser.add_argument("--eval-tokens", type=int, default=32_768)
    parser.add_argument("--outlier-norm", type=float, default=10.0,
                        help="leave out tokens above this multiple of the mean norm (SmolLM2's attention sinks; "
                             "the train stage's default)")
    args = parser.parse_args(argv)

    # The Bible alone, as when the recorded numbers were first measured (the demo mixes in Wikipedia):
    # a quality change then means the SAE changed, not its data.
    harvest(compose("harvest", [f"run.run_name={args.run}", f"harvest.sites=[{SITE}]", "data.demo_mix=[bible]",
                                      f"harvest.max_tokens={args.tokens}", "harvest.batch_size=32"]))
    results = train(compose("train", [f"run.run_name={args.run}", "sae=topk", "sae.k=32", "sae.expansion_factor=16",
                                      f"train.tokens={args.train_tokens}", f"eval.tokens={args.eval_tokens}",
                                      f"train.outlier_norm={args.outlier_norm}"]))
    m = results[f"{SITE}/base"]
    rows = [
        ["fvu", f"**{m['fvu']:.3f}**", "<= 0.25"],
        ["dead_frac", f"**{m['dead_frac']:.3f}**", "<= 0.10"],
        ["ce_loss_recovered", f"**{m['ce_loss_recovered']:.3f}**", ">= 0.85"],
        ["l0", f"{m['l0']:.1f}", "32"],
        ["dense_frac", f"{m['dense_frac']:.4f}", ""],
        ["kl_div", f"{m['kl_div']:.4f}", ""],
        ["CE clean / with SAE / zero-ablated", f"{m['ce_loss_clean']:.3f} / {m['ce_loss_with_sae']:.3f} / "
                                              f"{m['ce_loss_zero_ablation']:.3f}", ""],
        ["tokens trained", f"{m['tokens_trained']:,}", ">= 2,000,000"],
        ["training tokens/s", f"{m['tokens_per_s']:,.0f}", ""],
    ]
    epochs = m["tokens_trained"] / m["store_rows_trained_on"]
    notes = (f"\nSmolLM2-135M-Instruct `{SITE}` on the demo corpus's King James Bible (`data.demo_mix=[bible]`), TopK k=32, "
             f"576 -> {m['d_sae']} latents, batch 4096, {m['tokens_trained']:,} tokens = {epochs:.2f} epochs over "
             f"{m['store_rows_trained_on']:,} stored tokens; evaluated on {m['eval_tokens']:,} tokens of "
             f"{'held-out windows training never read' if m['eval_on_heldout_text'] else 'training text'}. "
             f"Tokens above {args.outlier_norm:g}x the mean norm (SmolLM2's 'massive activation' attention-sink "
             "tokens, about 0.03% of tokens, most of the variance) are left out of training and keep their own "
             "activations in the evaluation, as BOS does.\n")
    command = "make quality" + (f" ARGS='{' '.join(sys.argv[1:])}'" if argv is None and sys.argv[1:] else "")
    write_section("quality", command, table(["metric", "value", "target"], rows) + "\n" + notes)


if __name__ == "__main__":
    main()
