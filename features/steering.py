"""Steering a model's generation by SAE feature ID or by named vector.

    steerer = Steerer("runs/demo")
    steerer.generate("Tell me about dogs.", ["L15.resid_post/1234 scale=4"])
    steerer.generate("Tell me about dogs.", [{"vector": "terse", "scale": 2, "layers": [12]}])

An intervention names its target (a feature `<site>/<index>` or a vector in runs/<run>/vectors/),
an operation, a scale and the positions it acts on:

  add      h += a * v                    a = scale * the feature's max activation (units=max_act,
                                         the default for features) or scale itself (units=raw)
  clamp    feature activation := a       uses the trained SAE: h += (a - f_i(h)) * W_dec[i]
  project  h -= s * v (v . h)            ds4's directional steering, v a unit vector, s = scale
                                         (1 removes the direction, negative amplifies it)

positions: `prompt` (the prompt's rows), `generated` (the rows of generated tokens; the first new
token is predicted from the last prompt row, so it is not yet affected), or `all`.

Every intervention runs as a hook from `ModelAdapter.hooks`, so it works at every site kind
(hyper-connection sites included), several compose in the order given, and the hooks are gone
when `steering()` exits, whether generation finished or failed.
"""

from __future__ import annotations

import math
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from features.vectors import SteeringVector, VectorError, check_fits, unit_rows
from pipeline.adapters import make_adapter
from pipeline.config import ModelConfig
from pipeline.models import load_model
from pipeline.rundir import RunDir
from pipeline.sites import FeatureId, Site, SiteError
from pipeline.store import StoreError

OPS = ("add", "clamp", "project")
POSITIONS = ("all", "prompt", "generated")
UNITS = ("max_act", "raw", "fraction")
FIELDS = ("feature", "vector", "op", "scale", "units", "positions", "layers")


class SteeringError(ValueError):
    """An intervention that cannot be applied; the message says what to change."""


# Every kind of bad input an intervention can carry: the CLI prints them in one line, the server answers 400.
BAD_INPUT = (SteeringError, SiteError, VectorError)


@dataclass(frozen=True)
class Intervention:
    target: str  # a feature ID `<site>/<index>` or a vector name
    op: str | None = None  # None: add for features, the vector's own operation for vectors
    scale: float = 1.0
    units: str | None = None  # None: max_act for feature add/clamp, the vector's units otherwise
    positions: str = "all"
    layers: tuple | None = None  # vectors only: the layers to steer (None = all the vector has)

    @property
    def is_feature(self) -> bool:
        return "/" in self.target

    @classmethod
    def parse(cls, spec) -> "Intervention":
        """From a dict ({"feature": ..., "scale": 4}) or a string ("L15.resid_post/1234 op=clamp scale=4")."""
        if isinstance(spec, Intervention):
            return spec
        fields = _fields_of(spec)
        unknown = sorted(set(fields) - set(FIELDS))
        if unknown:
            raise SteeringError(f"unknown intervention field {unknown[0]!r} in {spec!r}: use {', '.join(FIELDS)}")
        targets = [fields[k] for k in ("feature", "vector") if fields.get(k) not in (None, "")]
        if len(targets) != 1:
            raise SteeringError(f"intervention {spec!r} needs exactly one of feature (e.g. L15.resid_post/1234) "
                                "or vector (a name from runs/<run>/vectors)")
        target = str(targets[0])
        if "feature" in fields and fields["feature"] not in (None, ""):
            FeatureId.parse(target)  # a clear error for a malformed ID, before anything loads
        return cls(target, _choice(fields, "op", OPS), _scale(fields.get("scale", 1.0)), _choice(fields, "units", UNITS),
                   _choice(fields, "positions", POSITIONS) or "all", _layers(fields.get("layers")))


