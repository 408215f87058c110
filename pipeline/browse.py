"""`make browse`: serve a run's feature browser (runs/<run>/report) over HTTP.

    python -m pipeline.browse                      # http://127.0.0.1:8765/
    python -m pipeline.browse browse.port=9000 run.run_name=big

The report is plain static files; this only adds the one header they want (no-cache).
"""

from __future__ import annotations

from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import hydra
from omegaconf import DictConfig

from pipeline.config import register_configs
from activations.errors import ConfigError
from activations.rundir import RunDir
from pipeline.cli import one_line_errors

register_configs()


class ReportHandler(SimpleHTTPRequestHandler):
    # A report rebuilt while a tab is open must not mix with cached files of the old one.
    def end_headers(self) -> None:
        self.send_header("Cache-Control", "no-cache")
        super().end_headers()


def make_server(root: Path, host: str = "127.0.0.1", port: int = 8765) -> ThreadingHTTPServer:
    """A server for `root` (port 0 picks a free one); call serve_forever() on it."""
    return ThreadingHTTPServer((host, port), partial(ReportHandler, directory=str(root)))


def browse(cfg: DictConfig) -> None:
    root = RunDir.from_config(cfg).report
    if not (root / "index.html").is_file():
        raise ConfigError(f"no report in {root}: run `make report RUN={cfg.run.run_name}` first")
    try:
        server = make_server(root, cfg.browse.host, cfg.browse.port)
    except OSError as e:
        raise ConfigError(f"cannot serve on {cfg.browse.host}:{cfg.browse.port} ({e.strerror}): "
                          "pick another port with browse.port=<n>") from e
    with server:
        host, port = server.server_address[:2]
        print(f"browse: serving {root} at http://{host}:{port}/ (Ctrl-C stops)", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass


@hydra.main(config_path="../conf", config_name="report", version_base=None)
def main(cfg: DictConfig) -> None:
    with one_line_errors("browse"):
        browse(cfg)


if __name__ == "__main__":
    main()
