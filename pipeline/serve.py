"""`make serve`: an OpenAI-compatible server that steers each request by feature ID or vector.

    python -m pipeline.serve run.run_name=demo serve.port=8000
    curl 127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \
         -d '{"messages": [{"role": "user", "content": "Hi"}], "steering": [{"feature": "L15.resid_post/1234", "scale": 4}]}'

It listens on 127.0.0.1 unless serve.host says otherwise, and answers only to its own Host names unless
serve.allowed_hosts adds some; see steering/server.py for the API and its limits.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from steering.server import SteeringServer
from steering.steerer import Steerer
from pipeline.config import register_configs
from activations.rundir import RunDir
from pipeline.cli import one_line_errors

register_configs()


def build_server(cfg: DictConfig) -> SteeringServer:
    run = RunDir.from_config(cfg)
    steerer = Steerer(run, cfg.model, max_act_rows=cfg.serve.max_act_rows)
    server = SteeringServer(steerer, cfg.serve.host, cfg.serve.port, cfg.serve.max_tokens, list(cfg.serve.steering),
                            OmegaConf.to_object(cfg.serve.limits), allowed_hosts=list(cfg.serve.allowed_hosts))
    run.save_config(cfg, "serve")
    return server


@hydra.main(config_path="../conf", config_name="serve", version_base=None)
def main(cfg: DictConfig) -> None:
    with one_line_errors("serve"):
        server = build_server(cfg)
    host, port = server.server_address[:2]
    print(f"serve: {server.model_name} at http://{host}:{port}/v1 (steering per request: the `steering` field)",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
