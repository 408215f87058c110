"""The HTTP serving both of Dialbox's servers build on (features/report_server.py, steering/server.py).

    server = LocalServer(("127.0.0.1", 8765), handler)   # handler: a LocalHandler subclass

They serve one machine's browser and scripts, and that browser also opens other sites' pages:

- Host: only the names the server answers to (127.0.0.1, localhost, ::1, the address it is bound to
  and `allowed_hosts`) get an answer; any other is a 403, so a page whose DNS name was rebound to
  127.0.0.1 reads nothing and drives nothing.
- Origin: a browser request sent from another origin is a 403 (cross-site request forgery); the
  report's own page, same-origin, passes.
- A client's request line and headers must arrive within `header_seconds` in all, however slowly
  they trickle, or the connection is closed (slowloris).
- At most `max_connections` connections in all and `max_client_connections` per client address: one
  more is answered 429 and closed at once, without a thread. The listen backlog is the most the kernel
  allows (SOMAXCONN), so a burst waits there to be accepted and answered: with http.server's 5 the
  kernel answered the overflow with SYN cookies, then reset those connections.
- Every answer has a status line: http.server answered an HTTP/2 request as if to HTTP/0.9.
"""

from __future__ import annotations

import io
import json
import socket
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

LOOPBACK = ("127.0.0.1", "localhost", "::1")
ANY_ADDRESS = ("", "0.0.0.0", "::")
MAX_CONNECTIONS, MAX_CLIENT_CONNECTIONS, HEADER_SECONDS = 256, 128, 10.0
LINGER_S = 2.0  # how long a refused connection may take to read its 429 and hang up
MAX_LINGERING = 1024  # refused connections kept open that long at once: each holds a file descriptor


class LocalServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler, allowed_hosts=(), max_connections: int = MAX_CONNECTIONS,
                 max_client_connections: int = MAX_CLIENT_CONNECTIONS, header_seconds: float = HEADER_SECONDS):
        self.extra_hosts = {host.lower() for host in allowed_hosts}
        bound = set() if address[0] in ANY_ADDRESS else {address[0].lower()}
        self.allowed_hosts = set(LOOPBACK) | bound | self.extra_hosts
        self.max_connections, self.max_client_connections = max_connections, max_client_connections
        self.header_seconds = header_seconds
        self.request_queue_size = socket.SOMAXCONN  # the listen backlog: a burst waits for accept(), not a reset
        self.open, self.per_client, self.counting = 0, Counter(), threading.Lock()
        self.refused: list[tuple[float, socket.socket]] = []  # (deadline, socket) of 429s being read
        super().__init__(address, handler)

    def refusal(self, headers) -> str | None:
        """Why a request's Host or Origin header is refused, or None when both are fine."""
        host, origin = headers.get("Host"), headers.get("Origin")
        if host is not None and host_name(host) not in self.allowed_hosts:
            return (f"this server does not answer to Host {host!r}: it answers to {', '.join(sorted(self.allowed_hosts))} "
                    "(add a name with allowed_hosts, e.g. behind a reverse proxy)")
        if origin is not None and not self.same_origin(origin, host):
            return f"cross-origin requests are refused: Origin {origin!r} is not this server's"
        return None

    def same_origin(self, origin: str, host: str | None) -> bool:
        """Whether a browser's Origin is the server's own: the host and port the request went to, or a
        host named in allowed_hosts (a reverse proxy may change Host and port)."""
        try:
            parts = urlsplit(origin)
        except ValueError:
            return False
        return parts.scheme in ("http", "https") and (
            parts.netloc.lower() == (host or "").lower() or parts.hostname in self.extra_hosts)

    # -- connections ------------------------------------------------------------------------------

    def process_request(self, request, client_address):
        over = self.admit(client_address[0])
        if over:
            self.refuse(request, client_address[0], over)
        else:
            super().process_request(request, client_address)

    def admit(self, client: str) -> str | None:
        """Counts a new connection in, or says which limit it is over."""
        with self.counting:
            if self.open >= self.max_connections:
                return f"{self.open} connections are open, the most this server takes (max_connections)"
            if self.per_client[client] >= self.max_client_connections:
                return (f"{self.per_client[client]} connections are open from {client}, the most one client may hold "
                        "(max_client_connections)")
            self.open += 1
            self.per_client[client] += 1
        return None

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.counting:
                self.open -= 1
                self.per_client[client_address[0]] -= 1
                if not self.per_client[client_address[0]]:
                    del self.per_client[client_address[0]]

    def refuse(self, sock: socket.socket, client: str, reason: str) -> None:
        """A 429 sent at once from the accepting thread; the socket closes once its client hangs up."""
        sys.stderr.write(f"{client}: connection refused with a 429: {reason}\n")
        try:
            sock.setblocking(False)
            sock.sendall(busy_answer(reason))  # a few hundred bytes: a new socket's buffer takes them
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            sock.close()
            return
        self.refused.append((time.monotonic() + LINGER_S, sock))
        while len(self.refused) > MAX_LINGERING:
            self.refused.pop(0)[1].close()

    def service_actions(self):
        """Between accepts: close the refused sockets whose clients have hung up or had their time.

        Their requests are read first: Linux resets a connection closed with unread data, and the
        reset can reach the client before the 429 does."""
        now, waiting = time.monotonic(), []
        for deadline, sock in self.refused:
            if now > deadline or hung_up(sock):
                sock.close()
            else:
                waiting.append((deadline, sock))
        self.refused = waiting

    def server_close(self):
        super().server_close()
        for _, sock in self.refused:
            sock.close()


