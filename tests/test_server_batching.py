"""Concurrent steered requests batched into shared forwards (steering/batching.py), over real HTTP."""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from activations.errors import ConfigError
from conftest import SMOL_SITE, compose_config, live_feature, random_vector, serving
from steering.batching import Row, Scheduler, Ticket, generate_batch
from steering.limits import ServerLimits
from steering.server import SteeringServer
from steering.steerer import Steerer, encode_prompt

MODEL = "smollm2_135m"
COUNTING = "1, 2, 3, 4, 5, 6,"  # goes on and on, with no end of turn


@pytest.fixture(scope="module")
def batching(smol):
    """A server that waits long enough for a test's concurrent requests to land in one batch."""
    with serving(SteeringServer(smol, "127.0.0.1", 0, max_tokens=400,
                                limits=ServerLimits(max_batch=8, batch_wait_ms=500))) as server:
        yield server


@pytest.fixture
def forwards(smol):
    """The batch size of every model forward while the test runs."""
    sizes = []
    handle = smol.model.register_forward_pre_hook(lambda module, args, kwargs: sizes.append(kwargs["input_ids"].shape[0]),
                                                  with_kwargs=True)
    yield sizes
    handle.remove()


def client_of(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="unused", max_retries=0)


def test_eight_differently_steered_requests_share_forwards_and_each_generates_what_it_would_alone(
        batching, smol, forwards):
    feature = f"{SMOL_SITE}/{live_feature(smol, SMOL_SITE)}"
    random_vector(smol, "batched", "resid_post", [2, 4], 40.0)
    random_vector(smol, "batched-project", "resid_post", [5], 1.0, op="project")
    steerings = [[], [f"{feature} scale=6"], [f"{feature} op=clamp scale=3"], ["batched scale=1"],
                 ["batched scale=-1"], [f"batched layers=4 scale=1 when={feature}>0.5"], ["batched-project scale=-9"],
                 ["batched scale=0.5", f"{feature} scale=-4 positions=generated"]]
    prompts = ["Tell me about the sea.", "Hi", "Write a sentence about the moon and the stars, please.",
               "Name three colours.", "What is 2+2?", "Describe a cat.", "Why is the sky blue?", "Say hello."]
    alone = [smol.generate(p, s, max_new_tokens=12, chat=False)[0].text for p, s in zip(prompts, steerings)]
    assert len(set(alone)) == len(alone)  # each steering is visible, so a leak between rows would show
    client = client_of(batching)

    def ask(i):
        args = dict(model=MODEL, prompt=prompts[i], max_tokens=12, temperature=0, extra_body={"steering": steerings[i]})
        if i % 2:  # stream and non-stream rows in the same batch
            return "".join(c.choices[0].text for c in client.completions.create(**args, stream=True))
        return client.completions.create(**args).choices[0].text

    forwards.clear()
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, range(8)))
    assert together == alone
    assert max(forwards) == 8 and len(forwards) <= 2 * 12  # one batch, not 8 x 12 forwards


def wait_until_idle(forwards, quiet_s: float = 1.0, within_s: float = 20.0) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        seen = len(forwards)
        time.sleep(quiet_s)
        if len(forwards) == seen:
            return
    raise AssertionError("the model kept running after every client left")


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_frees_its_row(batching, forwards, stream):
    body = json.dumps({"prompt": COUNTING, "max_tokens": 400, "temperature": 0, "stream": stream}).encode()
    with socket.create_connection(batching.server_address[:2], timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        if stream:
            assert any(line.startswith(b"data:") for line in sock.makefile("rb"))
        time.sleep(1.5)  # the batch's wait, then some tokens
    wait_until_idle(forwards)
    assert 0 < len(forwards) < 200  # it stopped long before its 400 tokens


def test_requests_over_the_queue_limit_get_a_429(smol):
    limits = ServerLimits(max_batch=1, batch_wait_ms=0, max_waiting=1, max_generation_seconds=3)
    with serving(SteeringServer(smol, "127.0.0.1", 0, max_tokens=400, limits=limits)) as server:
        client = client_of(server)

        def ask(_):
            try:
                client.completions.create(model=MODEL, prompt=COUNTING, max_tokens=400, temperature=0)
                return 200
            except openai.RateLimitError as e:
                assert "max_waiting" in str(e)
                return 429

        with ThreadPoolExecutor(4) as pool:
            statuses = list(pool.map(ask, range(4)))
    assert 429 in statuses and 200 in statuses


def test_batching_limits_must_make_sense(smol):
    with pytest.raises(ConfigError, match="max_batch >= 1"):
        Scheduler(smol, max_batch=0)


def test_deepseek_v4_rows_generate_through_the_models_own_cache(tmp_path):
    """DeepSeek-V4 caches compressed attention state per layer: the batch builds the cache the model needs."""
    steerer = Steerer(tmp_path / "run", compose_config("steer", ["model=tiny_deepseek_v4"]).model)
    prompt = "Tell me about the sea."
    alone = steerer.generate(prompt, (), max_new_tokens=8, chat=False)[0].tokens
    rows = [Row(encode_prompt(steerer.tokenizer, prompt, False), {}, 8) for _ in range(2)]  # no padding: exact
    generate_batch(steerer, rows)
    assert [Ticket(row).result().tokens for row in rows] == [alone, alone]


def test_a_sampled_row_draws_from_its_own_seed_whatever_shares_its_batch(smol):
    ids = encode_prompt(smol.tokenizer, "Once upon a time", False)

    def sampled(*seeds):
        rows = [Row(ids, {}, 8, temperature=1.0, top_p=0.9, seed=seed) for seed in seeds]
        generate_batch(smol, rows)
        return [Ticket(row).result().tokens for row in rows]

    alone = sampled(7)[0]
    together = sampled(7, 8, 7)
    assert together[0] == together[2] == alone and together[1] != alone
