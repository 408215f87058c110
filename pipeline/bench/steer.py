"""make bench-steer: what one active intervention costs in generation, measured in one run.

    python -m pipeline.bench.steer [--model smollm2_135m] [--site L15.resid_post] [--tokens 64] [--batch 8]

The same prompts generate the same number of tokens (greedy, end-of-turn suppressed until the last)
with no intervention, with one `add` and with one `project` of a random vector at one site, in
rounds with the order rotated; medians reported. Target: steered / unsteered >= 0.95.
Also the wall time of one `python -m pipeline.steer` as a user runs it (imports, model load, one prompt
unsteered and steered, 64 tokens each). Target: at most 30 s on an idle 2-core machine.
And the steering server's batching: 8 clients at once, each with its own steering, 64 tokens each
(greedy), against the same requests sent one at a time. Target: >= 2.5x the throughput, and every
output identical.
And reading answers back as make steer-features does (steering/evaluation.py read_answers), against one
plain forward of the same batch. Target: less time.
And a load test: a burst of --burst clients at once (400), far beyond the server's queue (8 rows + 64
waiting), against the default limits and against max_connections=32 (so that most are refused at
accept, not at the queue). Target: every client answered 200 or 429, none reset or dropped.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from steering.limits import ServerLimits
from steering.server import SteeringServer
from steering.evaluation import read_answers
from steering.steerer import Steerer, encode_prompt
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


def reading_seconds(steerer: Steerer, site: Site, rows: int, tokens: int, rounds: int) -> dict:
    """make steer-features reads every answer back through the unsteered model (steering/evaluation.py
    read_answers): seconds for `rows` chat prompts with `tokens`-token answers, against one plain forward of
    each whole batch with all its logits (how it read them before). Medians of `rounds`, order alternated."""
    prompts = (read_prompts("neutral.txt") * rows)[:rows]
    contexts = [encode_prompt(steerer.tokenizer, p, steerer.chat_default) for p in prompts]
    answers = [torch.randint(100, 10_000, (tokens,), generator=torch.Generator().manual_seed(k)) for k in range(rows)]

    def read():
        read_answers(steerer, contexts, answers, rows, site=site)

    def plain():  # the whole batch with every position's logits, as read_answers ran it before
        ids, mask = steerer.left_padded([torch.cat([c, a]) for c, a in zip(contexts, answers)])
        with torch.inference_mode(), steerer.adapter.hooks({site: lambda rows: None}):
            steerer.model(input_ids=ids, attention_mask=mask, use_cache=False)

    ways = [("read_answers", read), ("plain", plain)]
    seconds = {name: [] for name, _ in ways}
    for r in range(rounds):
        for name, fn in ways if r % 2 == 0 else ways[::-1]:
            start = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) for name, v in seconds.items()}


def served_tokens_per_s(server: SteeringServer, bodies: list[dict], clients: int) -> tuple[float, list[str]]:
    """(completion tokens per second, the texts) of the requests sent by `clients` clients at once."""
    url = f"http://127.0.0.1:{server.server_address[1]}/v1/chat/completions"

    def send(body):
        request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as response:
            answer = json.loads(response.read())
        return answer["usage"]["completion_tokens"], answer["choices"][0]["message"]["content"]

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(send, bodies))
    return sum(n for n, _ in answers) / (time.perf_counter() - start), [text for _, text in answers]


def batching(steerer: Steerer, site: Site, prompts: list[str], tokens: int) -> dict:
    """Concurrent against one-at-a-time throughput of the server, each request with its own steering."""
    width = steerer.adapter.site(site).width
    for i in range(len(prompts)):
        direction = torch.randn(width, generator=torch.Generator().manual_seed(100 + i))
        layer = site.layer - i % 3
        SteeringVector(f"client{i}", site.kind, "add", "raw", {layer: direction * 4 / direction.norm()},
                       steerer.identity).save(steerer.run.vectors)
    # Chat requests: the instruct model answers the held-out prompts at length (as plain completions
    # most of them end at once), so the batch is not mostly rows that left after one token.
    bodies = [{"messages": [{"role": "user", "content": p}], "max_tokens": tokens, "temperature": 0,
               "steering": [f"client{i} scale={1 + i % 4}"]} for i, p in enumerate(prompts)]
    server = SteeringServer(steerer, "127.0.0.1", 0, max_tokens=tokens,
                            limits=ServerLimits(max_batch=len(prompts)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        served_tokens_per_s(server, bodies[:1], 1)  # warm-up
        alone, alone_texts = served_tokens_per_s(server, bodies, 1)
        together, together_texts = served_tokens_per_s(server, bodies, len(bodies))
    finally:
        server.shutdown()
        server.server_close()
    return dict(alone=alone, together=together, identical=alone_texts == together_texts, clients=len(bodies))


def burst(steerer: Steerer, clients: int, limits: ServerLimits) -> Counter:
    """How the server answers `clients` requests sent at once: a count per status, or per exception for a
    connection reset or dropped."""
    server = SteeringServer(steerer, "127.0.0.1", 0, max_tokens=16, limits=limits)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    body = json.dumps({"prompt": "The sea is", "max_tokens": 16, "temperature": 0})
    together = threading.Barrier(clients)

    def ask(_) -> int | str:
        together.wait()
        connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=600)
        try:
            connection.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
            return connection.getresponse().status
        except (OSError, http.client.HTTPException) as e:
            return type(e).__name__
        finally:
            connection.close()

    try:
        with ThreadPoolExecutor(clients) as pool:
            return Counter(pool.map(ask, range(clients)))
    finally:
        server.shutdown()
        server.server_close()


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
    parser.add_argument("--burst", type=int, default=400, help="clients at once in the load test")
    parser.add_argument("--read-rows", type=int, default=48, help="answers read back in one batch (steer_features.batch_size)")
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
        served = batching(steerer, site, prompts, args.tokens)
        bursts = {limit: burst(steerer, args.burst, ServerLimits(max_connections=limit)) for limit in (256, 32)}
        one_prompt = one_prompt_seconds(Path(tmp), args.model)
        reading = reading_seconds(steerer, site, args.read_rows, 32, args.rounds)
    median = {way: statistics.median(v) for way, v in rates.items()}
    rows = [[f"one `{way}` at {args.site} / none", f"{median[way]:,.1f} / {median['none']:,.1f} tok/s",
             f"**{median[way] / median['none']:.3f}**", ">= 0.95"] for way in ("add", "project")]
    rows.append([f"server: {served['clients']} clients at once, each its own steering / one at a time",
                 f"{served['together']:,.1f} / {served['alone']:,.1f} tok/s, outputs "
                 + ("identical" if served["identical"] else "**DIFFERENT**"),
                 f"**{served['together'] / served['alone']:.2f}**", ">= 2.5, identical"])
    for limit, answers in bursts.items():
        failures = {k: n for k, n in answers.items() if k not in (200, 429)}
        rows.append([f"server: a burst of {args.burst} clients at once (queue 8 + 64, {limit} connections)",
                     f"{answers[200]} answered 200, {answers[429]} 429, " + (
                         ", ".join(f"**{n} {k}**" for k, n in failures.items()) if failures else "none reset or dropped"),
                     "", "every one 200 or 429"])
    rows.append([f"make steer-features reading {args.read_rows} answers of 32 tokens back / one plain forward of them",
                 f"{reading['read_answers']:.2f} / {reading['plain']:.2f} s",
                 f"**{reading['read_answers'] / reading['plain']:.2f}**", "< 1"])
    rows.append(["one-prompt `python -m pipeline.steer` (imports, model load, 2 x 64 tokens)",
                 f"{one_prompt:.1f} s wall", "", "<= 30 s"])
    per_round = "; ".join(f"{way}: " + ", ".join(f"{x:,.1f}" for x in v) for way, v in rates.items())
    notes = (f"\nModel {args.model}, {len(prompts)} held-out prompts in one left-padded batch, {args.tokens} new tokens "
             f"each (greedy, end of turn suppressed so every way generates the same tokens count), KV cache on. "
             f"{args.rounds} rounds, order rotated each round, medians reported. Tokens/s per round: {per_round}. "
             f"Server: {served['clients']} HTTP clients, each steering with its own random `add` vector (one of 3 "
             f"layers, scale 1-4), greedy /v1/chat/completions of up to {args.tokens} tokens, against the same requests "
             "sent one after another to the same server; tokens/s counts completion tokens. "
             f"Load test: {args.burst} HTTP clients released together by a barrier, each its own connection and one "
             "greedy /v1/completions of 16 tokens, against the default limits and against max_connections=32. "
             f"Reading: {args.read_rows} neutral chat prompts with 32 random answer tokens each, read back for their "
             "log-probabilities and site rows in one batch, the contexts' shared start (the chat template's system "
             "prompt) run once and the LM head on answer positions only, against one forward of the whole batch "
             "with every position's logits. "
             f"Load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
             + (" (above the CPU count: other jobs shared the machine and the ratios are noise)" if os.getloadavg()[0] > os.cpu_count() else "")
             + ".\n")
    write_section("bench-steer", make_command("bench-steer", argv or sys.argv[1:]), table(["measure", "values", "ratio", "target"], rows) + "\n" + notes)


if __name__ == "__main__":
    main()
