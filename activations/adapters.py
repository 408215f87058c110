"""Hook sites: where each site kind (docs/guide.md, "Sites") lives inside a loaded model.

A `HookSite` names one module, whether the site's vector is that module's input or output, and
how to read rows `[batch, seq, width]` out of that value and write new rows back into it. On
top of that, `ModelAdapter.hooks` runs any function on a site's rows during a forward (reading
for harvest, replacing for steering and SAE splicing), and `ModelAdapter.capture` collects
sites and stops the forward as soon as the last of them has been produced.

Two block families:
  llama        Llama / Mistral / Qwen-style pre-norm blocks: one residual vector per token.
  deepseek_v4  hyper-connection blocks: the residual is `hc_mult` streams `[b, s, hc, d]`; each
               sub-layer reads a learned mix of them (`collapsed`) and its output is spread back.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

import torch
from einops import rearrange, reduce
from torch import nn

from activations.config import ModelConfig
from activations.routing import gate_spec, reading_routes
from activations.store.format import router_key
from activations.sites import Site, SiteError
from activations.errors import ConfigError

FAMILIES = ("llama", "deepseek_v4")
# model_type -> family, for models whose blocks have the Llama layout
# (input_layernorm -> self_attn -> residual add -> post_attention_layernorm -> mlp -> residual add).
MODEL_TYPE_FAMILIES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "deepseek_v4": "deepseek_v4",
}

Rows = torch.Tensor  # [batch, seq, width]


@dataclass
class HookSite:
    """One site of one loaded model.

    value: the module's input hidden states (on_input) or its whole output (a tensor or a tuple).
    read(value) -> rows [batch, seq, width]; write(value, rows) -> the value with those rows in it.
    """

    site: Site
    module: nn.Module
    on_input: bool
    width: int
    read: Callable[[Any], Rows]
    write: Callable[[Any, Rows], Any]


# Readers and writers shared by both families.
def _whole(value):
    return value


def _replace(value, rows):
    return rows.to(value.dtype)


def _first(value):  # an attention output (out, weights), or a layer output that may be a tuple
    return value[0] if isinstance(value, tuple) else value


def _replace_first(value, rows):
    if isinstance(value, tuple):
        return (rows.to(value[0].dtype), *value[1:])
    return rows.to(value.dtype)


class ModelAdapter:
    family = ""

    def __init__(self, model: nn.Module, cfg: ModelConfig):
        self.model = model
        self.cfg = cfg
        self.layers = model.model.layers
        self.loaded_layers = len(self.layers)
        # load_model(max_layer=...) may have built only the first blocks; sites are still named
        # and validated against the real model.
        self.n_layers = getattr(model.config, "dialbox_total_layers", self.loaded_layers)
        self.d_model = model.config.hidden_size

    def site(self, site: Site | str) -> HookSite:
        site = Site.parse(site) if isinstance(site, str) else site
        site.check(self.n_layers)
        if site.layer >= self.loaded_layers:
            raise SiteError(
                f"{site} is beyond the loaded layers 0..{self.loaded_layers - 1}: the model was loaded "
                f"truncated; load it with max_layer >= {site.layer}"
            )
        return self._hook_site(site, self.layers[site.layer])

    def width(self, site: Site | str) -> int:
        return self.site(site).width

    def describe(self) -> dict:
        """What a store or an SAE records about the model its rows come from."""
        return {
            "model": self.cfg.name,
            "family": self.family,
            "model_type": self.model.config.model_type,
            "d_model": self.d_model,
            "n_layers": self.n_layers,
        }

    def _hook_site(self, site: Site, layer: nn.Module) -> HookSite:
        raise NotImplementedError

    def gate(self, layer: int) -> nn.Module:
        """The router of a mixture-of-experts layer (activations/routing.py)."""
        raise ConfigError(f"model {self.cfg.name} ({self.family} family) has no router: expert routing exists only "
                          "in mixture-of-experts models such as model.family=deepseek_v4; drop harvest.router")

    def router_layout(self, layers) -> dict[int, dict]:
        """{layer: {"top_k", "n_experts", "hashed"}} of routed layers, as a store records them."""
        return {layer: gate_spec(self.gate(layer)) for layer in layers}

    @contextmanager
    def hooks(self, fns: dict):
        """Run fns[site](rows) at each site during forwards inside this block.

        A function that returns None only reads; one that returns rows replaces the site's
        value with them (the rest of the forward then sees the new value).
        """
        handles = []
        try:
            for site, fn in fns.items():
                handles.append(_register(self.site(site), fn))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def capture(self, sites, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                routes=()) -> dict:
        """Return {site: rows [batch, seq, width]} for one forward over input_ids, and for each layer
        in `routes` its router's choice, {router.L<layer>.ids / .weights: [batch * seq, top_k]}.

        The forward stops once everything asked for has been produced: later layers and the LM head never run.
        """
        sites = {Site.parse(s) if isinstance(s, str) else s for s in sites}
        if not sites:
            raise SiteError("capture needs at least one site, e.g. [L15.resid_post]")
        gates = {layer: self.gate(layer) for layer in routes}
        captured = {}
        wanted = len(sites) + 2 * len(gates)

        def stop_when_complete():
            if len(captured) == wanted:
                raise _StopForward

        def store(site):
            def fn(rows):
                captured[site] = rows.clone()  # the capture owns its rows, not a view into the forward
                stop_when_complete()

            return fn

        def store_route(layer, ids, weights):
            captured[router_key(layer, "ids")], captured[router_key(layer, "weights")] = ids, weights
            stop_when_complete()

        # Inputs go where the embeddings are (the first GPU when a device_map spreads the model).
        device = self.model.get_input_embeddings().weight.device
        if attention_mask is not None:
            attention_mask = attention_mask.to(device)
        with torch.inference_mode(), self.hooks({site: store(site) for site in sites}), \
                reading_routes(gates, store_route):
            try:
                self.model(input_ids=input_ids.to(device), attention_mask=attention_mask, use_cache=False)
            except _StopForward:
                pass
        missing = sorted(str(s) for s in sites - captured.keys()) + [f"router L{layer}" for layer in gates
                                                                     if router_key(layer, "ids") not in captured]
        if missing:
            raise RuntimeError(f"the forward never reached sites {missing}: is the adapter family right?")
        return captured


class _StopForward(Exception):
    """Raised from a hook to end a forward once every requested site has been captured."""


def _register(hook_site: HookSite, fn):
    def run(value):
        """fn's replacement rows for this value, or None when fn only reads."""
        rows = hook_site.read(value)
        new_rows = fn(rows)
        if new_rows is not None and new_rows.shape != rows.shape:
            raise SiteError(
                f"a hook at {hook_site.site} returned rows of shape {tuple(new_rows.shape)}: "
                f"it must return the shape it was given, {tuple(rows.shape)}"
            )
        return new_rows

    if hook_site.on_input:
        # Blocks and norms get their hidden states as the first positional argument or as the
        # `hidden_states` keyword, depending on the caller.
        def pre_hook(module, args, kwargs):
            value = args[0] if args else kwargs["hidden_states"]
            rows = run(value)
            if rows is None:
                return None
            value = hook_site.write(value, rows)
            if args:
                return (value, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": value}

        return hook_site.module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def hook(module, args, output):
        rows = run(output)
        return None if rows is None else hook_site.write(output, rows)

    return hook_site.module.register_forward_hook(hook)


class LlamaAdapter(ModelAdapter):
    family = "llama"

    def _hook_site(self, site: Site, layer: nn.Module) -> HookSite:
        # kind -> (module, the vector is its input?, read, write)
        where = {
            "resid_pre": (layer, True, _whole, _replace),
            "resid_post": (layer, False, _first, _replace_first),
            "attn_in": (layer.input_layernorm, True, _whole, _replace),
            "attn_out": (layer.self_attn, False, _first, _replace_first),
            "ffn_in": (layer.post_attention_layernorm, True, _whole, _replace),
            "ffn_out": (layer.mlp, False, _whole, _replace),
        }
        module, on_input, read, write = where[site.kind]
        return HookSite(site, module, on_input, self.d_model, read, write)


class DeepseekV4Adapter(ModelAdapter):
    family = "deepseek_v4"

    def __init__(self, model: nn.Module, cfg: ModelConfig):
        super().__init__(model, cfg)
        self.hc_mult = model.config.hc_mult
        self.hc_reduce = cfg.hc_reduce
        self._reduce, self._expand, self._resid_width = self._stream_reduction(cfg.hc_reduce)

    def describe(self) -> dict:
        return {**super().describe(), "hc_mult": self.hc_mult, "hc_reduce": self.hc_reduce}

    def _stream_reduction(self, hc_reduce: str):
        """(read, write, width) turning the streams [b, s, hc, d] into rows and back."""
        d, hc = self.d_model, self.hc_mult
        if hc_reduce == "mean":
            def mean(streams):
                return reduce(streams, "b s hc d -> b s d", "mean")

            # Writing adds the same correction to every stream, so the mean becomes the new rows
            # and the differences between streams are kept.
            def spread(streams, rows):
                return streams + rearrange(rows.to(streams.dtype) - mean(streams), "b s d -> b s 1 d")

            return mean, spread, d
        if hc_reduce == "concat":
            def concat(streams):
                return rearrange(streams, "b s hc d -> b s (hc d)")

            def split(streams, rows):
                return rearrange(rows.to(streams.dtype), "b s (hc d) -> b s hc d", hc=hc)

            return concat, split, hc * d
        if hc_reduce.startswith("stream") and hc_reduce[6:].isdigit() and int(hc_reduce[6:]) < hc:
            k = int(hc_reduce[6:])

            def replace_stream(streams, rows):
                streams = streams.clone()
                streams[:, :, k] = rows.to(streams.dtype)
                return streams

            return (lambda streams: streams[:, :, k]), replace_stream, d
        raise ConfigError(
            f"bad hc_reduce {hc_reduce!r}: valid values are mean, concat, stream0..stream{hc - 1} "
            f"(this model has {hc} streams)"
        )

    def _hook_site(self, site: Site, layer: nn.Module) -> HookSite:
        # attn_hc / ffn_hc return (post, comb, collapsed); collapsed is what the sub-layer reads.
        def collapsed(value):
            return value[2]

        def replace_collapsed(value, rows):
            post, comb, old = value
            return post, comb, rows.to(old.dtype)

        d = self.d_model
        where = {
            "resid_pre": (layer, True, self._reduce, self._expand, self._resid_width),
            "resid_post": (layer, False, self._reduce, self._expand, self._resid_width),
            "attn_in": (layer.attn_hc, False, collapsed, replace_collapsed, d),
            "attn_out": (layer.self_attn, False, _first, _replace_first, d),
            "ffn_in": (layer.ffn_hc, False, collapsed, replace_collapsed, d),
            "ffn_out": (layer.mlp, False, _whole, _replace, d),
        }
        module, on_input, read, write, width = where[site.kind]
        return HookSite(site, module, on_input, width, read, write)

    def gate(self, layer: int) -> nn.Module:
        if not 0 <= layer < self.loaded_layers:
            raise SiteError(f"layer {layer} has no loaded router: the model has layers 0..{self.loaded_layers - 1} "
                            "loaded")
        return self.layers[layer].mlp.gate


ADAPTERS = {"llama": LlamaAdapter, "deepseek_v4": DeepseekV4Adapter}


def make_adapter(model: nn.Module, cfg: ModelConfig) -> ModelAdapter:
    """The adapter for a model loaded by activations.models.load_model from cfg."""
    model_type = model.config.model_type
    detected = MODEL_TYPE_FAMILIES.get(model_type)
    if cfg.family not in FAMILIES:
        raise ConfigError(f"unknown model.family {cfg.family!r}: use one of {', '.join(FAMILIES)}")
    if detected and detected != cfg.family:
        raise ConfigError(
            f"model.family={cfg.family} but the loaded model is a {model_type}: set model.family={detected}"
        )
    # An unknown model_type is trusted to have the block layout of the family the config names.
    return ADAPTERS[cfg.family](model, cfg)
