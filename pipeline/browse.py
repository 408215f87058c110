"""`make browse`: serve a run's feature browser (runs/<run>/report) over HTTP.

    python -m pipeline.browse                      # http://127.0.0.1:8765/, with steering
    python -m pipeline.browse browse.port=9000 run.run_name=big
    python -m pipeline.browse browse.model=false   # the static report alone

The report is plain static files (features/report_server.py). When the run's model loads, the same
port also serves the steering API under /v1 (steering/browse.py), and each feature page's Steer
panel uses it; otherwise the panel says how to start it.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from pipeline.config import register_configs
from activations.errors import ConfigError, DialboxError
from activations.rundir import RunDir
from features.report_server import make_server
from steering.browse import browse_server
from steering.steerer import Steerer
from pipeline.cli import one_line_errors

register_configs()


def browse(cfg: DictConfig) -> None:
    root = RunDir.from_config(cfg).report
    if not (root / "index.html").is_file():
        raise ConfigError(f"no report in {root}: run `make report RUN={cfg.run.run_name}` first")
    steerer = load_steerer(cfg) if cfg.browse.model else None
    try:
        hosts = list(cfg.browse.allowed_hosts)
        server = (browse_server(steerer, root, cfg.browse.host, cfg.browse.port, cfg.browse.max_tokens, allowed_hosts=hosts)
                  if steerer else make_server(root, cfg.browse.host, cfg.browse.port, hosts))
    except OSError as e:
        raise ConfigError(f"cannot serve on {cfg.browse.host}:{cfg.browse.port} ({e.strerror}): "
                          "pick another port with browse.port=<n>") from e
    with server:
        host, port = server.server_address[:2]
        api = " with the steering API at /v1" if steerer else ""
        print(f"browse: serving {root}{api} at http://{host}:{port}/ (Ctrl-C stops)", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass


def load_steerer(cfg: DictConfig) -> Steerer | None:
    """The run's model and SAEs, or None (said once) when they cannot load: the report still serves."""
    try:
        return Steerer(RunDir.from_config(cfg))
    except (DialboxError, OSError) as e:
        print(f"browse: steering off, the run's model did not load ({e}); serving the static report", flush=True)
        return None


@hydra.main(config_path="../conf", config_name="report", version_base=None)
def main(cfg: DictConfig) -> None:
    with one_line_errors("browse"):
        browse(cfg)


if __name__ == "__main__":
    main()
