"""Named steering vectors: one direction per layer at one site kind, with the operation they mean.

A vector lives in `runs/<run>/vectors/<name>.safetensors` (one tensor per site, e.g.
`L15.resid_post`) plus `<name>.json` (site kind, operation, units, model, layers, source).
It is built from contrasting prompts (steering/contrast.py, the simple method) or from an SAE
feature's decoder row (`feature_vector`), can be projected onto an SAE's features
(`nearest_features`) and exported for ds4 or llama.cpp (steering/exports.py).

The operation travels with the vector: `add` rows are added as stored (h += scale * row);
`project` rows are unit directions used as ds4 does (h -= s * v (v . h)). Nothing here turns one
into the other; an export that needs the other operation refuses.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from activations.errors import DialboxError
from activations.rundir import RunDir
from activations.sites import SITE_KINDS, FeatureId, Site
from features.tables import feature_labels
from steering.interventions import POSITIONS

FORMAT = "dialbox-steering-vector-v1"
OPERATIONS = ("add", "project")  # clamp needs an SAE, so it is an intervention on a feature, never a vector
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class VectorError(DialboxError, ValueError):
    """A vector that does not exist, does not fit the model, or cannot go where it was asked to."""


@dataclass
class SteeringVector:
    name: str
    kind: str  # the site kind of every row, e.g. resid_post
    operation: str  # add | project
    # What scale 1 means: `raw` (the row as stored), `max_act` (an SAE feature at its max activation)
    # or `fraction` (project: ds4's s, the share of the component along v that is removed).
    units: str
    directions: dict[int, torch.Tensor]  # layer -> [d_model] float32
    model: dict  # the adapter's describe(): name, family, model_type, d_model, n_layers
    source: dict = field(default_factory=dict)  # how it was made: method, prompts, feature IDs
    # Where it acts when an intervention does not say: all, or prompt for a dial tuned on the prompt's rows
    positions: str = "all"

    def __post_init__(self):
        check_name(self.name)
        if self.positions not in POSITIONS:
            raise VectorError(f"vector {self.name}: positions {self.positions!r} is not one of {', '.join(POSITIONS)}")
        if self.kind not in SITE_KINDS:
            raise VectorError(f"vector {self.name}: unknown site kind {self.kind!r}; use one of {', '.join(SITE_KINDS)}")
        if self.operation not in OPERATIONS:
            raise VectorError(f"vector {self.name}: operation {self.operation!r} is not one of {', '.join(OPERATIONS)}")
        if not self.directions:
            raise VectorError(f"vector {self.name} has no layers")
        self.directions = {int(l): v.detach().float().cpu() for l, v in sorted(self.directions.items())}

    @property
    def layers(self) -> list[int]:
        return list(self.directions)

    def site(self, layer: int) -> Site:
        return Site(layer, self.kind)

    def metadata(self) -> dict:
        return {"format": FORMAT, "name": self.name, "site": self.kind, "sites": [str(self.site(l)) for l in self.layers],
                "operation": self.operation, "units": self.units, "layers": self.layers, "model": self.model,
                "norms": [round(float(v.norm()), 6) for v in self.directions.values()], "source": self.source,
                "positions": self.positions}

    def save(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        save_file({str(self.site(l)): v.contiguous() for l, v in self.directions.items()},
                  directory / f"{self.name}.safetensors")
        (directory / f"{self.name}.json").write_text(json.dumps(self.metadata(), indent=2) + "\n")
        return directory / f"{self.name}.safetensors"

    @classmethod
    def load(cls, directory: Path, name: str) -> "SteeringVector":
        check_name(name)
        meta_path = directory / f"{name}.json"
        if not meta_path.exists():
            known = sorted(p.stem for p in directory.glob("*.json")) if directory.is_dir() else []
            raise VectorError(f"no vector named {name!r} in {directory} (known: {', '.join(known) or 'none'}): "
                              "build one with `python -m pipeline.steer contrast contrast.name=...`")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT:
            raise VectorError(f"{meta_path} is not a Dialbox vector (format {meta.get('format')!r})")
        tensors = load_file(directory / f"{name}.safetensors")
        directions = {Site.parse(s).layer: t for s, t in tensors.items()}
        return cls(name, meta["site"], meta["operation"], meta["units"], directions, meta["model"], meta["source"],
                   meta.get("positions", "all"))


def check_name(name: str) -> None:
    if not _NAME_RE.match(str(name)):
        raise VectorError(f"bad vector name {name!r}: use letters, digits, '_', '-' and '.', e.g. terse")


def check_fits(vector: SteeringVector, model: dict) -> None:
    """Refuse a vector made on another model (by name or width)."""
    if (vector.model.get("model"), vector.model.get("d_model")) != (model.get("model"), model.get("d_model")):
        raise VectorError(f"vector {vector.name} was made on {vector.model.get('model')} (d_model "
                          f"{vector.model.get('d_model')}), not on {model.get('model')} (d_model {model.get('d_model')}): "
                          "rebuild it on this model")


def feature_vector(name: str, feature_id: str, decoder_row: torch.Tensor, max_act: float, operation: str,
                   model: dict) -> SteeringVector:
    """A feature's decoder row as a vector: `add` rows are scaled to the feature's max activation
    (scale 1 = the feature at its max), `project` rows are the unit direction."""
    site = Site.parse(feature_id.rpartition("/")[0])
    row = unit_rows(decoder_row) if operation == "project" else decoder_row * max_act
    units = "fraction" if operation == "project" else "max_act"
    return SteeringVector(name, site.kind, operation, units, {site.layer: row}, model,
                          {"method": "feature", "features": [feature_id], "max_act": max_act})


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def nearest_features(direction: torch.Tensor, W_dec: torch.Tensor, top: int = 10) -> list[tuple[int, float]]:
    """The SAE features whose decoder directions point most along `direction`: (index, cosine)."""
    cosines = unit_rows(W_dec.float()) @ unit_rows(direction.float().to(W_dec.device))
    values, indices = cosines.topk(min(top, len(cosines)))
    return [(int(i), float(v)) for i, v in zip(indices, values)]


def describe_nearest(run: RunDir, sae_site: Site, direction: torch.Tensor, top: int, what: str) -> str:
    """The SAE features nearest a direction, one a line, with labels when the label stage has run."""
    sae = run.load_sae(sae_site)
    labels = feature_labels(run, str(sae_site))
    lines = [f"features of the SAE at {sae_site} nearest {what} (decoder cosine):"]
    for index, cosine in nearest_features(direction, sae.W_dec.detach(), top):
        lines.append(f"  {sae_site}/{index:<8} {cosine:+.3f}  {labels.get(index, '')}".rstrip())
    return "\n".join(lines)


def target_directions(run: RunDir, target: str, layer: int | None = None) -> tuple[dict[int, torch.Tensor], str]:
    """({layer: direction}, site kind) of a feature ID's decoder row or a saved vector's rows; `layer` keeps one."""
    if "/" in target:
        feature = FeatureId.parse(target)
        directions = {feature.site.layer: run.load_sae(feature.site).W_dec[feature.index].detach()}
        kind = feature.site.kind
    else:
        vector = SteeringVector.load(run.vectors, target)
        directions, kind = vector.directions, vector.kind
    if layer is not None:
        if layer not in directions:
            raise VectorError(f"{target} has no direction at layer {layer}: it has {sorted(directions)}")
        directions = {layer: directions[layer]}
    return directions, kind
