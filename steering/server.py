"""An OpenAI-compatible HTTP server whose requests can steer: `make serve`.

    GET  /v1/models
    POST /v1/chat/completions   {"messages": [...], "steering": [{"feature": "L15.resid_post/1234", "scale": 4}]}
    POST /v1/completions        {"prompt": "...", "steering": ["terse layers=[12] scale=2"], "stream": true}

Any OpenAI client sends `steering` as an extra body field (`extra_body={"steering": [...]}` in the
Python client). Interventions are those of steering/interventions.py: feature IDs or vector names
with op, scale, units, positions and layers. llama.cpp and ds4 fix their vectors at start-up; here
`serve.steering` sets such fixed ones and each request adds its own.

Requests are handled on threads and generate together: the scheduler (steering/batching.py) runs
the requests that arrive within `serve.limits.batch_wait_ms` of each other as one batch of at most
`serve.limits.max_batch` rows, each row steered by its own interventions, greedy rows generating
exactly what they would alone. A client that disconnects frees its row; with `max_waiting` requests
already queued, the next is refused with a 429. Whatever one request costs, the rows beside it wait
for, so `ServerLimits` (steering/limits.py, `serve.limits`) bounds each way a request can cost: its
body, its JSON, its prompt, stop list, steering and time.

Every refusal and failure is answered as JSON in OpenAI's error shape,
{"error": {"message", "type", "param", "code"}}, checked before anything is generated; messages name
the run's directory as <run>, never by its absolute path, and tracebacks stay in the server's log. A
row that fails while generating (its steering drove the model's numbers out of range, say) fails
alone: it is answered with an error, or its stream ends with an error event, a finish_reason of
"error" and [DONE], while the rows beside it generate what they would have alone.

The server answers only to its own Host names and same-origin browsers, bounds the time to read
headers and the connections it holds (features/local_http.py), and takes only JSON bodies
(Content-Type: application/json), so no web page can post to it with a "simple" form request.
"""

from __future__ import annotations

import json
import random
import select
import socket
import sys
import time
import traceback
import uuid
from http import HTTPStatus

from features.local_http import LocalHandler, LocalServer
from steering.batching import Busy, Row, Scheduler
from steering.interventions import finite_number
from steering.limits import ServerLimits
from steering.routing import is_route
from steering.steerer import BAD_INPUT, Generation, Steerer, encode_prompt

ROUTES = {"/v1/chat/completions": True, "/chat/completions": True, "/v1/completions": False, "/completions": False}
SEEDS = range(-2**63, 2**63)  # OpenAI's seed is a 64-bit integer, and torch takes all of them