def _fields_of(spec) -> dict:
    if isinstance(spec, DictConfig):
        spec = OmegaConf.to_container(spec)
    if isinstance(spec, dict):
        return dict(spec)
    if isinstance(spec, str) and spec.strip():
        target, *pairs = spec.split()
        fields = {"feature" if "/" in target else "vector": target}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep:
                raise SteeringError(f"bad intervention {spec!r}: after the target write key=value pairs, e.g. scale=4")
            fields[key] = value
        return fields
    raise SteeringError(f"bad intervention {spec!r}: give a dict or a string such as 'L15.resid_post/1234 scale=4'")


def _choice(fields: dict, key: str, allowed: tuple) -> str | None:
    value = fields.get(key)
    if value is not None and value not in allowed:
        raise SteeringError(f"bad {key} {value!r}: use one of {', '.join(allowed)}")
    return value


def _scale(value) -> float:
    try:
        scale = float(value)
    except (TypeError, ValueError):
        scale = math.nan
    if isinstance(value, bool) or not math.isfinite(scale):
        raise SteeringError(f"bad scale {value!r}: give a finite number, e.g. scale=4 (negative steers away)")
    return scale


def _layers(value) -> tuple | None:
    if value is None:
        return None
    if isinstance(value, str):  # "12", "10,12" or "[10,12]" from a command line
        value = value.strip("[]").split(",")
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    try:
        return tuple(int(x) for x in items)
    except (TypeError, ValueError):
        raise SteeringError(f"bad layers {value!r}: give layer numbers, e.g. layers=[10,12] or layers=10,12") from None


@dataclass
class Edit:
    """One resolved intervention at one site."""

    op: str
    vector: torch.Tensor  # add/clamp: the direction as added; project: a unit vector
    amount: float
    positions: str
    sae: object = None  # clamp only
    index: int = -1  # clamp only

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if self.op == "add":
            return x + self.amount * self.vector
        if self.op == "project":
            return x - self.amount * (x @ self.vector)[..., None] * self.vector
        # clamp: move the feature to its target and keep the SAE's error term, as the field does
        active = self.sae.encode(x.reshape(-1, x.shape[-1]))[:, self.index].reshape(x.shape[:-1])
        return x + (self.amount - active)[..., None] * self.vector


def site_hook(edits: list[Edit]):
    """The hook function for one site. With a KV cache, the first forward of a generation carries
    the prompt and each later forward one generated token: that is how positions are told apart."""
    calls = 0

    def fn(rows: torch.Tensor):
        nonlocal calls
        phase = "prompt" if calls == 0 else "generated"
        calls += 1
        active = [e for e in edits if e.positions in ("all", phase)]
        if not active:
            return None
        x = rows.float()
        for edit in active:
            x = edit.apply(x)
        return x.to(rows.dtype)

    return fn


def encode_prompt(tokenizer, prompt, chat: bool) -> torch.Tensor:
    """Token ids [seq] of a prompt (a string, or chat messages), through the chat template when chat."""
    if chat:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return torch.tensor(tokenizer(text, add_special_tokens=False).input_ids)
    if not isinstance(prompt, str):
        raise SteeringError("chat messages need a chat model: this tokenizer has no chat template")
    return torch.tensor(tokenizer(prompt).input_ids)


def max_activations(run: RunDir, site: str, sae, rows: int = 16384) -> tuple[torch.Tensor, str]:
    """Each feature's max activation [d_sae] and where it came from: the label stage's feature
    table when there is one, else the max over the store's first `rows` rows."""
    table = run.root / "features" / site / "features.parquet"
    if table.exists():
        import pyarrow.parquet as pq

        columns = pq.read_table(table, columns=["index", "max_act"]).to_pydict()
        maxes = torch.zeros(sae.cfg.d_sae)
        maxes[torch.tensor(columns["index"], dtype=torch.long)] = torch.tensor(columns["max_act"], dtype=torch.float32)
        return maxes, f"{table}"
    try:
        store = run.open_store()
        n = min(rows, store.n_tokens)
        x = torch.from_numpy(store.read(site, 0, n))
    except StoreError as e:
        raise SteeringError(f"no feature table and no stored activations to find max activations at {site} ({e}): "
                            "run `make label`, or pass units=raw") from None
    device = sae.W_dec.device
    with torch.no_grad():
        maxes = torch.stack([sae.encode(b.to(device)).amax(0).cpu() for b in x.split(4096)]).amax(0)
    return maxes, f"the first {n} stored rows (no feature table yet)"


