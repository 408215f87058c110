"""Example contexts of each feature, taken from the mining state, and split between the
explainer and the scorers.

Kinds of example (one block of `context_tokens` store rows each):
  top       the blocks with the highest peak activation, best first
  quantile  blocks sampled uniformly among those where the feature fires, grouped into
            activation quantiles (0 = weakest); blocks already among the top are dropped
  random    blocks of the random pool where the feature does not fire

Splits: the explainer sees the first `explain_top` top blocks and `explain_per_quantile` blocks
of each quantile; the scorers only ever draw from the rest. Delphi draws both sets with one
seed and lets them overlap, which rewards labels that memorise the shown examples; here a block
is never in both (tested).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from features.mining import slot_acts


@dataclass
class ExamplePlan:
    quantiles: int = 4
    explain_top: int = 8  # top blocks shown to the explainer
    explain_per_quantile: int = 2  # blocks of each quantile shown to the explainer
    random_examples: int = 10  # non-activating blocks kept per feature
    seed: int = 0


@dataclass
class Example:
    kind: str  # top | quantile | random
    rank: int  # order within its kind
    quantile: int  # -1 unless kind == quantile
    block: int
    acts: np.ndarray  # float32 [context_tokens]
    split: str = ""  # explain | score | "" (shown in reports only)
    tokens: list = field(default_factory=list)  # decoded token strings, filled in by attach_tokens

    @property
    def peak(self) -> float:
        return float(self.acts.max(initial=0.0))


def feature_examples(state: dict, feature: int, plan: ExamplePlan, context_tokens: int) -> list[Example]:
    """All examples of one SAE feature, split (top and quantile examples carry their activations).

    The state may hold a slice of the features (row i is feature first + i); random choices are
    seeded by the SAE feature index, so a slice gives the same examples as a whole pass."""
    i = feature - state["identity"]["features"][0]
    top_live = state["top_keys"][i] > -np.inf
    top_blocks = state["top_blocks"][i, top_live].tolist()
    examples = [Example("top", r, -1, b, slot_acts(state, "top", i, r).numpy(), "explain" if r < plan.explain_top else "score")
                for r, b in enumerate(top_blocks)]
    examples += _quantile_examples(state, i, plan, set(top_blocks))
    rng = np.random.default_rng([plan.seed, feature])
    quiet = state["pool"][~state["pool_fires"][:, i]].numpy()
    chosen = rng.permutation(quiet)[: plan.random_examples]
    examples += [Example("random", r, -1, int(b), np.zeros(context_tokens, np.float32), "score") for r, b in enumerate(chosen)]
    return examples


def _quantile_examples(state: dict, feature: int, plan: ExamplePlan, exclude: set) -> list[Example]:
    live = state["sample_keys"][feature] > -np.inf
    slots = [i for i in torch.nonzero(live).flatten().tolist() if int(state["sample_blocks"][feature, i]) not in exclude]
    if not slots:
        return []
    peaks = state["sample_peaks"][feature, slots]
    ordered = [slots[i] for i in torch.argsort(peaks).tolist()]  # weakest first
    examples = []
    for q, group in enumerate(np.array_split(np.array(ordered), min(plan.quantiles, len(ordered)))):
        for r, slot in enumerate(group.tolist()):
            examples.append(Example("quantile", r, q, int(state["sample_blocks"][feature, slot]),
                                    slot_acts(state, "sample", feature, slot).numpy(),
                                    "explain" if r < plan.explain_per_quantile else "score"))
    return examples


def attach_tokens(examples: list[Example], token_ids: np.ndarray, vocab: list[str], context_tokens: int) -> None:
    """Fill in each example's token strings from the store's token ids (`token_ids` indexed by row)."""
    for ex in examples:
        ids = token_ids[ex.block * context_tokens : (ex.block + 1) * context_tokens]
        ex.tokens = [vocab[i] for i in ids.tolist()]
