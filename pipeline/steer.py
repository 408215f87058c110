"""`make steer` and friends: steering by feature ID or named vector (design.md section 6).

    python -m pipeline.steer steer.prompt='Tell me a story.' 'steer.interventions=["L15.resid_post/1234 scale=4"]'
    python -m pipeline.steer contrast contrast.name=terse contrast.suffix='Respond tersely.'
    python -m pipeline.steer project project.target=terse project.layer=15
    python -m pipeline.steer export export.vector=terse export.format=gguf     # or ds4, native
    python -m pipeline.steer eval                                                # make steer-eval

The first argument picks the action (`generate` when it is an override); each action reads its
own section of conf/steer.yaml and saves the resolved config as runs/<run>/config/steer-<action>.yaml.
"""

from __future__ import annotations

import itertools
import sys
import textwrap
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from features.steering import BAD_INPUT, Steerer, SteeringError, encode_prompt, max_activations
from features.vectors import EXPORTS, SteeringVector, contrast_vector, feature_vector, nearest_features
from pipeline.config import register_configs
from pipeline.rundir import RunDir, one_line_errors
from pipeline.sites import FeatureId, Site
from pipeline.store import StoreError

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


def contrast_prompts(c: DictConfig) -> tuple[list[str], list[str]]:
    """(positive, negative) prompts: two files, or one file with and without the suffix."""
    if c.positive_file or c.negative_file:
        if not (c.positive_file and c.negative_file):
            raise SteeringError("give both contrast.positive_file and contrast.negative_file, or neither")
        return read_prompts(c.positive_file), read_prompts(c.negative_file)
    if not c.suffix:
        raise SteeringError("contrast.suffix is empty: give the instruction to contrast, e.g. 'Respond tersely.'")
    prompts = read_prompts(c.prompts)
    return [f"{p} {c.suffix}" for p in prompts], prompts


def read_prompts(path: str) -> list[str]:
    """One prompt a line; blank lines and lines starting with # are skipped."""
    file = Path(path)
    if not file.is_file():
        raise SteeringError(f"no prompt file {path}: give a text file with one prompt a line")
    prompts = [line.strip() for line in file.read_text().splitlines() if line.strip() and not line.startswith("#")]
    if not prompts:
        raise SteeringError(f"{path} holds no prompts")
    return prompts


def build_contrast(cfg: DictConfig, steerer: Steerer) -> SteeringVector:
    c = cfg.contrast
    positives, negatives = contrast_prompts(c)
    chat = steerer.chat_default if c.chat is None else c.chat
    encode = [[encode_prompt(steerer.tokenizer, p, chat) for p in group] for group in (positives, negatives)]
    layers = list(c.layers) or list(range(steerer.adapter.n_layers))
    source = {"suffix": c.suffix if not c.positive_file else "", "prompts": c.positive_file or c.prompts,
              "negative_prompts": c.negative_file or c.prompts}
    with torch.inference_mode():
        vector = contrast_vector(c.name, steerer.adapter, *encode, c.site_kind, layers, c.where, c.orthogonalize,
                                 c.operation, source)
    vector.save(steerer.run.root / "vectors")
    return vector


def contrast(cfg: DictConfig) -> SteeringVector:
    steerer = steerer_for(cfg)
    vector = build_contrast(cfg, steerer)
    norms = ", ".join(f"L{l} {float(v.norm()):.3g}" for l, v in vector.directions.items())
    print(f"contrast: vector {vector.name} ({vector.operation} at {vector.kind}) saved in "
          f"{steerer.run.root / 'vectors'}; norms: {norms}")
    if cfg.contrast.top_features:
        for layer in vector.layers:
            site = vector.site(layer)
            if (steerer.run.saes(str(site)) / "cfg.json").exists():
                print(describe_nearest(steerer.run, site, vector.directions[layer], cfg.contrast.top_features,
                                       f"{vector.name} at L{layer}"))
    return vector


def describe_nearest(run: RunDir, sae_site: Site, direction: torch.Tensor, top: int, what: str) -> str:
    """The SAE features nearest a direction, one a line, with labels when the label stage has run."""
    sae = load_sae(run, sae_site)
    labels = feature_labels(run, str(sae_site))
    lines = [f"features of the SAE at {sae_site} nearest {what} (decoder cosine):"]
    for index, cosine in nearest_features(direction, sae.W_dec.detach(), top):
        lines.append(f"  {sae_site}/{index:<8} {cosine:+.3f}  {labels.get(index, '')}".rstrip())
    return "\n".join(lines)


