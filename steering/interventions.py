"""Steering a model's generation by SAE feature ID or by named vector.

    steerer = Steerer("runs/demo")
    steerer.generate("Tell me about dogs.", ["L15.resid_post/1234 scale=4"])
    steerer.generate("Tell me about dogs.", [{"vector": "terse", "scale": 2, "layers": [12]}])

An intervention names its target (a feature `<site>/<index>` or a vector in runs/<run>/vectors/),
an operation, a scale and the positions it acts on:

  add      h += a * v                    a = scale * the feature's max activation (units=max_act),
                                         scale * the site's mean norm / |v| (units=norm: the edit's
                                         norm is that share of a typical row) or scale itself (raw)
  clamp    feature activation := a       uses the trained SAE: h += (a - f_i(h)) * W_dec[i]
  project  h -= s * v (v . h)            ds4's directional steering, v a unit vector, s = scale
                                         (1 removes the direction, negative amplifies it)

positions: `prompt` (the prompt's rows), `generated` (the rows of generated tokens; the first new
token is predicted from the last prompt row, so it is not yet affected), or `all`. Unset, the target's
own: a feature's calibrated setting or a vector's (make steer-features may choose the prompt's rows: a dial
there reads as an instruction the model was given, not a push on every word it writes), else `all`.

when: a condition, `when=L12.resid_post/88>2.5` (or {"feature": ..., "above": 2.5}): the edit applies
only at the token positions where that feature's activation, read through its SAE at its own site on
the same forward, is above the threshold (steering/conditions.py). Elsewhere the rows are untouched.

dial: how a feature steers. `decoder` adds (or clamps) its SAE decoder row; `tuned` adds the vector that
make steer-features trained to write the feature's concept (steering/dials.py), saved as
runs/<run>/vectors/<site>-<index>-tuned with scale 1 as chosen there. A feature given without op, scale,
units or dial uses its best dial, as make steer-features measured it (features.parquet, steer_dial).

Every intervention runs as a hook from `ModelAdapter.hooks`, so it works at every site kind
(hyper-connection sites included), several compose in the order given, and the hooks are gone
when `steering()` exits, whether generation finished or failed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from omegaconf import DictConfig, OmegaConf

from activations.errors import DialboxError
from activations.sites import FeatureId

OPS = ("add", "clamp", "project")
POSITIONS = ("all", "prompt", "generated")
UNITS = ("max_act", "norm", "raw", "fraction")
DIALS = ("decoder", "tuned")
FIELDS = ("feature", "vector", "op", "scale", "units", "positions", "layers", "when", "dial")


class SteeringError(DialboxError, ValueError):
    """An intervention that cannot be applied; the message says what to change."""


@dataclass(frozen=True)
class Intervention:
    target: str  # a feature ID `<site>/<index>` or a vector name
    op: str | None = None  # None: add for features, the vector's own operation for vectors
    scale: float | None = None  # None: a feature's calibrated setting (or the default); 1 for vectors
    units: str | None = None  # None: max_act for feature add/clamp, the vector's units otherwise
    positions: str | None = None  # None: the target's own (a calibrated setting's, a vector's), else all
    layers: tuple | None = None  # vectors only: the layers to steer (None = all the vector has)
    when: Condition | None = None  # None: every position (within `positions`)
    dial: str | None = None  # features only: decoder | tuned; None = the feature's best dial (make steer-features)

    @property
    def is_feature(self) -> bool:
        return "/" in self.target

    @classmethod
    def parse(cls, spec) -> "Intervention":
        """From a dict ({"feature": ..., "scale": 4}) or a string ("L15.resid_post/1234 op=clamp scale=4")."""
        if isinstance(spec, Intervention):
            return spec
        fields = spec_fields(spec)
        if "target" in fields:  # a string's first word: a feature ID has a slash, a vector name none
            target = fields.pop("target")
            fields["feature" if "/" in target else "vector"] = target
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
        return cls(target, _choice(fields, "op", OPS), _scale(fields.get("scale")), _choice(fields, "units", UNITS),
                   _choice(fields, "positions", POSITIONS), _layers(fields.get("layers")),
                   None if fields.get("when") in (None, "") else Condition.parse(fields["when"]),
                   _choice(fields, "dial", DIALS))


@dataclass(frozen=True)
class Condition:
    """Where an edit applies: the positions at which `feature` is above `threshold`."""

    feature: FeatureId
    threshold: float

    @classmethod
    def parse(cls, spec) -> "Condition":
        """From "L12.resid_post/88>2.5" or {"feature": "L12.resid_post/88", "above": 2.5}."""
        if isinstance(spec, Condition):
            return spec
        if isinstance(spec, dict) and set(spec) == {"feature", "above"}:
            feature, above = spec["feature"], spec["above"]
        elif isinstance(spec, str) and ">" in spec:
            feature, _, above = spec.partition(">")
        else:
            raise SteeringError(f"bad condition {spec!r}: write when=<feature>><threshold>, e.g. "
                                "when=L12.resid_post/88>2.5, or {\"feature\": ..., \"above\": 2.5}")
        threshold = finite_number(above)
        if threshold is None:
            raise SteeringError(f"bad condition threshold (when.above) {above!r} in {spec!r}: give a finite number, "
                                "e.g. when=L12.resid_post/88>2.5")
        return cls(FeatureId.parse(str(feature).strip()), threshold)

    def __str__(self) -> str:
        return f"{self.feature}>{self.threshold:g}"


def spec_fields(spec, words: dict[str, tuple[str, str]] | None = None) -> dict:
    """The fields of an intervention (or an expert route) given as a dict, or as a string of words: its first
    bare word is the `target`, a `key=value` word sets a field, and a bare word listed in `words` sets the
    field and value it stands for (a route's `force` is mode=force)."""
    if isinstance(spec, DictConfig):
        spec = OmegaConf.to_container(spec)
    if isinstance(spec, dict):
        return dict(spec)
    if not isinstance(spec, str) or not spec.strip():
        raise SteeringError(f"bad intervention {spec!r}: give a dict or a string such as 'L15.resid_post/1234 scale=4'")
    fields = {}
    for word in spec.split():
        key, sep, value = word.partition("=")
        if sep:
            fields[key] = value
        elif word in (words or {}):
            key, value = words[word]
            fields[key] = value
        elif "target" not in fields:
            fields["target"] = word
        else:
            raise SteeringError(f"bad intervention {spec!r}: after the target write key=value pairs, e.g. scale=4")
    return fields


def _choice(fields: dict, key: str, allowed: tuple) -> str | None:
    value = fields.get(key)
    if value is not None and value not in allowed:
        raise SteeringError(f"bad {key} {value!r}: use one of {', '.join(allowed)}")
    return value


def finite_number(value) -> float | None:
    """value (a number, or a number's text) as a finite float; None for anything else: a bool, NaN,
    infinity, or an integer too large for a float."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def _scale(value) -> float | None:
    if value is None:
        return None
    scale = finite_number(value)
    if scale is None:
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
    except (TypeError, ValueError, OverflowError):  # OverflowError: JSON's 1e400 is infinity
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
    condition: Condition | None = None  # the positions it applies at (None: all of them)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if self.op == "add":
            return x + self.amount * self.vector
        if self.op == "project":
            return x - self.amount * (x @ self.vector)[..., None] * self.vector
        # clamp: move the feature to its target and keep the SAE's error term, as the field does
        active = self.sae.encode(x.reshape(-1, x.shape[-1]))[:, self.index].reshape(x.shape[:-1])
        return x + (self.amount - active)[..., None] * self.vector


def site_hook(site, edits: list[Edit], gates=None):
    """The hook function for one site. With a KV cache, the first forward of a generation carries
    the prompt and each later forward one generated token: that is how positions are told apart.

    gates (steering/conditions.py Gates) first reads the conditions at this site, from the rows as
    they arrive, then keeps each conditional edit to the positions where its condition holds."""
    calls = 0

    def fn(rows: torch.Tensor):
        nonlocal calls
        phase = "prompt" if calls == 0 else "generated"
        calls += 1
        if gates is not None:
            gates.read(site, rows)
        active = [e for e in edits if e.positions in ("all", phase)]
        if not active:
            return None
        x = rows.float()
        for edit in active:
            edited = edit.apply(x)
            x = edited if edit.condition is None else gates.gate(edit.condition, x, edited)
        return x.to(rows.dtype)

    return fn
