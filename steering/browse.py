"""`make browse` with a model: the feature browser and the steering API on one 127.0.0.1 port.

    server = browse_server(steerer, Path("runs/demo/report"), port=0)
    server.serve_forever()   # /, /data/... the report (features/report_server.py); /v1/... the API

One origin serves both, so the page's Steer panel calls the API under the report's own
Content-Security-Policy (default-src 'self') with no cross-origin rules to open: its requests carry
the server's own Origin, which the API's Origin check lets through (features/local_http.py).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from features.report_server import ReportHandler
from steering.limits import ServerLimits
from steering.server import Handler, SteeringServer
from steering.steerer import Steerer

API = ("/v1/", "/v1")


class BrowseHandler(Handler, ReportHandler):
    """The API's routes under /v1, the report's files everywhere else."""

    def do_GET(self):
        if self.path.startswith(API):
            return super().do_GET()
        return ReportHandler.do_GET(self)

    def do_HEAD(self):
        return ReportHandler.do_HEAD(self)


def browse_server(steerer: Steerer, report: Path, host: str = "127.0.0.1", port: int = 8765, max_tokens: int = 256,
                  limits: ServerLimits | None = None, allowed_hosts=()) -> SteeringServer:
    return SteeringServer(steerer, host, port, max_tokens, limits=limits,
                          handler=partial(BrowseHandler, directory=str(report)), allowed_hosts=allowed_hosts)
