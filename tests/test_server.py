"""The steering server over real HTTP on 127.0.0.1, driven by the standard `openai` client."""

from __future__ import annotations

import json
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from steering.server import SteeringServer
from pipeline.config import ServeConfig
from conftest import SMOL_SITE, live_feature, random_vector

MESSAGES = [{"role": "user", "content": "Tell me about the sea."}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="unused", max_retries=0)


def chat(client, steering=None, **kwargs):
    args = dict(model="smollm2_135m", messages=MESSAGES, max_tokens=8, temperature=0)
    args.update(kwargs)
    return client.chat.completions.create(**args, extra_body={"steering": steering} if steering else None)


def test_binds_loopback_by_default(server):
    assert ServeConfig().host == "127.0.0.1" and server.server_address[0] == "127.0.0.1"


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == ["smollm2_135m"]


def test_chat_completion_is_steered_per_request(client, smol):
    feature = f"{SMOL_SITE}/{live_feature(smol, SMOL_SITE)}"
    plain = chat(client)
    steered = chat(client, [{"feature": feature, "scale": 6}])
    by_vector = chat(client, ["served scale=1"])
    assert plain.choices[0].message.content == smol.generate(MESSAGES, (), max_new_tokens=8)[0].text
    assert steered.choices[0].message.content != plain.choices[0].message.content
    assert by_vector.choices[0].message.content != plain.choices[0].message.content
    assert plain.usage.completion_tokens == 8 and plain.choices[0].finish_reason == "length"
    assert chat(client).choices[0].message.content == plain.choices[0].message.content  # nothing lingers


def test_streaming_sends_the_same_text_in_pieces(client):
    steering = ["served scale=1"]
    whole = chat(client, steering).choices[0].message.content
    chunks = list(chat(client, steering, stream=True))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert len(pieces) > 1 and "".join(pieces) == whole
    assert chunks[-1].choices[0].finish_reason == "length"

    prompt = "The sea is"
    text = client.completions.create(model="m", prompt=prompt, max_tokens=8, temperature=0).choices[0].text
    streamed = client.completions.create(model="m", prompt=prompt, max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text and text


def test_stop_strings_end_the_answer_before_them(client):
    text = chat(client, max_tokens=16).choices[0].message.content
    word = text.split()[2]
    stopped = chat(client, max_tokens=16, stop=[word])
    assert stopped.choices[0].message.content == text[: text.index(word)]
    assert stopped.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in chat(client, max_tokens=16, stop=[word], stream=True))
    assert streamed == text[: text.index(word)]


def test_concurrent_requests_keep_their_own_steering(client, smol):
    feature = f"{SMOL_SITE}/{live_feature(smol, SMOL_SITE)}"
    requests = {"a": [{"feature": feature, "scale": 6}], "b": ["served scale=-1"], "none": None}
    alone = {k: chat(client, s).choices[0].message.content for k, s in requests.items()}
    assert len(set(alone.values())) == 3  # each steering changes the answer, so a leak would show
    with ThreadPoolExecutor(6) as pool:
        futures = {(k, i): pool.submit(chat, client, s) for i in range(2) for k, s in requests.items()}
        together = {key: f.result().choices[0].message.content for key, f in futures.items()}
    assert all(together[(k, i)] == alone[k] for k, i in together)


@pytest.mark.parametrize("steering, words", [
    ([{"feature": f"{SMOL_SITE}/99999", "scale": 1}], "unknown feature"),
    ([{"feature": f"{SMOL_SITE}/1", "scale": "loud"}], "bad scale"),
    ([{"feature": "L3.resid_post", "scale": 1}], "bad feature ID"),
    (["nosuch"], "no vector named 'nosuch'"),
    ({"feature": f"{SMOL_SITE}/1"}, "steering must be a list"),
])
def test_bad_steering_is_a_400_and_the_server_keeps_serving(client, steering, words):
    with pytest.raises(openai.BadRequestError, match=words):
        chat(client, steering)
    assert chat(client).choices[0].message.content


@pytest.mark.parametrize("body, words", [
    ({"messages": []}, "messages must be a non-empty list"),
    ({"messages": MESSAGES, "max_tokens": 10_000}, "max_tokens must be an integer from 1 to 16"),
    ({"messages": MESSAGES, "temperature": -1}, "temperature must be a number"),
    ({"messages": MESSAGES, "n": 2}, "n must be 1"),
])
def test_bad_requests_over_plain_http(server, body, words):
    request = urllib.request.Request(f"http://127.0.0.1:{server.server_address[1]}/v1/chat/completions",
                                     json.dumps(body).encode(), {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=60)
    assert error.value.code == 400 and words in json.loads(error.value.read())["error"]["message"]
    not_json = urllib.request.Request(request.full_url, b"{oops", {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError, match="400"):
        urllib.request.urlopen(not_json, timeout=60)
