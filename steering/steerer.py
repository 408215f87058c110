"""The Steerer: a model, its run's SAEs and vectors, and generation under interventions
(steering/interventions.py says what an intervention is).

    steerer = Steerer("runs/demo")
    steerer.generate("Tell me about dogs.", ["L15.resid_post/1234 scale=4"])
    steerer.generate("Tell me about dogs.", [{"vector": "terse", "scale": 2, "layers": [12]}])
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from activations.adapters import make_adapter
from activations.errors import DialboxError
from activations.models import load_model
from activations.rundir import RunDir
from activations.sites import FeatureId, Site
from activations.store import StoreError
from steering.conditions import Gates, check_order
from steering.interventions import Condition, Edit, Intervention, SteeringError, site_hook
from steering.feature_vectors import max_activations
from steering.routing import is_route, resolve_routes, routing
from steering.vectors import SteeringVector, check_fits, unit_rows

# Every kind of bad input a request can carry: the CLI prints it in one line, the server answers 400.
BAD_INPUT = (DialboxError,)

# A feature intervention without a scale, when the feature has no calibrated setting: (scale, units).
# Set from make steer-features on the demo SAE (10 random live features, 16 dev prompts): add at
# 0.25 / 0.5 / 1 x the mean row norm raised the answers' median perplexity 1.4x / 3.8x / 18x over
# unsteered, clamp at 4 / 8 x max activation 3.7x / 9.6x (docs/guide.md §7). Hugging Face's study of
# steering Llama put the best add at half the norm; on SmolLM2 that is past the 2x limit.
DEFAULT_SETTING = {"add": (0.25, "norm"), "clamp": (2.0, "max_act"), "project": (1.0, None)}


def tuned_dial_name(feature: FeatureId) -> str:
    """The name of a feature's tuned dial in the run's vectors/."""
    return f"{feature.site}-{feature.index}-tuned"


def encode_prompt(tokenizer, prompt, chat: bool) -> torch.Tensor:
    """Token ids [seq] of a prompt (a string, or chat messages), through the chat template when chat."""
    if chat:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return torch.tensor(tokenizer(text, add_special_tokens=False).input_ids)
    if not isinstance(prompt, str):
        raise SteeringError("chat messages need a chat model: this tokenizer has no chat template")
    return torch.tensor(tokenizer(prompt).input_ids)


@dataclass
class Generation:
    text: str
    tokens: list[int]  # the new tokens, up to and without the end-of-turn token
    prompt_tokens: int
    finish_reason: str  # stop (end of turn or a stop string) | length


class Steerer:
    """A model, its run's SAEs and vectors, and generation under interventions.

    One generation runs at a time (hooks belong to the model, not to a request; the lock), so one
    Steerer can serve several threads; steering/batching.py runs many requests as one generation.
    """

    def __init__(self, run_dir, model_cfg=None, max_act_rows: int = 16384):
        self.run = run_dir if isinstance(run_dir, RunDir) else RunDir.at(run_dir)
        self.model_cfg = self.run.model_config(model_cfg)
        self.model, self.tokenizer = load_model(self.model_cfg)
        self.adapter = make_adapter(self.model, self.model_cfg)
        self.identity = self.adapter.describe()
        self.chat_default = bool(self.tokenizer.chat_template)
        if self.tokenizer.pad_token is None:  # pad with the end of turn, as generate does for a model without a pad
            self.tokenizer.pad_token = self.tokenizer.convert_ids_to_tokens(self.eos_ids[0])
        self.max_act_rows = max_act_rows
        # Where max activations came from (per site) and which calibrated settings were used (per feature):
        # an ordered set, each said once however many requests meet it again.
        self.notes: dict[str, None] = {}
        self.lock = threading.Lock()
        self._saes: dict[str, object] = {}
        self._max_acts: dict[str, torch.Tensor] = {}
        self._mean_norms: dict[str, float] = {}
        self._calibrations: dict[str, dict] = {}

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    # -- resolving interventions --------------------------------------------------------------

    def sae(self, site: Site):
        key = str(site)
        if key not in self._saes:
            self._saes[key] = self.run.load_sae(key, self.device)
        return self._saes[key]

    def max_act(self, site: Site, index: int) -> float:
        key = str(site)
        if key not in self._max_acts:
            self._max_acts[key], source = max_activations(self.run, key, self.sae(site), self.max_act_rows)
            self.notes[f"max activations at {key} from {source}"] = None
        value = float(self._max_acts[key][index])
        if value <= 0:
            raise SteeringError(f"feature {site}/{index} never fired (max activation 0), so units=max_act has no "
                                "meaning for it: pass units=raw or pick another feature")
        return value

    def mean_norm(self, site: Site) -> float:
        """The typical norm of a row at the site (the store's mean), the yardstick of units=norm."""
        key = str(site)
        if key not in self._mean_norms:
            try:
                self._mean_norms[key] = float(self.run.open_store().stats(key)["mean_norm"])
            except StoreError as e:
                raise SteeringError(f"units=norm needs the run's stored activations at {key} ({e}): "
                                    "pass units=max_act or raw") from None
        return self._mean_norms[key]

    def unit(self, feature: FeatureId, units: str, row: torch.Tensor) -> float:
        """What scale 1 means for a feature's add or clamp: its max activation, the activation that
        moves a row by the site's mean norm, or 1."""
        if units == "max_act":
            return self.max_act(feature.site, feature.index)
        if units == "norm":
            return self.mean_norm(feature.site) / float(row.norm().clamp_min(1e-12))
        return 1.0

    def setting(self, feature: FeatureId, iv: Intervention) -> tuple[str, float, str | None, str]:
        """(op, scale, units, positions) of a feature intervention. Without a scale: the setting the feature's
        steering evaluation chose (features.parquet), else the default for the op."""
        if iv.scale is not None:
            op = iv.op or "add"
            return op, iv.scale, iv.units or (None if op == "project" else "max_act"), iv.positions or "all"
        calibrated = self.calibrated(feature)
        if calibrated and iv.op in (None, calibrated[0]) and iv.units in (None, calibrated[2]):
            op, scale, units, positions = calibrated
            self.notes[f"{feature}: the calibrated setting op={op} scale={scale:g} units={units} "
                       f"positions={positions} (make steer-features)"] = None
            return op, scale, units, iv.positions or positions
        op = iv.op or "add"
        scale, units = DEFAULT_SETTING[op]
        return op, scale, iv.units or units, iv.positions or "all"

    def calibrated(self, feature: FeatureId) -> tuple[str, float, str, str] | None:
        """The decoder dial's setting make steer-features chose for the feature, if it evaluated it."""
        op, scale, units, positions, _ = self._steer_columns(feature.site).get(feature.index, (None,) * 5)
        return (op, float(scale), units, positions or "all") if op and scale is not None and units else None

    def dial(self, feature: FeatureId, iv: Intervention) -> str:
        """The dial an intervention steers with: the one it names; else, when it sets nothing else, the
        feature's best dial as make steer-features measured it; else the decoder row."""
        if iv.dial is not None:
            return iv.dial
        best = self._steer_columns(feature.site).get(feature.index, (None,) * 5)[4]
        if best == "tuned" and (iv.op, iv.scale, iv.units) == (None, None, None):
            self.notes[f"{feature}: its tuned dial, its best (make steer-features); dial=decoder for the "
                       "decoder row"] = None
            return "tuned"
        return "decoder"

    def _steer_columns(self, site: Site) -> dict[int, tuple]:
        """{feature: (steer_op, steer_scale, steer_units, steer_positions, steer_dial)} from features.parquet,
        read once (a table from before steer_positions gives None there: all positions)."""
        key = str(site)
        if key not in self._calibrations:
            names = ["steer_op", "steer_scale", "steer_units", "steer_positions", "steer_dial"]
            columns = self.run.feature_table(key, ["index", *names]) or {}
            self._calibrations[key] = {i: tuple(columns.get(n, [None] * len(columns["index"]))[k] for n in names)
                                       for k, i in enumerate(columns.get("index", []))}
        return self._calibrations[key]

    def vector(self, name: str) -> SteeringVector:
        vector = SteeringVector.load(self.run.vectors, name)
        check_fits(vector, self.identity)
        return vector

    def resolve(self, interventions, max_scale: dict[str, float] | None = None) -> dict[Site, list[Edit]]:
        """{site: edits in the order given}; raises one of BAD_INPUT for anything that cannot apply.

        max_scale ({op: bound}, the server's limits) refuses a |scale| above its op's bound."""
        by_site: dict[Site, list[Edit]] = {}
        resolve_routes(self.adapter, interventions)  # expert routes act on routers, not sites (steering/routing.py)
        for spec in filter(lambda spec: not is_route(spec), interventions):
            iv = Intervention.parse(spec)
            for site, edit in self._feature_edit(iv) if iv.is_feature else self._vector_edits(iv):
                bound = (max_scale or {}).get(edit.op)
                if bound is not None and iv.scale is not None and abs(iv.scale) > bound:
                    raise SteeringError(f"|scale| {iv.scale:g} for {iv.target} is over {bound:g}, the most allowed "
                                        f"for {edit.op} (max_scale): the output would be noise")
                if iv.when is not None:
                    self._check_condition(iv.when, site)
                    edit.condition = iv.when
                by_site.setdefault(site, []).append(edit)
        return by_site

    def hooks(self, interventions, max_scale: dict[str, float] | None = None) -> dict:
        """{site: hook function} for ModelAdapter.hooks: the interventions' edits and the conditions
        they read (steering/conditions.py), for one generation (resolve says what max_scale does)."""
        edits = self.resolve(interventions, max_scale)
        gates = Gates.of(edits, self.sae)
        sites = set(edits) | (gates.sites if gates else set())
        return {site: site_hook(site, edits.get(site, []), gates) for site in sites}

    def feature_sae(self, feature: FeatureId):
        """The SAE a feature belongs to, checked to fit the model's site and to have the feature."""
        hook_site = self.adapter.site(feature.site)
        sae = self.sae(feature.site)
        if sae.cfg.d_in != hook_site.width:
            raise SteeringError(f"the SAE at {feature.site} reads width {sae.cfg.d_in}, the model's site has "
                                f"{hook_site.width}: retrain it on this model")
        if not 0 <= feature.index < sae.cfg.d_sae:
            raise SteeringError(f"unknown feature {feature}: the SAE at {feature.site} has features 0..{sae.cfg.d_sae - 1}")
        return sae

    def _check_condition(self, condition: Condition, edited: Site) -> None:
        check_order(condition, edited)
        self.feature_sae(condition.feature)

    def _feature_edit(self, iv: Intervention):
        feature = FeatureId.parse(iv.target)
        sae = self.feature_sae(feature)
        if iv.layers is not None:
            raise SteeringError(f"layers is for vectors; feature {feature} is at layer {feature.site.layer} already")
        if self.dial(feature, iv) == "tuned":
            return self._tuned_edit(feature, iv)
        op, scale, units, positions = self.setting(feature, iv)
        row = sae.W_dec[feature.index].detach().float()
        if op == "project":
            if units not in (None, "fraction"):
                raise SteeringError(f"project's scale is ds4's s (a fraction of the component along v), "
                                    f"not units={units}: drop units")
            edit = Edit("project", unit_rows(row), scale, positions)
        else:
            if units == "fraction":
                raise SteeringError(f"units=fraction is for project; {op} takes units=max_act, norm or raw")
            amount = scale * self.unit(feature, units, row)
            edit = Edit(op, row, amount, positions, sae if op == "clamp" else None, feature.index)
        return [(feature.site, edit)]

    def _tuned_edit(self, feature: FeatureId, iv: Intervention):
        """The feature's tuned dial: its trained vector added, scale 1 as make steer-features chose it."""
        name = tuned_dial_name(feature)
        if not (self.run.vectors / f"{name}.json").exists():
            raise SteeringError(f"feature {feature} has no tuned dial: train one with make steer-features "
                                f"ARGS='steer_features.features=[{feature}]', or use dial=decoder")
        if iv.op not in (None, "add") or iv.units not in (None, "raw"):
            raise SteeringError(f"a tuned dial is added (op=add, units=raw: scale 1 is the dial as tuned); "
                                f"drop op={iv.op} units={iv.units} or use dial=decoder")
        return self._vector_edits(Intervention(name, scale=iv.scale, positions=iv.positions))  # a named vector

    def _vector_edits(self, iv: Intervention):
        if iv.dial is not None:
            raise SteeringError(f"dial is for features (decoder or tuned); {iv.target} is a vector: drop dial")
        vector = self.vector(iv.target)
        if iv.op == "clamp":
            raise SteeringError(f"clamp sets an SAE feature's activation; {iv.target} is a vector: use add or project")
        if iv.op not in (None, vector.operation):
            raise SteeringError(f"vector {vector.name} is a `{vector.operation}` vector and add and project are not "
                                f"interchangeable: drop op, or rebuild the vector with operation={iv.op}")
        if iv.units not in (None, vector.units):
            raise SteeringError(f"vector {vector.name} is in units {vector.units}: drop units={iv.units}")
        layers = list(iv.layers) if iv.layers is not None else vector.layers
        missing = [l for l in layers if l not in vector.directions]
        if missing:
            raise SteeringError(f"vector {vector.name} has no direction at layer {missing[0]}: "
                                f"it has layers {vector.layers}")
        edits = []
        for layer in layers:
            site = vector.site(layer)
            self.adapter.site(site)
            direction = vector.directions[layer].to(self.device)
            if vector.operation == "project":
                direction = unit_rows(direction)
            scale = 1.0 if iv.scale is None else iv.scale
            edits.append((site, Edit(vector.operation, direction, scale, iv.positions or vector.positions)))
        return edits

    # -- generation ---------------------------------------------------------------------------

    @contextmanager
    def steering(self, interventions):
        """Hooks for the interventions for the duration of the block (validated before any is placed)."""
        with self.adapter.hooks(self.hooks(interventions)), routing(self.adapter, interventions):
            yield

    def generate(self, prompts, interventions=(), max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, chat: bool | None = None, min_new_tokens: int = 0,
                 stop: list[str] | None = None, streamer=None, max_time: float | None = None) -> list[Generation]:
        """Generate for one prompt or a batch (left-padded); greedy when temperature is 0.

        max_time (seconds) ends generation early, with finish_reason "length" as at max_new_tokens."""
        single = isinstance(prompts, str) or (prompts and isinstance(prompts[0], dict))
        prompts = [prompts] if single else list(prompts)
        chat = self.chat_default if chat is None else chat
        encoded = [encode_prompt(self.tokenizer, p, chat) for p in prompts]
        ids, mask = self.left_padded(encoded)
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
        if stop:
            sampling.update(stop_strings=list(stop), tokenizer=self.tokenizer)
        with self.lock, torch.inference_mode(), self.steering(interventions):
            torch.manual_seed(seed)
            out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                      max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                      pad_token_id=self.pad_id, streamer=streamer, max_time=max_time, **sampling)
        return [self.finish(row[ids.shape[1]:].tolist(), len(e), stop) for row, e in zip(out, encoded)]

    def compare(self, prompt, interventions, **sampling) -> tuple[Generation, Generation]:
        """(unsteered, steered) for one prompt with the same sampling settings and seed."""
        return self.generate(prompt, (), **sampling)[0], self.generate(prompt, interventions, **sampling)[0]

    def prompt_tokens(self, prompt, chat: bool | None = None) -> int:
        """How many tokens `prompt` is once encoded as generate() would encode it."""
        return len(encode_prompt(self.tokenizer, prompt, self.chat_default if chat is None else chat))

    @property
    def context_length(self) -> int | None:
        """The most tokens the model attends over (prompt and generation), when its config says."""
        return getattr(self.model.config, "max_position_embeddings", None)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def left_padded(self, sequences: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, attention_mask) [n, longest] by the tokenizer's own padding, on the left as generate wants."""
        batch = self.tokenizer.pad({"input_ids": [s.tolist() for s in sequences]}, padding=True, padding_side="left",
                                   return_tensors="pt")
        return batch["input_ids"], batch["attention_mask"]

    @property
    def eos_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        eos = eos if eos is not None else self.tokenizer.eos_token_id
        return list(eos) if isinstance(eos, (list, tuple)) else [eos]

    def finish(self, new: list[int], prompt_tokens: int, stop) -> Generation:
        """The Generation of a row's new tokens: cut at the end of turn or the first stop string."""
        ends = [i for i, t in enumerate(new) if t in self.eos_ids]
        finish = "stop" if ends else "length"
        tokens = new[: ends[0]] if ends else new
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        for s in stop or ():
            if s in text:
                text, finish = text[: text.index(s)], "stop"
        return Generation(text, tokens, prompt_tokens, finish)
