"""Mixture-of-experts routing: which layers route, and their choices read out of a forward.

DeepSeek-V4's `mlp.gate` returns `(logits, weights, indices)` for the flattened tokens: the ids
`[tokens, top_k]` of the experts it chose and their gate weights (the chosen scores normalised to
sum 1, times `routed_scaling_factor`), exactly what the experts are then weighted by. Learned
layers choose by `topk(score_fn(logits) + e_score_correction_bias)` (the bias moves the choice
only); hash layers (`mlp_layer_types: hash_moe`) choose by the frozen table `tid2eid[token id]`
and weight by the same normalised scores. Harvest reads the choices from the gate's own output
with a forward hook: nothing is recomputed.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
from torch import nn

from activations.errors import ConfigError
from activations.sites import Site

# Ids are stored as int16.
MAX_EXPERTS = 2**15


def gate_spec(gate: nn.Module) -> dict:
    """What a store records about one routed layer."""
    if gate.num_experts > MAX_EXPERTS:
        raise ConfigError(f"{gate.num_experts} experts do not fit the store's int16 expert ids (at most {MAX_EXPERTS})")
    return {"top_k": int(gate.top_k), "n_experts": int(gate.num_experts), "hashed": hasattr(gate, "tid2eid")}


def router_layers(router: bool, layers, sites: list[Site], n_layers: int) -> list[int]:
    """The layers whose routing a harvest stores: `layers` as given, else (router=true) every layer
    up to the deepest site's, else none."""
    chosen = sorted({int(layer) for layer in layers}) if layers else []
    if not chosen and router:
        chosen = list(range(max(site.layer for site in sites) + 1))
    bad = [layer for layer in chosen if not 0 <= layer < n_layers]
    if bad:
        raise ConfigError(f"harvest.router_layers has layer {bad[0]}: this model has layers 0..{n_layers - 1}")
    return chosen


def heaviest_first(ids: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A token's chosen experts ordered by gate weight, heaviest first (topk leaves the order to
    the device), so stores from any device agree; ties keep the gate's order."""
    order = weights.argsort(dim=-1, descending=True, stable=True)
    return ids.gather(-1, order).to(torch.int16), weights.gather(-1, order)


@contextmanager
def reading_routes(gates: dict[int, nn.Module], fn: Callable[[int, torch.Tensor, torch.Tensor], None]):
    """Call fn(layer, ids, weights) with each gate's choice ([tokens, top_k], heaviest first) in
    every forward inside this block."""
    def hook_for(layer):
        def hook(module, args, output):
            _, weights, ids = output
            fn(layer, *heaviest_first(ids, weights))

        return hook

    handles = [gate.register_forward_hook(hook_for(layer)) for layer, gate in gates.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
