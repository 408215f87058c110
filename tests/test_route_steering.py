"""Steering experts (`op=route`) on the tiny random DeepSeek-V4: force, off, bias, its composition
with feature interventions, the one-line refusals, the CLI, the server and the native export."""

import json
import math
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import live_feature, run_stage
from activations.store.format import router_key
from steering.batching import Row, Scheduler
from steering.interventions import SteeringError
from steering.routing import export_routes, parse_route
from steering.server import SteeringServer
from steering.steerer import encode_prompt

PROMPT = "In the beginning God created the heaven and the earth. And the earth was without form"


def routed(steerer, layer: int, interventions=()) -> tuple[np.ndarray, torch.Tensor]:
    """(expert ids [tokens, top_k] chosen at `layer`, final logits) of one forward over PROMPT."""
    ids = torch.tensor(steerer.tokenizer(PROMPT).input_ids)[None]
    chosen = {}

    def keep(module, args, output):
        chosen["ids"] = output[2].clone()

    with torch.inference_mode(), steerer.steering(list(interventions)):
        handle = steerer.adapter.gate(layer).register_forward_hook(keep)  # after the steering's: sees its choice
        try:
            logits = steerer.model(input_ids=ids, use_cache=False).logits
        finally:
            handle.remove()
    return chosen["ids"].numpy(), logits


def rate(ids: np.ndarray, expert: int) -> float:
    """Share of tokens whose chosen experts include `expert`."""
    return float((ids == expert).any(axis=1).mean())


def test_force_selects_the_expert_on_every_token_and_changes_the_output(tiny):
    plain_ids, plain = routed(tiny, 2)
    expert = int(np.bincount(plain_ids.ravel(), minlength=8).argmin())  # the least chosen unsteered
    assert rate(plain_ids, expert) < 0.5
    forced_ids, forced = routed(tiny, 2, [f"route L2/E{expert} force"])
    assert rate(forced_ids, expert) == 1.0
    assert not torch.allclose(forced, plain)
    off_ids, _ = routed(tiny, 2, [{"op": "route", "expert": f"L2/E{plain_ids[0, 0]}", "mode": "off"}])
    assert rate(off_ids, int(plain_ids[0, 0])) == 0.0


def test_bias_zero_is_the_unsteered_model_and_a_bias_moves_the_choice(tiny):
    plain_ids, plain = routed(tiny, 1)
    zero_ids, zero = routed(tiny, 1, ["route L1/E3 bias=0"])
    np.testing.assert_array_equal(zero_ids, plain_ids)
    assert torch.equal(zero, plain)
    up, _ = routed(tiny, 1, ["route L1/E3 bias=+0.5"])
    down, _ = routed(tiny, 1, ["route L1/E3 bias=-0.5"])
    assert rate(down, 3) < rate(plain_ids, 3) < rate(up, 3)


def test_routes_capture_as_the_store_reads_them(tiny):
    """Harvest's capture sees the steered choice: the router arrays a steered run would store."""
    ids = torch.tensor(tiny.tokenizer(PROMPT).input_ids)[None]
    with tiny.steering(["route L2/E6 force"]):
        captured = tiny.adapter.capture(["L2.ffn_out"], ids, routes=[2])
    assert (captured[router_key(2, "ids")] == 6).any(dim=1).all()


def test_routes_compose_with_feature_interventions(tiny):
    feature = f"L1.resid_post/{live_feature(tiny, 'L1.resid_post')}"
    feature_ids, with_feature = routed(tiny, 2, [f"{feature} scale=4"])
    expert = int(np.bincount(feature_ids.ravel(), minlength=8).argmin())
    both_ids, both = routed(tiny, 2, [f"{feature} scale=4", f"route L2/E{expert} force"])
    assert rate(feature_ids, expert) < 0.5 and rate(both_ids, expert) == 1.0
    assert not torch.allclose(both, with_feature)


