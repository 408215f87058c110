"""An OpenAI-compatible HTTP server whose requests can steer: `make serve`.

    GET  /v1/models
    POST /v1/chat/completions   {"messages": [...], "steering": [{"feature": "L15.resid_post/1234", "scale": 4}]}
    POST /v1/completions        {"prompt": "...", "steering": ["terse layers=[12] scale=2"], "stream": true}

Any OpenAI client sends `steering` as an extra body field (`extra_body={"steering": [...]}` in the
Python client). Interventions are those of features.steering: feature IDs or vector names with op,
scale, units, positions and layers. llama.cpp and ds4 fix their vectors at start-up; here
`serve.steering` sets such fixed ones and each request adds its own.

Requests are handled on threads but generate one at a time (the Steerer's lock): hooks belong to
the model, so serialising is what keeps one request's steering out of another's. Bad input is a 400
with a message naming the problem, checked before anything is generated.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
import traceback
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from transformers.generation.streamers import BaseStreamer

from steering.steerer import BAD_INPUT, Steerer


class BadRequest(ValueError):
    """A request the server refuses with a 400."""


class SteeringServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, steerer: Steerer, host: str = "127.0.0.1", port: int = 8000, max_tokens: int = 256,
                 steering: list | None = None):
        self.steerer, self.max_tokens = steerer, max_tokens
        self.fixed_steering = list(steering or [])
        steerer.resolve(self.fixed_steering)  # a bad start-up vector fails now, not on the first request
        self.model_name = steerer.identity["model"]
        super().__init__((host, port), Handler)


def parse_request(body: dict, chat: bool, server: SteeringServer) -> dict:
    """The generate() arguments of a request body, or BadRequest."""
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("messages must be a non-empty list of {role, content}")
        prompt = [{"role": m.get("role"), "content": message_text(m)} for m in messages if isinstance(m, dict)]
        if len(prompt) != len(messages) or any(m["role"] not in ("system", "user", "assistant") for m in prompt):
            raise BadRequest("each message needs a role (system, user or assistant) and a content")
        if not server.steerer.chat_default:
            raise BadRequest("this model has no chat template: use /v1/completions")
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise BadRequest("prompt must be a string (one prompt per request)")
    if body.get("n", 1) != 1:
        raise BadRequest("n must be 1: send one request per completion")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens")) or server.max_tokens
    if not isinstance(max_tokens, int) or not 1 <= max_tokens <= server.max_tokens:
        raise BadRequest(f"max_tokens must be an integer from 1 to {server.max_tokens} (serve.max_tokens)")
    temperature, top_p = number(body, "temperature", 1.0, 0, 2), number(body, "top_p", 1.0, 0, 1)
    if top_p == 0:
        raise BadRequest("top_p must be above 0")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest("stop must be a string or a list of non-empty strings")
    steering = body.get("steering") or []
    if not isinstance(steering, list):
        raise BadRequest("steering must be a list of interventions, e.g. [{\"feature\": \"L15.resid_post/1234\", \"scale\": 4}]")
    steering = server.fixed_steering + steering
    try:
        server.steerer.resolve(steering)
    except BAD_INPUT as e:
        raise BadRequest(f"steering: {e}") from None
    seed = body.get("seed")
    if seed is not None and not isinstance(seed, int):
        raise BadRequest("seed must be an integer")
    return dict(prompts=prompt, interventions=steering, max_new_tokens=max_tokens, temperature=temperature,
                top_p=top_p, stop=stop, chat=chat, seed=seed if seed is not None else random.randrange(2**31))


def message_text(message: dict) -> str:
    content = message.get("content")
    if isinstance(content, list):  # content parts: only text is understood
        if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            raise BadRequest("only text content parts are supported")
        return "".join(p.get("text", "") for p in content)
    if not isinstance(content, str):
        raise BadRequest("message content must be a string or a list of text parts")
    return content


def number(body: dict, key: str, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not low <= value <= high:
        raise BadRequest(f"{key} must be a number from {low} to {high}")
    return float(value)


class TextDeltas(BaseStreamer):
    """Calls emit(text) with each new piece of decoded text as generate produces tokens.

    Text that could be the start of a stop string is held back until it is clear it is not, and
    nothing from a stop string on is ever sent.
    """

    def __init__(self, tokenizer, eos_ids: list[int], stop: list[str], emit):
        self.tokenizer, self.eos_ids, self.stop, self.emit = tokenizer, set(eos_ids), stop, emit
        self.tokens, self.sent, self.prompt_seen, self.stopped = [], 0, False, False

    def put(self, value):
        if not self.prompt_seen:  # generate hands over the prompt first
            self.prompt_seen = True
            return
        self.tokens += [t for t in value.flatten().tolist() if t not in self.eos_ids]
        self._flush(final=False)

    def end(self):
        self._flush(final=True)

    def _flush(self, final: bool):
        if self.stopped:
            return
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd") and not final:  # half of a multi-byte character
            return
        cut = min((text.index(s) for s in self.stop if s in text), default=None)
        if cut is not None:
            text, self.stopped = text[:cut], True
        elif not final and self.stop:
            text = text[: max(self.sent, len(text) - max(map(len, self.stop)) + 1)]
        if len(text) > self.sent:
            self.emit(text[self.sent:])
            self.sent = len(text)


class Handler(BaseHTTPRequestHandler):
    server: SteeringServer
    headers_sent = False  # once a stream has started, an error can no longer become a status code

    def log_message(self, format, *args):  # one line per request on stderr, as http.server does, but terser
        sys.stderr.write(f"serve: {self.address_string()} {format % args}\n")

    def do_GET(self):
        if self.path.rstrip("/") in ("/v1/models", "/models"):
            self.send_json(200, {"object": "list", "data": [
                {"id": self.server.model_name, "object": "model", "created": 0, "owned_by": "dialbox"}]})
        else:
            self.send_error_json(404, f"no route GET {self.path}: use /v1/models")

    def do_POST(self):
        routes = {"/v1/chat/completions": True, "/chat/completions": True, "/v1/completions": False, "/completions": False}
        chat = routes.get(self.path.rstrip("/"))
        if chat is None:
            return self.send_error_json(404, f"no route POST {self.path}: use /v1/chat/completions or /v1/completions")
        try:
            body = self.read_json()
            request = parse_request(body, chat, self.server)
            stream = bool(body.get("stream", False))
        except BadRequest as e:
            return self.send_error_json(400, str(e))
        try:
            if stream:
                self.stream(request, chat)
            else:
                result = self.server.steerer.generate(**request)[0]
                self.send_json(200, self.completion(result, chat))
        except Exception as e:  # the server keeps serving; the client learns what went wrong
            traceback.print_exc()
            if not self.headers_sent:
                self.send_error_json(500, f"generation failed: {e}", "server_error")

    def read_json(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(length) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise BadRequest("the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        return body

    def completion(self, result, chat: bool) -> dict:
        choice = {"index": 0, "finish_reason": result.finish_reason, "logprobs": None}
        choice.update({"message": {"role": "assistant", "content": result.text}} if chat else {"text": result.text})
        return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "object": "chat.completion" if chat else "text_completion", "model": self.server.model_name,
                "choices": [choice], "usage": {"prompt_tokens": result.prompt_tokens,
                                               "completion_tokens": len(result.tokens),
                                               "total_tokens": result.prompt_tokens + len(result.tokens)}}

    def stream(self, request: dict, chat: bool):
        """Server-sent events: one chunk per piece of text, then the finish reason, then [DONE]."""
        ident, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())

        def chunk(text: str | None, finish: str | None = None, first: bool = False):
            if chat:
                delta = ({"role": "assistant"} if first else {}) | ({"content": text} if text is not None else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            event = {"id": ident, "created": created, "model": self.server.model_name, "choices": [choice],
                     "object": "chat.completion.chunk" if chat else "text_completion"}
            self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
            self.wfile.flush()

        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        self.headers_sent = True
        chunk("" if chat else None, first=True)
        steerer = self.server.steerer
        streamer = TextDeltas(steerer.tokenizer, steerer.eos_ids, request["stop"], chunk)
        result = steerer.generate(**request, streamer=streamer)[0]
        chunk(None, result.finish_reason)
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def send_json(self, status: int, payload: dict):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.headers_sent = True

    def send_error_json(self, status: int, message: str, kind: str = "invalid_request_error"):
        self.send_json(status, {"error": {"message": message, "type": kind, "param": None, "code": None}})