def feature_labels(run: RunDir, site: str) -> dict[int, str]:
    table = run.root / "features" / site / "features.parquet"
    if not table.exists():
        return {}
    import pyarrow.parquet as pq

    schema = pq.read_schema(table)
    if "label" not in schema.names:
        return {}
    columns = pq.read_table(table, columns=["index", "label"]).to_pydict()
    return {int(i): str(label or "") for i, label in zip(columns["index"], columns["label"])}


def load_sae(run: RunDir, site: Site):
    from sae_lens import SAE

    path = run.saes(str(site))
    if not (path / "cfg.json").exists():
        raise SteeringError(f"no SAE at {path}: train one (make train ARGS='train.sites=[{site}]')")
    return SAE.load_from_disk(str(path))


def project(cfg: DictConfig) -> list[str]:
    p, run = cfg.project, RunDir.from_config(cfg)
    if not p.target:
        raise SteeringError("project.target is empty: give a vector name or a feature ID")
    if "/" in p.target:
        feature = FeatureId.parse(p.target)
        directions = {feature.site.layer: load_sae(run, feature.site).W_dec[feature.index].detach()}
        kind = feature.site.kind
    else:
        vector = SteeringVector.load(run.root / "vectors", p.target)
        directions, kind = vector.directions, vector.kind
    if p.layer is not None:
        if p.layer not in directions:
            raise SteeringError(f"{p.target} has no direction at layer {p.layer}: it has {sorted(directions)}")
        directions = {p.layer: directions[p.layer]}
    reports = []
    for layer, direction in directions.items():
        sae_site = Site.parse(p.sae_site) if p.sae_site else Site(layer, kind)
        reports.append(describe_nearest(run, sae_site, direction, p.top, f"{p.target} at L{layer}"))
        print(reports[-1])
    return reports


def export(cfg: DictConfig) -> list[Path]:
    e, run = cfg.export, RunDir.from_config(cfg)
    if e.format not in EXPORTS:
        raise SteeringError(f"export.format={e.format!r}: use one of {', '.join(EXPORTS)}")
    if bool(e.vector) == bool(e.feature):
        raise SteeringError("give exactly one of export.vector (a vector name) or export.feature (a feature ID)")
    vectors_dir = run.root / "vectors"
    vector = SteeringVector.load(vectors_dir, e.vector) if e.vector else save_feature_vector(run, e.feature, e.operation)
    out_dir = Path(e.out_dir) if e.out_dir else vectors_dir / "exports"
    paths = EXPORTS[e.format](vector, out_dir)
    print(f"export: {vector.name} ({vector.operation} at {vector.kind}, layers {vector.layers}) -> "
          + ", ".join(map(str, paths)))
    return paths


def save_feature_vector(run: RunDir, feature_text: str, operation: str) -> SteeringVector:
    """A feature's decoder row as a named vector (`<site>-<index>`), without loading the model."""
    feature = FeatureId.parse(feature_text)
    sae = load_sae(run, feature.site)
    if not 0 <= feature.index < sae.cfg.d_sae:
        raise SteeringError(f"unknown feature {feature}: the SAE at {feature.site} has features 0..{sae.cfg.d_sae - 1}")
    max_act = 1.0
    if operation == "add":
        max_act = float(max_activations(run, str(feature.site), sae)[0][feature.index])
        if max_act <= 0:
            raise SteeringError(f"feature {feature} never fired: there is no max activation to scale it by")
    model = {k: v for k, v in run.open_store().identity.items() if k not in ("data", "context_length")}
    vector = feature_vector(f"{feature.site}-{feature.index}", str(feature), sae.W_dec[feature.index].detach(),
                            max_act, operation, model)
    vector.save(run.root / "vectors")
    return vector


def evaluate(cfg: DictConfig):
    from features.steer_eval import run_eval

    return run_eval(cfg, steerer_for(cfg))


ACTIONS = {"generate": generate, "contrast": contrast, "project": project, "export": export, "eval": evaluate}


def run_action(action: str, cfg: DictConfig):
    RunDir.from_config(cfg).save_config(cfg, f"steer-{action}")
    return ACTIONS[action](cfg)


def main() -> None:
    action = sys.argv.pop(1) if len(sys.argv) > 1 and sys.argv[1] in ACTIONS else "generate"

    @hydra.main(config_path="../conf", config_name="steer", version_base=None)
    def app(cfg: DictConfig) -> None:
        with one_line_errors(f"steer {action}", *BAD_INPUT, StoreError):
            run_action(action, cfg)

    app()


if __name__ == "__main__":
    main()