@pytest.mark.parametrize("route, message", [
    ("route L0/E1 force", "fixed token-id hash"),
    ("route L2/E9 force", "unknown expert 9"),
    ("route L2/37", "write L<layer>/E<expert>"),
    ("route L2/E1", "needs one of bias"),
    ("route L2/E1 bias=inf", "finite number"),
])
def test_bad_routes_are_one_line_errors(tiny, route, message):
    with pytest.raises(SteeringError, match=message) as err:
        tiny.resolve([route])
    assert "\n" not in str(err.value)


def test_forcing_more_experts_than_top_k_is_refused(tiny):
    with pytest.raises(SteeringError, match="force at most top_k=2"):
        tiny.resolve(["route L2/E1 force", "route L2/E2 force", "route L2/E3 force"])


def test_native_export_is_a_layer_by_expert_bias_table(tiny, tmp_path):
    routes = ["route L2/E5 bias=+2", "route L2/E5 bias=0.5", "route L3/E1 off", "route L1/E0 force"]
    paths = export_routes(tiny.adapter, tiny.identity, routes, "mix", tmp_path)
    bias = load_file(str(paths[0]))["bias"]
    assert bias.shape == (4, 8)
    assert bias[2, 5] == 2.5 and bias[3, 1] == -math.inf and bias[1, 0] == math.inf
    assert int((bias != 0).sum()) == 3
    sidecar = json.loads(paths[1].read_text())
    assert sidecar["format"] == "dialbox-expert-bias-v1" and sidecar["layers"] == [1, 2, 3]
    assert sidecar["routes"][0] == str(parse_route(routes[0])) == "route L2/E5 bias=+2"


@pytest.mark.slow
def test_cli_steers_and_exports_routes(tiny_run):
    runs = f"run.runs_dir={tiny_run.parent}"
    out = run_stage("pipeline.steer", runs, "steer.prompt=Hello", "steer.max_new_tokens=4",
                    'steer.interventions=["route L2/E6 force"]').stdout
    assert "steered: route L2/E6 force" in out
    out = run_stage("pipeline.steer", "export", runs, 'export.routes=["route L2/E6 bias=1.5"]').stdout
    assert "routes.experts.safetensors" in out
    bad = run_stage("pipeline.steer", runs, "steer.prompt=Hello", 'steer.interventions=["route L0/E1 force"]',
                    check=False)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "token-id hash" in bad.stderr


def chat(port: int, steering) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(
        {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0, "steering": steering}).encode(),
        {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_the_server_steers_experts_and_refuses_a_hash_layer(tiny):
    server = SteeringServer(tiny, "127.0.0.1", 0, max_tokens=4)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        status, body = chat(port, [{"op": "route", "expert": "L2/E6", "mode": "force"}])
        # the batch loop applies the route as the Python API does, and it changes this answer
        messages = [{"role": "user", "content": "Hi"}]
        forced = tiny.generate(messages, ["route L2/E6 force"], max_new_tokens=4)[0].text
        assert forced != tiny.generate(messages, [], max_new_tokens=4)[0].text
        assert status == 200 and body["choices"][0]["message"]["content"] == forced
        status, body = chat(port, ["route L0/E1 force"])
        assert status == 400 and "token-id hash" in body["error"]["message"]
    finally:
        server.shutdown()
        server.server_close()


def test_a_routed_request_is_batched_alone_so_its_route_touches_no_other_row(tiny):
    """Routes act on the router for every row of a forward: the scheduler runs a routed row in a batch
    of its own, and the rows submitted with it generate what they would alone."""
    prompt, force = "Tell me about the sea.", ["route L2/E6 force"]
    ids = encode_prompt(tiny.tokenizer, prompt, False)
    want = {"plain": tiny.generate(prompt, (), max_new_tokens=6, chat=False)[0].tokens,
            "forced": tiny.generate(prompt, force, max_new_tokens=6, chat=False)[0].tokens}
    assert want["plain"] != want["forced"]
    scheduler = Scheduler(tiny, max_batch=4, wait_s=0.5)
    tickets = [scheduler.submit(Row(ids, {}, 6)), scheduler.submit(Row(ids, tiny.hooks(force), 6, routes=force)),
               scheduler.submit(Row(ids, {}, 6))]
    assert [t.result().tokens for t in tickets] == [want["plain"], want["forced"], want["plain"]]
