"""Named steering vectors: one direction per layer at one site kind, with the operation they mean.

A vector lives in `runs/<run>/vectors/<name>.safetensors` (one tensor per site, e.g.
`L15.resid_post`) plus `<name>.json` (site kind, operation, units, model, layers, source).
It is built from contrasting prompts (`contrast_vector`, the simple method) or from an SAE
feature's decoder row (`feature_vector`), can be projected onto an SAE's features
(`nearest_features`) and exported for ds4 (`export_ds4`) or llama.cpp (`export_gguf`).

The operation travels with the vector: `add` rows are added as stored (h += scale * row);
`project` rows are unit directions used as ds4 does (h -= s * v (v . h)). Nothing here turns one
into the other; an export that needs the other operation refuses.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pipeline.sites import SITE_KINDS, Site

FORMAT = "dialbox-steering-vector-v1"
DS4_FORMAT = "ds4-directional-steering-v1"
DS4_KINDS = ("ffn_out", "attn_out")  # where ds4 applies its directions, before the hyper-connection expand
OPERATIONS = ("add", "project")  # clamp needs an SAE, so it is an intervention on a feature, never a vector
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class VectorError(ValueError):
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

    def __post_init__(self):
        check_name(self.name)
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
                "norms": [round(float(v.norm()), 6) for v in self.directions.values()], "source": self.source}

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
        return cls(name, meta["site"], meta["operation"], meta["units"], directions, meta["model"], meta["source"])


def check_name(name: str) -> None:
    if not _NAME_RE.match(str(name)):
        raise VectorError(f"bad vector name {name!r}: use letters, digits, '_', '-' and '.', e.g. terse")


def check_fits(vector: SteeringVector, model: dict) -> None:
    """Refuse a vector made on another model (by name or width)."""
    if (vector.model.get("model"), vector.model.get("d_model")) != (model.get("model"), model.get("d_model")):
        raise VectorError(f"vector {vector.name} was made on {vector.model.get('model')} (d_model "
                          f"{vector.model.get('d_model')}), not on {model.get('model')} (d_model {model.get('d_model')}): "
                          "rebuild it on this model")


# --- building vectors ------------------------------------------------------------------------


def prompt_rows(adapter, prompts: list[torch.Tensor], sites: list[Site], where: str) -> dict:
    """{site: [n_prompts, width]}: each prompt's row at its last token (`last`) or averaged (`mean`).

    prompts: token ids [seq] each. One prompt per forward: no padding, so every prompt sees
    exactly its own positions.
    """
    if where not in ("last", "mean"):
        raise VectorError(f"contrast.where={where!r}: use last (the last prompt token, as ds4 does) or mean")
    rows = {site: [] for site in sites}
    for ids in prompts:
        captured = adapter.capture(sites, ids[None])
        for site in sites:
            x = captured[site][0].float()
            rows[site].append(x[-1] if where == "last" else x.mean(dim=0))
    return {site: torch.stack(r) for site, r in rows.items()}


def contrast_vector(name: str, adapter, positives: list[torch.Tensor], negatives: list[torch.Tensor], kind: str,
                    layers: list[int], where: str = "last", orthogonalize: bool = False, operation: str = "add",
                    source: dict | None = None) -> SteeringVector:
    """Mean(positive rows) - mean(negative rows) per layer; prompts are token ids [seq] each.

    orthogonalize: remove from each difference its component along the negative mean, so the
    vector does not simply rescale what every prompt already has.
    operation=project stores unit directions for ds4-style projection instead of the raw difference.
    """
    if not positives or not negatives:
        raise VectorError("contrastive vectors need positive and negative prompts: give contrast.suffix or two files")
    sites = [Site(layer, kind) for layer in layers]
    for site in sites:
        adapter.site(site)  # validates layer and kind against the model
    pos = prompt_rows(adapter, positives, sites, where)
    neg = prompt_rows(adapter, negatives, sites, where)
    directions = {}
    for site in sites:
        diff, neg_mean = pos[site].mean(0) - neg[site].mean(0), neg[site].mean(0)
        if orthogonalize:
            unit = neg_mean / neg_mean.norm().clamp_min(1e-12)
            diff = diff - (diff @ unit) * unit
        directions[site.layer] = unit_rows(diff) if operation == "project" else diff
    info = {"method": "contrast", "where": where, "orthogonalize": orthogonalize, "n_positive": len(positives),
            "n_negative": len(negatives), **(source or {})}
    return SteeringVector(name, kind, operation, "fraction" if operation == "project" else "raw", directions,
                          adapter.describe(), info)


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


# --- exports ---------------------------------------------------------------------------------


def export_native(vector: SteeringVector, out_dir: Path) -> list[Path]:
    path = vector.save(out_dir)
    return [path, path.with_suffix(".json")]


def export_ds4(vector: SteeringVector, out_dir: Path) -> list[Path]:
    """ds4's headerless float32 [n_layers, d_model] file (unit rows, zero rows for untouched layers)
    plus its JSON sidecar."""
    if vector.kind not in DS4_KINDS:
        raise VectorError(f"ds4 steers only at ffn_out or attn_out (before the hyper-connection expand); vector "
                          f"{vector.name} is at {vector.kind}: build it at ffn_out (contrast.site_kind=ffn_out)")
    if vector.operation != "project":
        raise VectorError(f"ds4 applies y -= s*v(v.y) (project) and vector {vector.name} is `add`: an export would "
                          "change its meaning; build it with operation=project")
    n_layers, d_model = vector.model["n_layers"], vector.model["d_model"]
    table = np.zeros((n_layers, d_model), dtype="<f4")
    for layer, v in vector.directions.items():
        table[layer] = unit_rows(v).numpy()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{vector.name}.ds4.f32"
    table.tofile(path)
    flag = "--dir-steering-ffn" if vector.kind == "ffn_out" else "--dir-steering-attn"
    sidecar = {"format": DS4_FORMAT, "n_layers": n_layers, "d_model": d_model, "dtype": "float32",
               "site": vector.kind, "layers": vector.layers, "model": vector.model.get("model"),
               "name": vector.name, "source": vector.source,
               "usage": f"ds4 --dir-steering-file {path.name} {flag} S  (S=1 removes the direction, S<0 amplifies it)"}
    path.with_suffix(".json").write_text(json.dumps(sidecar, indent=2) + "\n")
    return [path, path.with_suffix(".json")]


def export_gguf(vector: SteeringVector, out_dir: Path) -> list[Path]:
    """A llama.cpp control vector: tensor `direction.<i>` is added to the output of layer i."""
    import gguf

    if vector.operation != "add" or vector.kind != "resid_post":
        raise VectorError(f"llama.cpp control vectors are added to each layer's output (add at resid_post); vector "
                          f"{vector.name} is {vector.operation} at {vector.kind}: build an add vector at resid_post")
    if vector.model.get("family") == "deepseek_v4":
        raise VectorError("llama.cpp control vectors add to one residual vector; DeepSeek-V4's residual is "
                          "hyper-connection streams: export it for ds4 (export.format=ds4) instead")
    if 0 in vector.directions:
        raise VectorError(f"vector {vector.name} has a direction at layer 0, which llama.cpp cannot steer: "
                          "build it without layer 0 (e.g. contrast.layers=[1,...])")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{vector.name}.gguf"
    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", vector.model.get("model_type", ""))
    writer.add_uint32("controlvector.layer_count", len(vector.directions))
    for layer, v in vector.directions.items():
        writer.add_tensor(f"direction.{layer}", v.numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return [path]


EXPORTS = {"native": export_native, "ds4": export_ds4, "gguf": export_gguf}