class ApiError(Exception):
    """A request the server refuses (or fails), answered with this status in OpenAI's error shape."""

    def __init__(self, status: int, message: str, code: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.code, self.kind = status, code, kind


class BadRequest(ApiError):
    """A request the server refuses with a 400."""

    def __init__(self, message: str):
        super().__init__(400, message, "invalid_request")


def api_error(e: Exception) -> ApiError:
    """What a client is told of an exception: an ApiError as it is; anything else is a bug, whose
    traceback goes to the server's log and whose one line goes to the client."""
    if isinstance(e, ApiError):
        return e
    traceback.print_exception(e)
    return ApiError(500, f"the server failed: {type(e).__name__}: {e}", "server_error", "server_error")


class SteeringServer(LocalServer):
    """allowed_hosts: Host names to answer to beyond the loopback ones and `host` (a reverse proxy's)."""

    def __init__(self, steerer: Steerer, host: str = "127.0.0.1", port: int = 8000, max_tokens: int = 256,
                 steering: list | None = None, limits: ServerLimits | None = None, handler=None,
                 allowed_hosts=()):
        self.steerer, self.max_tokens, self.limits = steerer, max_tokens, limits or ServerLimits()
        self.fixed_steering = list(steering or [])
        # A bad start-up vector fails now, not on the first request.
        steerer.resolve(self.fixed_steering, self.limits.max_scale)
        self.model_name = steerer.identity["model"]
        limits = self.limits
        self.scheduler = Scheduler(steerer, limits.max_batch, limits.batch_wait_ms / 1000, limits.max_waiting)
        super().__init__((host, port), handler or Handler, allowed_hosts, limits.max_connections,
                         limits.max_client_connections, limits.header_seconds)  # handler: a Handler subclass (browse.py)

    def public(self, text: str) -> str:
        """Text fit for a client: the run's directory shown as <run>, since the server's paths are its own."""
        root = self.steerer.run.root
        for path in sorted({str(root.resolve()), str(root)}, key=len, reverse=True):
            text = text.replace(path, "<run>")
        return text


def parse_request(body: dict, chat: bool, server: SteeringServer) -> Row:
    """The batch row of a request body, or an ApiError saying what to change."""
    check_model(body, server.model_name)
    prompt = chat_prompt(body, server) if chat else text_prompt(body)
    if body.get("n", 1) != 1:
        raise BadRequest("n must be 1: send one request per completion")
    max_tokens = max_tokens_of(body, server.max_tokens)
    check_prompt_length(prompt, chat, max_tokens, server)
    temperature, top_p = number(body, "temperature", 1.0, 0, 2), number(body, "top_p", 1.0, 0, 1)
    if top_p == 0:
        raise BadRequest("top_p must be above 0")
    steering = steering_of(body, server)
    return Row(encode_prompt(server.steerer.tokenizer, prompt, chat), hooks_of(steering, server), max_tokens,
               temperature, top_p, seed_of(body), stop_of(body, server.limits), server.limits.max_generation_seconds,
               routes=[spec for spec in steering if is_route(spec)])


def check_model(body: dict, served: str) -> None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest("model must be a string")
    if model not in (None, served):  # OpenAI's answer to a model it does not have
        raise ApiError(404, f"the model {model!r} does not exist: this server serves {served!r}", "model_not_found")


def chat_prompt(body: dict, server: SteeringServer) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list of {role, content}")
    prompt = [{"role": m.get("role"), "content": message_text(m)} for m in messages if isinstance(m, dict)]
    if len(prompt) != len(messages) or any(m["role"] not in ("system", "user", "assistant") for m in prompt):
        raise BadRequest("each message needs a role (system, user or assistant) and a content")
    if not server.steerer.chat_default:
        raise BadRequest("this model has no chat template: use /v1/completions")
    return prompt


def text_prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise BadRequest("prompt must be a string (one prompt per request)")
    return prompt


def max_tokens_of(body: dict, ceiling: int) -> int:
    value = body.get("max_completion_tokens", body.get("max_tokens"))
    if value is None:
        return ceiling
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= ceiling:
        raise BadRequest(f"max_tokens must be an integer from 1 to {ceiling} (serve.max_tokens)")
    return value


def check_prompt_length(prompt, chat: bool, max_tokens: int, server: SteeringServer) -> None:
    """A prompt must leave room for max_tokens in the model's context, and stay within the server's limit.

    Counted here, outside the generation lock, so a long prompt costs no other client anything."""
    limit, context = server.limits.max_prompt_tokens, server.steerer.context_length
    if context is not None:
        limit = min(limit, context - max_tokens)
    tokens = server.steerer.prompt_tokens(prompt, chat)
    if tokens == 0:
        raise BadRequest("the prompt is empty")
    if tokens > limit:
        context_note = f", and the model's context of {context} tokens less max_tokens" if context else ""
        raise BadRequest(f"the prompt is {tokens} tokens, over the {limit} this server takes with "
                         f"max_tokens={max_tokens} (serve.limits.max_prompt_tokens{context_note})")


def stop_of(body: dict, limits: ServerLimits) -> list[str]:
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest("stop must be a string or a list of non-empty strings")
    if len(stop) > limits.max_stop or any(len(s) > limits.max_stop_chars for s in stop):
        raise BadRequest(f"stop takes at most {limits.max_stop} strings of at most {limits.max_stop_chars} "
                         "characters each (serve.limits.max_stop and max_stop_chars)")
    return stop


def steering_of(body: dict, server: SteeringServer) -> list:
    """The request's interventions, serve.steering's first."""
    steering = body.get("steering") or []
    if not isinstance(steering, list):
        raise BadRequest("steering must be a list of interventions, e.g. [{\"feature\": \"L15.resid_post/1234\", \"scale\": 4}]")
    steering = server.fixed_steering + steering
    if len(steering) > server.limits.max_interventions:
        raise BadRequest(f"steering takes at most {server.limits.max_interventions} interventions, serve.steering's "
                         "included (serve.limits.max_interventions)")
    return steering


def hooks_of(steering: list, server: SteeringServer) -> dict:
    """The interventions' hook functions (expert routes checked too), or a BadRequest saying what is wrong."""
    try:
        return server.steerer.hooks(steering, server.limits.max_scale)
    except BAD_INPUT as e:
        raise BadRequest(f"steering: {e}") from None


def seed_of(body: dict) -> int:
    seed = body.get("seed")
    if seed is None:
        return random.randrange(2**31)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed not in SEEDS:
        raise BadRequest("seed must be an integer from -2**63 to 2**63 - 1")
    return seed


def message_text(message: dict) -> str:
    content = message.get("content")
    if isinstance(content, list):  # content parts: only text is understood
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text", ""), str)
                   for p in content):
            raise BadRequest("only text content parts ({type: text, text: <string>}) are supported")
        return "".join(p.get("text", "") for p in content)
    if not isinstance(content, str):
        raise BadRequest("message content must be a string or a list of text parts")
    return content