class LocalHandler(BaseHTTPRequestHandler):
    """Host and Origin checked on every request, its headers read against a deadline."""

    server: LocalServer
    default_request_version = "HTTP/1.0"  # http.server's HTTP/0.9 answers a refused HTTP/2 request with no status line

    def setup(self):
        super().setup()
        self.rfile.close()  # socketserver's reader, replaced by one that keeps deadlines
        self.reads = DeadlineReads(self.connection, self.timeout)
        self.rfile = io.BufferedReader(self.reads)

    def handle_one_request(self):
        self.reads.deadline = time.monotonic() + self.server.header_seconds  # the request line and headers, in all
        super().handle_one_request()

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        self.reads.deadline = None  # the headers are in; a body has its own bound
        refusal = self.server.refusal(self.headers)
        if refusal:
            self.send_error(403, refusal)
            return False
        return True


class DeadlineReads(io.RawIOBase):
    """A socket's reads, each allowed only the time left before `deadline` when one is set: a bound on
    a whole phase of reading (headers, a body), where the socket's timeout bounds one read."""

    def __init__(self, sock: socket.socket, timeout: float | None):
        self.sock, self.timeout, self.deadline = sock, timeout, None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.deadline is None:
            return self.sock.recv_into(buffer)
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the deadline passed")
        self.sock.settimeout(left if self.timeout is None else min(left, self.timeout))
        try:
            return self.sock.recv_into(buffer)
        finally:
            self.sock.settimeout(self.timeout)


def host_name(host: str) -> str | None:
    """The name in a Host header, without its port: "[::1]:8000" is "::1"."""
    try:
        return urlsplit(f"//{host}").hostname
    except ValueError:  # "[::1", say
        return None


def busy_answer(reason: str) -> bytes:
    """A whole HTTP 429 response in OpenAI's error shape, sent without reading the request."""
    body = json.dumps({"error": {"message": f"{reason}: retry shortly", "type": "invalid_request_error",
                                 "param": None, "code": "server_busy"}}).encode()
    head = (f"HTTP/1.0 429 Too Many Requests\r\nServer: dialbox\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n")
    return head.encode() + body


def hung_up(sock: socket.socket) -> bool:
    """Whether a non-blocking socket's client has closed its end (what it sent is read and dropped)."""
    try:
        return not sock.recv(65536)
    except BlockingIOError:
        return False
    except OSError:
        return True
