"""Concurrent steered requests batched into shared forwards (steering/batching.py), over real HTTP."""

from __future__ import annotations

import http.client
import json
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from activations.errors import ConfigError
from activations.sites import Site
from conftest import SMOL_SITE, compose_config, live_feature, random_vector, serving, wait_for
from steering.batching import Row, Scheduler, Ticket, generate_batch
from steering.limits import ServerLimits
from steering.server import SteeringServer
from steering.steerer import Steerer, encode_prompt

MODEL = "smollm2_135m"
COUNTING = "1, 2, 3, 4, 5, 6,"  # goes on and on, with no end of turn


@pytest.fixture(scope="module")
def batching(smol_steerer):
    """A server that waits long enough for a test's concurrent requests to land in one batch: a batch of 8 (a
    test sends 8 at once) starts as soon as they are in; 500 ms once let 6 requests split 4 + 2 on a loaded CI."""
    with serving(SteeringServer(smol_steerer, "127.0.0.1", 0, max_tokens=400,
                                limits=ServerLimits(max_batch=8, batch_wait_ms=3000))) as server:
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


def post(server, body: dict) -> tuple[int, bytes]:
    """(status, body bytes) of a POST /v1/completions."""
    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=120)
    try:
        connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def events(stream: bytes) -> list:
    """The JSON events of a server-sent stream, and "[DONE]"."""
    datas = [line[len(b"data: "):] for line in stream.split(b"\n") if line.startswith(b"data: ")]
    return [data.decode() if data == b"[DONE]" else json.loads(data) for data in datas]


def test_a_failing_row_fails_alone_and_its_batch_generates_what_it_would_alone(batching, smol, forwards):
    """In one batch: greedy rows streamed and not, a row at temperature 1e-45 (its logits / temperature
    overflowed a float: torch.multinomial raised and failed the whole batch with 500s), and rows whose
    steering overflows the activations (NaN logits), streamed and not. The good rows generate exactly what
    they generate alone; the tiny temperature is greedy; the NaN rows alone fail, with a 400 or an error
    event, finish_reason "error" and [DONE]."""
    random_vector(smol, "overflowing", "resid_post", [2], 1e37)
    good = {"prompt": "The dog", "max_tokens": 6, "temperature": 0}
    alone = smol.generate("The dog", (), max_new_tokens=6, chat=False)[0].text
    tiny = {"prompt": "Hi", "max_tokens": 6, "temperature": 1e-45}
    bad = {**good, "steering": ["overflowing scale=1000"]}
    bodies = [good, {**good, "stream": True}, tiny, bad, {**bad, "stream": True}, good, good, good]  # max_batch
    forwards.clear()
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda body: post(batching, body), bodies))
    assert max(forwards) == len(bodies)  # one batch
    (s1, plain), (s2, streamed), (s3, greedy), (s4, failed), (s5, failed_stream), *again = answers
    assert (s1, s2, s3, s4, s5) == (200, 200, 200, 400, 200) and all(status == 200 for status, _ in again)
    assert {json.loads(text)["choices"][0]["text"] for text in [plain] + [t for _, t in again]} == {alone}
    assert "".join(e["choices"][0]["text"] for e in events(streamed)[:-1]) == alone
    assert json.loads(greedy)["choices"][0]["text"] == smol.generate("Hi", (), max_new_tokens=6, chat=False)[0].text
    assert "logits are not finite" in json.loads(failed)["error"]["message"]
    *_, error, finish, done = events(failed_stream)
    assert "logits are not finite" in error["error"]["message"]
    assert finish["choices"][0]["finish_reason"] == "error" and done == "[DONE]"


def test_a_row_whose_hook_raises_fails_alone(smol):
    def broken(rows):
        raise RuntimeError("a broken hook")

    ids = [encode_prompt(smol.tokenizer, prompt, False) for prompt in ("The dog", "The sea is", "Hi")]
    rows = [Row(ids[0], {}, 6), Row(ids[1], {Site.parse(SMOL_SITE): broken}, 6), Row(ids[2], {}, 6)]
    generate_batch(smol, rows)
    with pytest.raises(RuntimeError, match="a broken hook"):
        Ticket(rows[1]).result()
    assert [Ticket(rows[j]).result().tokens for j in (0, 2)] == [
        smol.generate(p, (), max_new_tokens=6, chat=False)[0].tokens for p in ("The dog", "Hi")]