@dataclass
class Generation:
    text: str
    tokens: list[int]  # the new tokens, up to and without the end-of-turn token
    prompt_tokens: int
    finish_reason: str  # stop (end of turn or a stop string) | length


class Steerer:
    """A model, its run's SAEs and vectors, and generation under interventions.

    One generation runs at a time (hooks belong to the model, not to a request), so one Steerer can
    serve several threads.
    """

    def __init__(self, run_dir, model_cfg=None, max_act_rows: int = 16384):
        self.run = run_dir if isinstance(run_dir, RunDir) else RunDir(str(Path(run_dir).parent), Path(run_dir).name)
        self.model_cfg = run_model(self.run, model_cfg)
        self.model, self.tokenizer = load_model(self.model_cfg)
        self.adapter = make_adapter(self.model, self.model_cfg)
        self.identity = self.adapter.describe()
        self.chat_default = bool(self.tokenizer.chat_template)
        self.max_act_rows = max_act_rows
        self.notes: list[str] = []  # where max activations came from, said once per site
        self.lock = threading.Lock()
        self._saes: dict[str, object] = {}
        self._max_acts: dict[str, torch.Tensor] = {}

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    # -- resolving interventions --------------------------------------------------------------

    def sae(self, site: Site):
        key = str(site)
        if key not in self._saes:
            from sae_lens import SAE

            path = self.run.saes(key)
            if not (path / "cfg.json").exists():
                raise SteeringError(f"no SAE at {path}: train one (make train ARGS='train.sites=[{key}]') "
                                    "or steer with a vector")
            self._saes[key] = SAE.load_from_disk(str(path), device=str(self.device))
        return self._saes[key]

    def max_act(self, site: Site, index: int) -> float:
        key = str(site)
        if key not in self._max_acts:
            self._max_acts[key], source = max_activations(self.run, key, self.sae(site), self.max_act_rows)
            self.notes.append(f"max activations at {key} from {source}")
        value = float(self._max_acts[key][index])
        if value <= 0:
            raise SteeringError(f"feature {site}/{index} never fired (max activation 0), so units=max_act has no "
                                "meaning for it: pass units=raw or pick another feature")
        return value

    def vector(self, name: str) -> SteeringVector:
        vector = SteeringVector.load(self.run.root / "vectors", name)
        check_fits(vector, self.identity)
        return vector

    def resolve(self, interventions) -> dict[Site, list[Edit]]:
        """{site: edits in the order given}; raises one of BAD_INPUT for anything that cannot apply."""
        by_site: dict[Site, list[Edit]] = {}
        for spec in interventions:
            iv = Intervention.parse(spec)
            for site, edit in self._feature_edit(iv) if iv.is_feature else self._vector_edits(iv):
                by_site.setdefault(site, []).append(edit)
        return by_site

    def _feature_edit(self, iv: Intervention):
        feature = FeatureId.parse(iv.target)
        hook_site = self.adapter.site(feature.site)
        sae = self.sae(feature.site)
        if sae.cfg.d_in != hook_site.width:
            raise SteeringError(f"the SAE at {feature.site} reads width {sae.cfg.d_in}, the model's site has "
                                f"{hook_site.width}: retrain it on this model")
        if not 0 <= feature.index < sae.cfg.d_sae:
            raise SteeringError(f"unknown feature {feature}: the SAE at {feature.site} has features 0..{sae.cfg.d_sae - 1}")
        if iv.layers is not None:
            raise SteeringError(f"layers is for vectors; feature {feature} is at layer {feature.site.layer} already")
        op = iv.op or "add"
        row = sae.W_dec[feature.index].detach().float()
        if op == "project":
            if iv.units not in (None, "fraction"):
                raise SteeringError(f"project's scale is ds4's s (a fraction of the component along v), "
                                    f"not units={iv.units}: drop units")
            edit = Edit("project", unit_rows(row), iv.scale, iv.positions)
        else:
            units = iv.units or "max_act"
            if units == "fraction":
                raise SteeringError(f"units=fraction is for project; {op} takes units=max_act or raw")
            amount = iv.scale * (self.max_act(feature.site, feature.index) if units == "max_act" else 1.0)
            edit = Edit(op, row, amount, iv.positions, sae if op == "clamp" else None, feature.index)
        return [(feature.site, edit)]

    def _vector_edits(self, iv: Intervention):
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
            edits.append((site, Edit(vector.operation, direction, iv.scale, iv.positions)))
        return edits

    # -- generation ---------------------------------------------------------------------------

    @contextmanager
    def steering(self, interventions):
        """Hooks for the interventions for the duration of the block (validated before any is placed)."""
        edits = self.resolve(interventions)
        with self.adapter.hooks({site: site_hook(e) for site, e in edits.items()}):
            yield

    def generate(self, prompts, interventions=(), max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, chat: bool | None = None, min_new_tokens: int = 0,
                 stop: list[str] | None = None, streamer=None) -> list[Generation]:
        """Generate for one prompt or a batch (left-padded); greedy when temperature is 0."""
        single = isinstance(prompts, str) or (prompts and isinstance(prompts[0], dict))
        prompts = [prompts] if single else list(prompts)
        chat = self.chat_default if chat is None else chat
        encoded = [encode_prompt(self.tokenizer, p, chat) for p in prompts]
        ids, mask = left_pad(encoded, self.pad_id)
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
        if stop:
            sampling.update(stop_strings=list(stop), tokenizer=self.tokenizer)
        with self.lock, torch.inference_mode(), self.steering(interventions):
            torch.manual_seed(seed)
            out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                      max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                      pad_token_id=self.pad_id, streamer=streamer, **sampling)
        return [self._finish(row[ids.shape[1]:].tolist(), len(e), stop) for row, e in zip(out, encoded)]

    def compare(self, prompt, interventions, **sampling) -> tuple[Generation, Generation]:
        """(unsteered, steered) for one prompt with the same sampling settings and seed."""
        return self.generate(prompt, (), **sampling)[0], self.generate(prompt, interventions, **sampling)[0]

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]

    @property
    def eos_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        eos = eos if eos is not None else self.tokenizer.eos_token_id
        return list(eos) if isinstance(eos, (list, tuple)) else [eos]

    def _finish(self, new: list[int], prompt_tokens: int, stop) -> Generation:
        ends = [i for i, t in enumerate(new) if t in self.eos_ids]
        finish = "stop" if ends else "length"
        tokens = new[: ends[0]] if ends else new
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        for s in stop or ():
            if s in text:
                text, finish = text[: text.index(s)], "stop"
        return Generation(text, tokens, prompt_tokens, finish)


def left_pad(sequences: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask) [n, longest], shorter sequences padded on the left as generate wants."""
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, longest - len(s):], mask[i, longest - len(s):] = s, 1
    return ids, mask


def run_model(run: RunDir, model_cfg=None) -> DictConfig:
    """The model to steer: the run's harvested model, or the one given (which must then agree with it)."""
    harvested = None
    try:
        harvested = run.harvest_config().model
    except StoreError:
        pass
    if model_cfg is None:
        if harvested is None:
            raise SteeringError(f"{run.root} has no harvest config to say which model it studies: pass model=<name>, "
                                "e.g. model=smollm2_135m")
        model_cfg = harvested
    elif harvested is not None and harvested.name != model_cfg.name:
        raise SteeringError(f"run {run.root} was harvested with model {harvested.name}, not {model_cfg.name}: "
                            f"pass model={harvested.name} or another run.run_name")
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), model_cfg)
