"""`make steer` and friends: steering by feature ID or named vector.

    python -m pipeline.steer steer.prompt='Tell me a story.' 'steer.interventions=["L15.resid_post/1234 scale=4"]'
    python -m pipeline.steer contrast contrast.name=terse contrast.suffix='Respond tersely.'
    python -m pipeline.steer project project.target=terse project.layer=15
    python -m pipeline.steer export export.vector=terse export.format=gguf     # or ds4, native
    python -m pipeline.steer eval                                                # make steer-eval
    python -m pipeline.steer features steer_features.n=64                        # make steer-features

The first argument picks the action (`generate` when it is an override); each action reads its
own section of conf/steer.yaml and saves the resolved config as runs/<run>/config/steer-<action>.yaml.
"""

from __future__ import annotations

import itertools
import sys
import textwrap
from pathlib import Path

import hydra
from omegaconf import DictConfig

from activations.rundir import RunDir
from activations.sites import Site
from pipeline.bench import make_command, write_section
from pipeline.cli import one_line_errors
from pipeline.config import register_configs
from steering.contrast import build_contrast
from steering.evaluation import run_eval, save_eval
from steering.feature_eval import evaluate_features, features_report, predictor_scores, summary
from steering.exports import EXPORTS
from steering.feature_vectors import save_feature_vector
from steering.interventions import SteeringError
from steering.routing import export_routes
from steering.steerer import Steerer
from steering.vectors import SteeringVector, describe_nearest, target_directions

register_configs()


def steerer_for(cfg: DictConfig) -> Steerer:
    return Steerer(RunDir.from_config(cfg), cfg.model, max_act_rows=cfg.steer.max_act_rows)


def generate(cfg: DictConfig) -> tuple:
    s = cfg.steer
    if not s.interventions:
        raise SteeringError("no interventions: pass e.g. 'steer.interventions=[\"L15.resid_post/1234 scale=4\"]'")
    steerer = steerer_for(cfg)
    plain, steered = steerer.compare(s.prompt, list(s.interventions), max_new_tokens=s.max_new_tokens,
                                     temperature=s.temperature, top_p=s.top_p, seed=s.seed, chat=s.chat)
    for note in steerer.notes:
        print(f"steer: {note}")
    print(f"prompt: {s.prompt}\n")
    print(side_by_side(("unsteered", plain.text), ("steered: " + "; ".join(map(str, s.interventions)), steered.text),
                       s.width))
    return plain, steered


def side_by_side(left: tuple[str, str], right: tuple[str, str], width: int) -> str:
    """Two (title, text) columns, each wrapped to `width` characters, paragraphs kept."""
    def column(title, text):
        lines = [title[:width], "-" * width]
        for paragraph in text.splitlines() or [""]:
            lines += textwrap.wrap(paragraph, width) or [""]
        return lines

    rows = itertools.zip_longest(column(*left), column(*right), fillvalue="")
    return "\n".join(f"{a:<{width}} | {b}".rstrip() for a, b in rows)


def contrast(cfg: DictConfig) -> SteeringVector:
    steerer = steerer_for(cfg)
    vector = build_contrast(cfg.contrast, steerer)
    norms = ", ".join(f"L{l} {float(v.norm()):.3g}" for l, v in vector.directions.items())
    print(f"contrast: vector {vector.name} ({vector.operation} at {vector.kind}) saved in "
          f"{steerer.run.vectors}; norms: {norms}")
    if cfg.contrast.top_features:
        for layer in vector.layers:
            site = vector.site(layer)
            if str(site) in steerer.run.trained_sites():
                print(describe_nearest(steerer.run, site, vector.directions[layer], cfg.contrast.top_features,
                                       f"{vector.name} at L{layer}"))
    return vector


def project(cfg: DictConfig) -> list[str]:
    p, run = cfg.project, RunDir.from_config(cfg)
    if not p.target:
        raise SteeringError("project.target is empty: give a vector name or a feature ID")
    directions, kind = target_directions(run, p.target, p.layer)
    reports = []
    for layer, direction in directions.items():
        sae_site = Site.parse(p.sae_site) if p.sae_site else Site(layer, kind)
        reports.append(describe_nearest(run, sae_site, direction, p.top, f"{p.target} at L{layer}"))
        print(reports[-1])
    return reports


def export(cfg: DictConfig) -> list[Path]:
    e, run = cfg.export, RunDir.from_config(cfg)
    if [bool(e.vector), bool(e.feature), bool(e.routes)].count(True) != 1:
        raise SteeringError("give exactly one of export.vector (a vector name), export.feature (a feature ID) or "
                            "export.routes (expert routes such as \"route L5/E37 bias=2\")")
    if e.routes:
        return export_expert_routes(cfg)
    vector = SteeringVector.load(run.vectors, e.vector) if e.vector else save_feature_vector(run, e.feature, e.operation)
    out_dir = Path(e.out_dir) if e.out_dir else run.exports
    paths = EXPORTS[e.format](vector, out_dir)
    print(f"export: {vector.name} ({vector.operation} at {vector.kind}, layers {vector.layers}) -> "
          + ", ".join(map(str, paths)))
    if vector.positions != "all" and e.format != "native":
        print(f"export: note: {vector.name} was tuned to act on the {vector.positions}'s positions only; "
              f"{e.format} applies it at every position, which make steer-features did not measure")
    return paths


def export_expert_routes(cfg: DictConfig) -> list[Path]:
    """The native per-layer x expert bias table of export.routes (the model is loaded to check them)."""
    e, steerer = cfg.export, steerer_for(cfg)
    paths = export_routes(steerer.adapter, steerer.identity, list(e.routes), e.name,
                          Path(e.out_dir) if e.out_dir else steerer.run.exports)
    print(f"export: expert routes {', '.join(map(str, e.routes))} -> " + ", ".join(map(str, paths)))
    return paths


def evaluate(cfg: DictConfig):
    steerer = steerer_for(cfg)
    results = run_eval(cfg.eval, cfg.contrast, steerer)
    save_eval(steerer.run, results)
    print(results["report"])
    if cfg.eval.write_benchmarks:
        write_section("steer-eval", make_command("steer-eval", sys.argv[1:]), results["report"])
    return results


def features(cfg: DictConfig) -> dict:
    """Evaluate the steering of features (make steer-features) and print what steers."""
    f = cfg.steer_features
    outcome = evaluate_features(steerer_for(cfg), f)
    run = RunDir.from_config(cfg)
    scores = predictor_scores(run, outcome["site"])
    report = features_report(outcome["results"], summary(outcome["results"], scores, f.max_ppl_ratio), f,
                             outcome["groups"])
    print(report)
    if f.write_benchmarks:
        # One section per run, so the demo SAE's numbers and make quality's stand side by side.
        write_section(f"steer-features: {run.root.name}", make_command("steer-features", sys.argv[1:]), report)
    return outcome


ACTIONS = {"generate": generate, "contrast": contrast, "project": project, "export": export, "eval": evaluate,
           "features": features}


def run_action(action: str, cfg: DictConfig):
    RunDir.from_config(cfg).save_config(cfg, f"steer-{action}")
    return ACTIONS[action](cfg)


def main() -> None:
    action = sys.argv.pop(1) if len(sys.argv) > 1 and sys.argv[1] in ACTIONS else "generate"

    @hydra.main(config_path="../conf", config_name="steer", version_base=None)
    def app(cfg: DictConfig) -> None:
        with one_line_errors(f"steer {action}"):
            run_action(action, cfg)

    app()


if __name__ == "__main__":
    main()
