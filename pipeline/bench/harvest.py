"""make bench-harvest: what harvesting costs on top of the forward pass, measured in one run.

    python -m pipeline.bench.harvest [--tokens 51200] [--model smollm2_135m]

1. harvest throughput / bare forward throughput: the same windows, the same batches, the
   same blocks (sites at the last layer, so no truncation helps the harvest), no hooks and
   no writes for the baseline;
2. a forward truncated after layer 9 of 30 against a full forward with the LM head;
3. bytes on disk per token against the arithmetic, and the peak RSS;
4. router capture (harvest.router) on the tiny random DeepSeek-V4: harvests with and without it,
   interleaved in the same run, and the router arrays' bytes per token.
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from activations.adapters import make_adapter
from activations.markdown import table
from pipeline.bench import make_command, write_section
from pipeline.config import compose
from activations.corpus import iter_windows, windows_for_tokens
from activations.harvesting import batches, harvest_with
from activations.models import load_model
from activations.sites import parse_sites
from activations.store import ActivationStore
from activations.store.format import ROUTER_PARTS, TOKEN_COLUMNS, router_key


def time_batches(fn, batch_ids: list[torch.Tensor]) -> float:
    """Tokens per second of fn over all batches (until the GPU, if any, has finished them too)."""
    start = time.perf_counter()
    with torch.inference_mode():
        for ids in batch_ids:
            fn(ids)
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return sum(ids.numel() for ids in batch_ids) / (time.perf_counter() - start)


def store_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and "/c/" in f.as_posix())


def row_bytes(store: ActivationStore) -> int:
    """Bytes one stored token takes by the arithmetic: its bf16 rows at every site, and its token columns."""
    return (sum(store.width(s) * 2 for s in store.sites)
            + sum(np.dtype(dtype).itemsize for dtype in TOKEN_COLUMNS.values()))  # tokens, doc_ids, ...


def router_cost(model_name: str, tokens: int, repeats: int) -> list[list[str]]:
    """Rows: harvest tokens/s with router capture over without (best of `repeats` each, interleaved so
    load on the machine hits both alike), with fsync off (the capture: hooks, copies, bytes written)
    and on (each commit also syncs the router arrays' files), and the router bytes per stored token."""
    with tempfile.TemporaryDirectory() as tmp:
        def config(name: str, router: bool, fsync: bool):
            return compose("harvest", [f"model={model_name}", f"run.runs_dir={tmp}", f"run.run_name={name}",
                                       "harvest.sites=[L3.ffn_out]", f"harvest.max_tokens={tokens}",
                                       f"harvest.router={str(router).lower()}", f"store.fsync={str(fsync).lower()}",
                                       "data.context_length=64"])

        model, tokenizer = load_model(config("warm", False, False).model)
        harvest_with(config("warm", True, False), model, tokenizer)  # warm-up
        rates = {(router, fsync): [] for router in (False, True) for fsync in (False, True)}
        for k in range(repeats):
            for router, fsync in rates:
                store, seconds = harvest_with(config(f"r{k}-{router}-{fsync}", router, fsync), model, tokenizer)
                rates[router, fsync].append(store.n_tokens / seconds)
        routed = ActivationStore(Path(tmp) / "r0-True-True")
        layers, shard = routed.router, Path(tmp) / "r0-True-True" / "activations" / "shards" / "r00000-of-00001"
        router_bytes = sum(store_bytes(shard / router_key(layer, part)) for layer in layers for part in ROUTER_PARTS)
        padded_rows = math.ceil(routed.n_tokens / routed.chunk_rows) * routed.chunk_rows
    expected, top_k = sum(4 * spec["top_k"] for spec in layers.values()), next(iter(layers.values()))["top_k"]
    rows = []
    for fsync, what in ((False, "store.fsync=false"), (True, "store.fsync=true, the default")):
        with_router, without = max(rates[True, fsync]), max(rates[False, fsync])
        rows.append([f"router capture: harvest with / without ({model_name}, {len(layers)} routed layers, {what})",
                     f"{with_router:,.0f} / {without:,.0f} tok/s", f"**{with_router / without:.2f}**", ">= 0.95"])
    return rows + [["router bytes per stored token (all routed layers)", f"{router_bytes / padded_rows:,.1f} "
                    f"(arithmetic: {expected} = {len(layers)} layers x top_k {top_k} x (2 + 2); Flash: 24 per layer)",
                    "", ""]]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=51_200)
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--sites", default="L15.resid_post,L29.resid_post")
    parser.add_argument("--truncate-layer", type=int, default=9)
    parser.add_argument("--router-model", default="tiny_deepseek_v4", help="the MoE model router capture is timed on")
    parser.add_argument("--router-tokens", type=int, default=65_536)
    parser.add_argument("--router-repeats", type=int, default=3)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose("harvest", [f"model={args.model}", f"run.runs_dir={tmp}", f"harvest.sites=[{args.sites}]",
                       f"harvest.max_tokens={args.tokens}", "store.dtype=bfloat16"])
        model, tokenizer = load_model(cfg.model)
        adapter = make_adapter(model, cfg.model)
        windows = iter_windows(cfg.data, tokenizer, max_windows=windows_for_tokens(args.tokens, cfg.data.context_length))
        batch_ids = [torch.from_numpy(np.stack([w.tokens for w in b])) for b in batches(windows, cfg.harvest.batch_size)]
        body = model.model  # the blocks without the LM head: exactly what the harvest runs
        time_batches(body, batch_ids[:2])  # warm-up

        bare_before = time_batches(body, batch_ids)
        store, seconds = harvest_with(cfg, model, tokenizer)
        bare_after = time_batches(body, batch_ids)
        bare = (bare_before + bare_after) / 2
        harvest_tps = sum(ids.numel() for ids in batch_ids) / seconds  # BOS rows run but are not stored

        shallow = parse_sites([f"L{args.truncate_layer}.resid_post"])
        full_tps = time_batches(model, batch_ids)
        truncated_tps = time_batches(lambda ids: adapter.capture(shallow, ids), batch_ids)

        written = store_bytes(Path(tmp) / "demo" / "activations")
        # zarr stores the last chunk whole, so the arithmetic counts rows up to a chunk boundary.
        padded_rows = math.ceil(store.n_tokens / store.chunk_rows) * store.chunk_rows
        row = row_bytes(store)
        peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    rows = [
        ["harvest / bare forward", f"{harvest_tps:,.0f} / {bare:,.0f} tok/s", f"**{harvest_tps / bare:.2f}**", ">= 0.90"],
        [f"truncated at L{args.truncate_layer} / full forward", f"{truncated_tps:,.0f} / {full_tps:,.0f} tok/s",
         f"**{truncated_tps / full_tps:.2f}x**", ">= 2x"],
        ["bytes on disk / arithmetic", f"{written:,} / {padded_rows * row:,}",
         f"**{written / (padded_rows * row):.3f}**", "1.000 (no hidden copies)"],
        ["bytes per stored token", f"{written / store.n_tokens:,.1f} (row: {row})", "", ""],
        ["peak RSS", f"{peak_rss_mib:,.0f} MiB", "", ""],
        *router_cost(args.router_model, args.router_tokens, args.router_repeats),
    ]
    notes = (f"\nModel {args.model}, sites {args.sites}, {store.n_tokens:,} tokens stored (bf16), "
             f"{len(batch_ids)} batches of {cfg.harvest.batch_size} x {cfg.data.context_length}. "
             f"Bare forward measured before and after the harvest ({bare_before:,.0f} and {bare_after:,.0f} tok/s) "
             "and averaged. The harvest rate counts every token run through the model. Router capture: best of "
             f"{args.router_repeats} harvests each way of {args.router_tokens:,} tokens at L3.ffn_out, interleaved. "
             "A commit syncs every array's new chunk file, so with fsync on the router's 2 arrays per layer add "
             "a fixed cost per commit that a fast forward (the tiny model's) does not hide.\n")
    write_section("bench-harvest", make_command("bench-harvest", argv or sys.argv[1:]), table(["measure", "values", "ratio", "target"], rows) + "\n" + notes)


if __name__ == "__main__":
    main()
