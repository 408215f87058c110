"""`make browse`: serve a run's feature browser (runs/<run>/report) over HTTP.

    python -m pipeline.browse                      # http://127.0.0.1:8765/
    python -m pipeline.browse browse.port=9000 run.run_name=big

The report is plain static files; features/report_server.py serves them and nothing else.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from pipeline.config import register_configs
from activations.errors import ConfigError
from activations.rundir import RunDir
from features.report_server import make_server
from pipeline.cli import one_line_errors

register_configs()


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
