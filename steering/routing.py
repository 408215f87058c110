"""Steering experts: `op=route` interventions move a mixture-of-experts router's choice.

    route L5/E37 bias=+2.0     add 2 to expert 37's selection score at layer 5 (chosen more often)
    route L5/E37 force         always choose expert 37 at layer 5
    route L5/E37 off           never choose it
    {"op": "route", "expert": "L5/E37", "bias": 2.0}   (or "mode": "force" | "off")

The selection score is what DeepSeek-V4's learned router ranks, `score_fn(logits) +
e_score_correction_bias`: the steering bias is added beside the correction bias, so like it the
bias moves only the choice. The chosen experts' weights are the model's own: their scores
normalised to sum 1, times `routed_scaling_factor`. A hash-routed layer chooses by token id and
cannot be steered so. Several routes at one layer add up; they compose with feature and vector
interventions, which act at sites. Export: a per-layer x expert bias table (safetensors + JSON).
"""

from __future__ import annotations

import json
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file

from steering.interventions import SteeringError, finite_number, spec_fields

EXPERT_RE = re.compile(r"^L([0-9]+)/E([0-9]+)$")  # ASCII digits: \d takes any script's
MODES = ("bias", "force", "off")
ROUTE_FORMAT = "dialbox-expert-bias-v1"


@dataclass(frozen=True)
class Route:
    layer: int
    expert: int
    mode: str  # bias | force | off
    bias: float = 0.0

    @property
    def amount(self) -> float:
        """What it adds to the expert's selection score: force and off are +-infinity."""
        return {"bias": self.bias, "force": math.inf, "off": -math.inf}[self.mode]

    def __str__(self) -> str:
        return f"route L{self.layer}/E{self.expert} " + (f"bias={self.bias:+g}" if self.mode == "bias" else self.mode)


# A route's bare words: "route L5/E37 force" is {op: route, expert: L5/E37, mode: force}.
ROUTE_WORDS = {"route": ("op", "route"), "force": ("mode", "force"), "off": ("mode", "off")}


def is_route(spec) -> bool:
    """Whether an intervention (a string or a dict) is an expert route."""
    if isinstance(spec, DictConfig):
        spec = OmegaConf.to_container(spec)
    if isinstance(spec, dict):
        return spec.get("op") == "route" or "expert" in spec
    return isinstance(spec, str) and (spec.split()[:1] == ["route"] or "op=route" in spec.split())


def parse_route(spec) -> Route:
    """From "route L5/E37 bias=2", "L5/E37 op=route force" or {"op": "route", "expert": "L5/E37", "bias": 2}."""
    fields = spec_fields(spec, ROUTE_WORDS)
    if "target" in fields:
        fields["expert"] = fields.pop("target")
    unknown = sorted(set(fields) - {"op", "expert", "bias", "mode"})
    if unknown:
        raise SteeringError(f"unknown field {unknown[0]!r} in route {spec!r}: a route takes expert, bias, or force/off")
    match = EXPERT_RE.match(str(fields.get("expert", "")))
    if not match:
        raise SteeringError(f"bad expert {fields.get('expert')!r} in {spec!r}: write L<layer>/E<expert>, e.g. L5/E37")
    mode = fields.get("mode") or ("bias" if "bias" in fields else None)
    if mode not in MODES or (mode != "bias" and "bias" in fields):
        raise SteeringError(f"route {spec!r} needs one of bias=<number>, force or off")
    bias = finite_number(fields.get("bias", 0.0))
    if bias is None:
        raise SteeringError(f"bad bias {fields.get('bias')!r} in {spec!r}: give a finite number (force/off for always/never)")
    return Route(int(match.group(1)), int(match.group(2)), mode, bias)


def route_table(adapter, routes: list[Route]) -> dict[int, torch.Tensor]:
    """{layer: [n_experts] amounts added to the selection scores}, checked against the model."""
    tables: dict[int, torch.Tensor] = {}
    for route in routes:
        gate = adapter.gate(route.layer)
        if hasattr(gate, "tid2eid"):
            raise SteeringError(f"layer {route.layer} routes by a fixed token-id hash (tid2eid): {route} cannot move "
                                "it; steer a learned-router layer")
        if not 0 <= route.expert < gate.num_experts:
            raise SteeringError(f"unknown expert {route.expert} at layer {route.layer}: it has experts "
                                f"0..{gate.num_experts - 1}")
        table = tables.setdefault(route.layer, torch.zeros(gate.num_experts))
        table[route.expert] += route.amount
    for layer, table in tables.items():
        forced, free = int((table == math.inf).sum()), int((table != -math.inf).sum())
        top_k = adapter.gate(layer).top_k
        if table.isnan().any() or forced > top_k or free < top_k:
            raise SteeringError(f"the routes at layer {layer} contradict themselves or the router: force at most "
                                f"top_k={top_k} experts, leave at least {top_k} not off, and never force and off one")
    return tables


def resolve_routes(adapter, interventions) -> dict[int, torch.Tensor]:
    """The route tables of the expert routes among a list of interventions."""
    return route_table(adapter, [parse_route(spec) for spec in interventions if is_route(spec)])


@contextmanager
def routing(adapter, interventions):
    """Hooks that re-choose the steered layers' experts for the duration of the block."""
    handles = [adapter.gate(layer).register_forward_hook(_rechoose(table))
               for layer, table in resolve_routes(adapter, interventions).items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _rechoose(table: torch.Tensor):
    """A forward hook on a learned router: its choice again, with the table added to the selection
    scores, and the weights the router's own normalisation gives the new choice."""
    def hook(gate, args, output):
        logits, _, _ = output
        scores = gate.score_fn(logits)
        selection = scores + gate.e_score_correction_bias + table.to(scores.device, scores.dtype)
        ids = torch.topk(selection, gate.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, ids)
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return logits, weights * gate.routed_scaling_factor, ids

    return hook


def export_routes(adapter, identity: dict, interventions, name: str, out_dir: Path) -> list[Path]:
    """The native expert-bias file: float32 `bias` [n_layers, n_experts] (+inf force, -inf off, 0 untouched)
    added to the selection score before top-k, plus a JSON sidecar."""
    tables = resolve_routes(adapter, interventions)
    if not tables:
        raise SteeringError("no routes to export: pass e.g. 'export.routes=[\"route L5/E37 bias=2\"]'")
    n_experts = len(next(iter(tables.values())))
    bias = torch.zeros(identity["n_layers"], n_experts)
    for layer, table in tables.items():
        bias[layer] = table
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.experts.safetensors"
    save_file({"bias": bias}, str(path))
    sidecar = {"format": ROUTE_FORMAT, "name": name, "model": identity.get("model"),
               "model_type": identity.get("model_type"), "n_layers": identity["n_layers"], "n_experts": n_experts,
               "layers": sorted(tables), "routes": [str(parse_route(s)) for s in interventions if is_route(s)],
               "meaning": "bias[l, e] is added to expert e's selection score (score + e_score_correction_bias) at "
                          "layer l before top-k; +inf always selects, -inf never; gate weights keep the model's "
                          "normalisation"}
    path.with_suffix(".json").write_text(json.dumps(sidecar, indent=2) + "\n")
    return [path, path.with_suffix(".json")]
