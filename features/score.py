"""Scoring labels as Delphi does: can someone holding only the label predict the feature?

  detection  shown an excerpt, say whether the feature fires anywhere in it. Positives: the
             scoring split's activating excerpts (top and every quantile); negatives: random
             excerpts where it does not fire.
  fuzzing    shown an activating excerpt with some tokens marked, say whether the marks are where
             the feature fires. Correct marks: the firing tokens; wrong marks: as many tokens
             where it does not fire.

Each gives a balanced accuracy (mean of the true-positive and true-negative rates), so 0.5 is
chance whatever the mix. Only examples of the `score` split are used: the explainer never saw
them. The judge is the explainer's chat model, or, for a token-count label, a rule that looks
for the label's tokens, so every label gets a measured score.
"""

from __future__ import annotations

import re

import numpy as np

from features.examples import Example
from features.explain import highlight, label_tokens
from features.llm import ChatModel

DETECTION = (
    "A feature of a language model is described as: {label}\n\nDoes this feature fire on any token of the excerpt "
    "below? Answer Yes or No.\n\nExcerpt: {text}"
)
FUZZING = (
    "A feature of a language model is described as: {label}\n\nIn the excerpt below some tokens are marked "
    "<<like this>>. Are the marked tokens ones where this feature fires? Answer Yes or No.\n\nExcerpt: {text}"
)


def parse_yes_no(reply: str) -> bool:
    """The first yes or no in the reply (after an "Answer:" prefix, if any)."""
    found = re.search(r"\b(yes|no)\b", reply, flags=re.IGNORECASE)
    if not found:
        raise ValueError(f"neither yes nor no: {reply[:40]!r}")
    return found.group(1).lower() == "yes"


class LLMJudge:
    def __init__(self, chat: ChatModel):
        self.chat = chat

    def detects(self, label: str, ex: Example) -> bool:
        prompt = DETECTION.format(label=label, text="".join(ex.tokens).replace("\n", " ").strip())
        return self.chat.ask([{"role": "user", "content": prompt}], 3, parse_yes_no, prefix="Answer:")

    def accepts_marks(self, label: str, ex: Example, marked: np.ndarray) -> bool:
        prompt = FUZZING.format(label=label, text=highlight(ex, marked))
        return self.chat.ask([{"role": "user", "content": prompt}], 3, parse_yes_no, prefix="Answer:")


class TokenJudge:
    """The judge for token-count labels: yes when a (marked) token is one the label names."""

    def detects(self, label: str, ex: Example) -> bool:
        wanted = label_tokens(label)
        return any(t.strip().lower() in wanted for t in ex.tokens)

    def accepts_marks(self, label: str, ex: Example, marked: np.ndarray) -> bool:
        wanted = label_tokens(label)
        return any(t.strip().lower() in wanted for t, m in zip(ex.tokens, marked) if m)


def balanced_accuracy(predicted: list[bool], actual: list[bool]) -> float | None:
    pos = [p for p, a in zip(predicted, actual) if a]
    neg = [not p for p, a in zip(predicted, actual) if not a]
    if not pos or not neg:
        return None
    return (sum(pos) / len(pos) + sum(neg) / len(neg)) / 2


def score_examples(examples: list[Example], n: int) -> tuple[list[Example], list[Example]]:
    """(activating, non-activating) examples of the score split, at most n of each; activating
    ones spread over the top and every quantile, as Delphi samples them."""
    scored = [ex for ex in examples if ex.split == "score"]
    activating = [ex for ex in scored if ex.kind != "random" and ex.peak > 0]
    picked = [activating[i] for i in np.linspace(0, len(activating) - 1, min(n, len(activating))).round().astype(int)] if activating else []
    return picked, [ex for ex in scored if ex.kind == "random"][:n]


def detection(judge, label: str, examples: list[Example], n: int) -> float | None:
    positives, negatives = score_examples(examples, n)
    predicted = [judge.detects(label, ex) for ex in positives + negatives]
    return balanced_accuracy(predicted, [True] * len(positives) + [False] * len(negatives))


def fuzzing(judge, label: str, examples: list[Example], n: int, seed: int) -> float | None:
    positives, _ = score_examples(examples, n)
    rng = np.random.default_rng(seed)
    predicted, actual = [], []
    for i, ex in enumerate(positives):
        firing = ex.acts > 0
        quiet = np.flatnonzero(~firing)
        if i % 2 == 0 or len(quiet) == 0:
            marks, correct = firing, True
        else:
            marks = np.zeros_like(firing)
            marks[rng.choice(quiet, min(int(firing.sum()), len(quiet)), replace=False)] = True
            correct = False
        predicted.append(judge.accepts_marks(label, ex, marks))
        actual.append(correct)
    return balanced_accuracy(predicted, actual)