def after_the_running_batch(server, smol) -> None:
    """Returns once the batch running now has ended: the scheduler's one thread starts the next batch, this
    one-token row, only then."""
    probe = Row(encode_prompt(smol.tokenizer, "Hi", False), {}, max_new_tokens=1)
    server.scheduler.submit(probe).result()


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_frees_its_row(batching, smol, forwards, stream):
    body = json.dumps({"prompt": COUNTING, "max_tokens": 400, "temperature": 0, "stream": stream}).encode()
    generating = threading.Event()
    handle = smol.model.register_forward_hook(lambda *_: generating.set())
    try:
        with socket.create_connection(batching.server_address[:2], timeout=30) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body)
            assert generating.wait(30)  # its row is in a running batch when the client leaves
    finally:
        handle.remove()
    after_the_running_batch(batching, smol)
    assert 0 < len(forwards) - 1 < 200  # it stopped long before its 400 tokens (the probe's forward aside)


def test_requests_over_the_queue_limit_get_a_429(smol):
    """One request generating, one waiting (max_waiting=1): the next is refused at once, and once the queue
    has room again a request is taken. Each step waits for the server's state, not for time to pass."""
    limits = ServerLimits(max_batch=1, batch_wait_ms=0, max_waiting=1)
    with serving(SteeringServer(smol, "127.0.0.1", 0, max_tokens=400, limits=limits)) as server:
        client, release = client_of(server), threading.Event()
        hold = smol.model.register_forward_pre_hook(lambda *_: release.wait(30) and None)  # the batch waits for us

        def ask(_):
            try:
                client.completions.create(model=MODEL, prompt=COUNTING, max_tokens=2, temperature=0)
                return 200
            except openai.RateLimitError as e:
                assert "max_waiting" in str(e)
                return 429

        try:
            with ThreadPoolExecutor(2) as pool:
                running = pool.submit(ask, 0)
                wait_for(lambda: server.scheduler.waiting.empty() and smol.lock.locked())  # taken, generating
                waiting = pool.submit(ask, 1)
                wait_for(server.scheduler.waiting.full)
                assert ask(2) == 429
                release.set()
                assert (running.result(), waiting.result()) == (200, 200)
        finally:
            release.set()
            hold.remove()
        assert ask(3) == 200


def test_batching_limits_must_make_sense(smol):
    with pytest.raises(ConfigError, match="max_batch >= 1"):
        Scheduler(smol, max_batch=0)


def test_deepseek_v4_rows_generate_through_the_models_own_cache(tmp_path):
    """DeepSeek-V4 caches compressed attention state per layer: the batch builds the cache the model needs, and
    a row that finishes early takes its part of that state with it."""
    steerer = Steerer(tmp_path / "run", compose_config("steer", ["model=tiny_deepseek_v4"]).model)
    prompt = "Tell me about the sea."
    alone = steerer.generate(prompt, (), max_new_tokens=8, chat=False)[0].tokens
    ids = encode_prompt(steerer.tokenizer, prompt, False)
    rows = [Row(ids, {}, 8), Row(ids, {}, 3), Row(ids, {}, 8)]  # no padding: exact
    generate_batch(steerer, rows)  # the second row leaves after 3 tokens: its state leaves every cache with it
    assert [Ticket(row).result().tokens for row in rows] == [alone, alone[:3], alone]


def test_a_sampled_row_draws_from_its_own_seed_whatever_shares_its_batch(smol):
    ids = encode_prompt(smol.tokenizer, "Once upon a time", False)

    def sampled(*seeds):
        rows = [Row(ids, {}, 8, temperature=1.0, top_p=0.9, seed=seed) for seed in seeds]
        generate_batch(smol, rows)
        return [Ticket(row).result().tokens for row in rows]

    alone = sampled(7)[0]
    together = sampled(7, 8, 7)
    assert together[0] == together[2] == alone and together[1] != alone
