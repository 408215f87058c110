"""make bench-harvest-flash: a harvest at DeepSeek-V4-Flash's true width and expert counts, on one GPU.

    python -m pipeline.bench.harvest_flash [--tokens 32768] [--sites L0.resid_post,...] [hydra overrides...]

The model is conf/model/random_deepseek_v4_flash.yaml: Flash's first 4 blocks with random weights
(hidden 4096, 256 experts top-6 + 1 shared, hc_mult 4; 26.7B parameters, 53.5 GB in bf16), drawn
straight onto the GPU. After a warm-up harvest of 2 batches it harvests `--tokens` tokens at sites
across the 4 blocks, then runs the bare forward of the same batches, and reports the build time,
the harvest's tokens/s against the bare forward's, the peak GPU memory of the harvests (the peak
is reset after the build) beside the weights', the bytes per stored token and the model's shape.
There is no target: this measures what a harvest of Flash's shape runs at on this GPU.
Needs an H200-class GPU (about 60 GB free); not part of `make bench`. `--tiny` is a dry run on the
CPU: the same blocks, schedule and compression at a tiny width, reporting the peak RSS instead.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from activations.corpus import iter_windows, windows_for_tokens
from activations.harvesting import batches, harvest_with
from activations.markdown import table
from activations.memory import model_size
from activations.models import load_model
from pipeline.bench import make_command, write_section
from pipeline.bench.harvest import row_bytes, store_bytes, time_batches
from pipeline.cli import one_line_errors
from pipeline.config import compose

GB = 1e9
# The dry run: the widths and the expert count shrunk; the 4 blocks, their schedule, compression, top-6
# routing and indexer top-k as they are.
TINY = ["model.device=cpu", "model.dtype=float32", *(f"++model.config.{field}={value}" for field, value in dict(
    hidden_size=64, num_attention_heads=4, head_dim=32, q_lora_rank=32, o_groups=2, o_lora_rank=16, index_n_heads=2,
    index_head_dim=16, n_routed_experts=8, moe_intermediate_size=32).items())]


def shape(model, params: int, weight_bytes: int) -> str:
    c = model.config
    return (f"{c.num_hidden_layers} blocks ({', '.join(c.layer_types)}; {', '.join(c.mlp_layer_types)}), "
            f"hidden {c.hidden_size}, {c.n_routed_experts} experts top-{c.num_experts_per_tok} "
            f"+ {c.n_shared_experts} shared (width {c.moe_intermediate_size}), hc_mult {c.hc_mult}: "
            f"{params / 1e9:.2f}B parameters, {weight_bytes / GB:.1f} GB ({str(model.dtype).removeprefix('torch.')})")


def peak_gb(device: torch.device) -> tuple[float, float]:
    """The GPU's peak memory since its last reset: (allocated by tensors, reserved by torch's allocator)."""
    return torch.cuda.max_memory_allocated(device) / GB, torch.cuda.max_memory_reserved(device) / GB


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32_768, help="tokens to harvest after the warm-up")
    parser.add_argument("--sites", default="L0.resid_post,L3.attn_in,L3.ffn_out,L3.resid_post")
    parser.add_argument("--tiny", action="store_true", help="a dry run on the CPU at a tiny width")
    parser.add_argument("overrides", nargs="*", help="hydra overrides of the harvest config (after --tiny's)")
    args = parser.parse_intermixed_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        def config(name: str, tokens: int):
            return compose("harvest", ["model=random_deepseek_v4_flash", f"run.runs_dir={tmp}", f"run.run_name={name}",
                                       f"harvest.sites=[{args.sites}]", f"harvest.max_tokens={tokens}",
                                       "store.dtype=bfloat16", *(TINY if args.tiny else []), *args.overrides])

        cfg = config("flash", args.tokens)
        started = time.perf_counter()
        model, tokenizer = load_model(cfg.model)
        build_s = time.perf_counter() - started
        params, weight_bytes = model_size(model)
        device = next(model.parameters()).device
        cuda = device.type == "cuda"
        if cuda:
            build_peak, _ = peak_gb(device)
            torch.cuda.reset_peak_memory_stats(device)  # from here on, the harvests' own peak

        warm_up_tokens = 2 * cfg.harvest.batch_size * cfg.data.context_length
        harvest_with(config("warm-up", warm_up_tokens), model, tokenizer)
        store, seconds = harvest_with(cfg, model, tokenizer)
        if cuda:
            harvest_peak, harvest_reserved = peak_gb(device)

        max_windows = windows_for_tokens(args.tokens, cfg.data.context_length)
        windows = iter_windows(cfg.data, tokenizer, max_windows=max_windows)
        batch_ids = [torch.from_numpy(np.stack([w.tokens for w in b])) for b in batches(windows, cfg.harvest.batch_size)]
        harvest_tps = sum(ids.numel() for ids in batch_ids) / seconds  # BOS rows run but are not stored
        # The blocks the harvest runs (its deepest site is in the last one) and the final hc_head and norm;
        # no hooks, no copies, no writes.
        bare = time_batches(lambda ids: model.model(input_ids=ids.to(device), use_cache=False), batch_ids)
        stored_bytes = store_bytes(Path(tmp) / "flash" / "activations") / store.n_tokens

    if cuda:
        memory = [["GPU memory: weights / build peak", f"{weight_bytes / GB:.1f} / {build_peak:.1f} GB allocated", ""],
                  ["GPU memory: harvest peak (reset after the build)",
                   f"{harvest_peak:.1f} GB allocated, {harvest_reserved:.1f} GB reserved", ""]]
    else:
        peak_rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        memory = [["peak RSS (build included)", f"{peak_rss_gib:.2f} GiB", ""]]
    rows = [
        ["model", shape(model, params, weight_bytes), ""],
        [f"build (load_model, init_on_device={cfg.model.init_on_device}, {device})", f"{build_s:.1f} s", ""],
        ["harvest / bare forward", f"{harvest_tps:,.0f} / {bare:,.0f} tok/s", f"**{harvest_tps / bare:.2f}**"],
        *memory,
        ["bytes per stored token", f"{stored_bytes:,.1f} (row: {row_bytes(store)})", ""],
    ]
    notes = (f"\nSites {args.sites}, {store.n_tokens:,} tokens stored (bf16), {len(batch_ids)} batches of "
             f"{cfg.harvest.batch_size} x {cfg.data.context_length}, after a warm-up harvest of {warm_up_tokens:,} "
             "tokens. The harvest rate counts every token run through the model; the bare forward runs the same "
             "batches through the same blocks once the harvest is done. Bytes per stored token: on disk over the "
             "tokens stored (the last chunk of each array is stored whole). No target: the rate a harvest of "
             "Flash's shape runs at here.\n")
    write_section("bench-harvest-flash", make_command("bench-harvest-flash", argv or sys.argv[1:]),
                  table(["measure", "values", "ratio"], rows) + "\n" + notes)


if __name__ == "__main__":
    with one_line_errors("bench-harvest-flash"):
        main()
