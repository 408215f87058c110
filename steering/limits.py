"""The bounds on the work one request can make the steering server do (`serve.limits`).

Requests generate together in batches (steering/batching.py), so whatever one request costs, the
requests beside it wait for: each limit below caps one way a single request could hold the server,
the batching limits bound how many rows share a forward and how long a request waits for company,
and the connection limits bound what clients can hold open (features/local_http.py). They live here,
apart from the server, so that the stage's config can hold them without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from features.local_http import HEADER_SECONDS, MAX_CLIENT_CONNECTIONS, MAX_CONNECTIONS


@dataclass
class ServerLimits:
    max_body_bytes: int = 1_048_576  # a larger request body is refused (413) without being read
    max_json_depth: int = 32  # lists and objects nested deeper than this are refused
    max_stop: int = 4  # strings in a request's `stop` list, as OpenAI allows
    # Characters in one stop string: transformers prepares each one against the whole vocabulary.
    max_stop_chars: int = 32
    max_interventions: int = 16  # entries in a request's `steering` list, serve.steering included
    # Tokens in a prompt, and never more than the model's context less the request's max_tokens.
    max_prompt_tokens: int = 4096
    # The largest |scale| an intervention may have, per op (an op left out has no bound): beyond these
    # the model only emits noise.
    max_scale: dict[str, float] = field(default_factory=lambda: {"add": 1000.0, "clamp": 1000.0, "project": 10.0})
    # Seconds one generation may run; then it stops with finish_reason "length", as at max_tokens.
    max_generation_seconds: float = 120.0
    max_batch: int = 8  # requests generating together in one batch (rows of one forward)
    # Milliseconds the first request of a batch waits for others to join it: a little latency for throughput.
    batch_wait_ms: float = 20.0
    # Requests queued behind the running batch; one more is refused with a 429 (retry later).
    max_waiting: int = 64
    # Seconds a connection may sit silent, and the most its request body may take to arrive in full.
    socket_timeout: float = 30.0
    # Seconds a request's line and headers may take to arrive in full, however slowly they trickle.
    header_seconds: float = HEADER_SECONDS
    # Open connections in all; one more is answered 429 and closed without a thread (the listen backlog,
    # the kernel's most, holds a burst until it is accepted and answered).
    max_connections: int = MAX_CONNECTIONS
    max_client_connections: int = MAX_CLIENT_CONNECTIONS  # open connections from one client address (429 past it)