def number(body: dict, key: str, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    number = finite_number(value) if isinstance(value, (int, float)) else None
    if number is None or not low <= number <= high:
        raise BadRequest(f"{key} must be a number from {low} to {high}")
    return number


class TextDeltas:
    """Calls emit(text) with each new piece of decoded text as tokens come.

    Text that could be the start of a stop string is held back until it is clear it is not, and
    nothing from a stop string on is ever sent.
    """

    def __init__(self, tokenizer, eos_ids: list[int], stop: list[str], emit):
        self.tokenizer, self.eos_ids, self.stop, self.emit = tokenizer, set(eos_ids), stop, emit
        self.tokens, self.sent, self.stopped = [], 0, False

    def put(self, token: int):
        if token not in self.eos_ids:
            self.tokens.append(token)
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


class Handler(LocalHandler):
    server: SteeringServer
    headers_sent = False  # once a stream has started, an error can no longer become a status code

    def setup(self):
        self.timeout = self.server.limits.socket_timeout  # a silent client frees its thread
        super().setup()

    def version_string(self) -> str:
        return "dialbox"  # http.server would show its Python version

    def log_message(self, format, *args):  # one line per request on stderr, as http.server does, but terser
        sys.stderr.write(f"serve: {self.address_string()} {format % args}\n")

    def do_GET(self):
        self.answer(self.get)

    def do_POST(self):
        self.answer(self.post)

    def answer(self, handle):
        """Runs handle(): a refusal or a failure is answered as JSON, never as a dropped connection."""
        try:
            handle()
        except (ConnectionError, TimeoutError):  # the client left or stalled: there is nobody to answer
            self.close_connection = True
        except Exception as e:
            error = api_error(e)
            if not self.headers_sent:
                self.send_error_json(error)

    def send_error(self, code, message=None, explain=None):
        """http.server's own refusals (a malformed request line, a method with no do_ here), as JSON."""
        if code == HTTPStatus.NOT_IMPLEMENTED:
            error = ApiError(405, f"method {self.command} is not allowed: use GET or POST", "method_not_allowed")
        else:  # coded by status: forbidden, http_version_not_supported, ...
            phrase = HTTPStatus(code).phrase
            error = ApiError(code, message or phrase, "_".join(phrase.lower().replace("-", " ").split()))
        self.send_error_json(error)

    def get(self):
        if self.path.rstrip("/") not in ("/v1/models", "/models"):
            raise ApiError(404, f"no route GET {self.path}: use /v1/models", "unknown_route")
        self.send_json(200, {"object": "list", "data": [
            {"id": self.server.model_name, "object": "model", "created": 0, "owned_by": "dialbox"}]})

    def post(self):
        chat = ROUTES.get(self.path.rstrip("/"))
        if chat is None:
            raise ApiError(404, f"no route POST {self.path}: use /v1/chat/completions or /v1/completions",
                           "unknown_route")
        self.check_json_type()
        body = self.read_json()
        row = parse_request(body, chat, self.server)
        stream = body.get("stream") or False
        if not isinstance(stream, bool):
            raise BadRequest("stream must be true or false")
        try:
            ticket = self.server.scheduler.submit(row)
        except Busy as e:
            raise ApiError(429, str(e), "server_busy") from None
        if stream:
            self.stream(ticket, chat)
        else:
            self.send_json(200, self.completion(generated(ticket, gone=self.client_gone), chat))

    def check_json_type(self) -> None:
        """A body must say it is JSON: a web page can send text/plain or a form to any address without
        asking, but not application/json."""
        if self.headers.get_content_type() != "application/json":
            raise ApiError(415, "the body must be sent as Content-Type: application/json, not "
                                f"{self.headers.get('Content-Type')!r}", "unsupported_media_type")

    def client_gone(self) -> bool:
        """Whether the client has closed its end (readable, with nothing to read), while it waits."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and not self.connection.recv(1, socket.MSG_PEEK)
        except OSError:
            return True

    def read_json(self) -> dict:
        limit = self.server.limits.max_json_depth
        too_deep = f"the JSON nests deeper than {limit} levels (serve.limits.max_json_depth)"
        try:
            body = json.loads(self.read_body() or b"null")
        except RecursionError:  # far too deep for the parser itself
            raise BadRequest(too_deep) from None
        except ValueError:  # not JSON, not UTF-8, or a number too long to convert
            raise BadRequest("the body is not valid JSON") from None
        if json_depth(body) > limit:
            raise BadRequest(too_deep)
        try:  # JSON's \ud800-style escapes can spell text no tokenizer (or path) takes
            json.dumps(body, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise BadRequest("the body holds a lone surrogate (\\ud800-\\udfff): text must be valid Unicode") from None
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        return body

    def read_body(self) -> bytes:
        """The request's body: at most max_body_bytes, and all of it within socket_timeout seconds."""
        limits = self.server.limits
        length = self.headers.get("Content-Length")
        if length is None:
            raise BadRequest("a POST needs a Content-Length header (chunked bodies are not supported)")
        if not (length.isascii() and length.isdigit()):
            raise BadRequest(f"Content-Length must be a number of bytes, not {length!r}")
        size = int(length)
        if size > limits.max_body_bytes:  # refused unread
            raise ApiError(413, f"the body is {size} bytes, over the {limits.max_body_bytes} this server takes "
                                "(serve.limits.max_body_bytes)", "request_too_large")
        # The socket timeout bounds each read; the deadline bounds them all, against a body sent a byte at a time.
        self.reads.deadline = time.monotonic() + limits.socket_timeout
        try:
            body = self.rfile.read(size)
        except TimeoutError:
            raise ApiError(408, f"the body did not arrive within {limits.socket_timeout:g} s "
                                "(serve.limits.socket_timeout)", "request_timeout") from None
        finally:
            self.reads.deadline = None
        if len(body) < size:
            raise BadRequest(f"the body ended after {len(body)} of its {size} bytes")
        return body

    def completion(self, result, chat: bool) -> dict:
        choice = {"index": 0, "finish_reason": result.finish_reason, "logprobs": None}
        choice.update({"message": {"role": "assistant", "content": result.text}} if chat else {"text": result.text})
        return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "object": "chat.completion" if chat else "text_completion", "model": self.server.model_name,
                "choices": [choice], "usage": {"prompt_tokens": result.prompt_tokens,
                                               "completion_tokens": len(result.tokens),
                                               "total_tokens": result.prompt_tokens + len(result.tokens)}}

    def stream(self, ticket, chat: bool):
        """Server-sent events: one chunk per piece of text, then the finish reason, then [DONE]."""
        ident, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())

        def chunk(text: str | None, finish: str | None = None, first: bool = False):
            if chat:
                delta = ({"role": "assistant"} if first else {}) | ({"content": text} if text is not None else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            self.event({"id": ident, "created": created, "model": self.server.model_name, "choices": [choice],
                        "object": "chat.completion.chunk" if chat else "text_completion"})

        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        self.headers_sent = True
        chunk("" if chat else None, first=True)
        steerer = self.server.steerer
        deltas = TextDeltas(steerer.tokenizer, steerer.eos_ids, ticket.row.stop, chunk)
        try:
            result = generated(ticket, on_token=deltas.put, gone=self.client_gone)
        except (ConnectionError, TimeoutError):
            raise
        except Exception as e:  # this row failed after its stream began: the stream says so, and still ends
            self.event(self.error_payload(api_error(e)))
            chunk(None, "error")
        else:
            deltas.end()
            chunk(None, result.finish_reason)
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def event(self, payload: dict) -> None:
        self.wfile.write(f"data: {json.dumps(payload)}\n\n".encode())
        self.wfile.flush()

    def send_json(self, status: int, payload: dict, headers: dict | None = None):
        data = json.dumps(payload).encode()
        self.send_response(status)
        for name, value in {"Content-Type": "application/json", "Content-Length": str(len(data)),
                            **(headers or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)
        self.headers_sent = True

    def send_error_json(self, error: ApiError):
        self.close_connection = True  # the body may be left unread on the socket
        self.send_json(error.status, self.error_payload(error), {"Allow": "GET, POST"} if error.status == 405 else None)

    def error_payload(self, error: ApiError) -> dict:
        return {"error": {"message": self.server.public(str(error)), "type": error.kind, "param": None,
                          "code": error.code}}


def generated(ticket, **waiting) -> Generation:
    """The ticket's Generation (Ticket.result takes `waiting`); a row its steering failed is a 400."""
    try:
        return ticket.result(**waiting)
    except BAD_INPUT as e:
        raise BadRequest(f"generation failed: {e}") from None


def json_depth(value) -> int:
    """How deeply lists and objects nest in a parsed JSON value (a scalar is 0), level by level."""
    depth, level = 0, [value]
    while containers := [v for v in level if isinstance(v, (list, dict))]:
        depth += 1
        level = [item for v in containers for item in (v.values() if isinstance(v, dict) else v)]
    return depth
