"""Labels for features: from a chat model shown highlighted contexts, or from token counts.

The LLM prompt follows Delphi's: excerpts with the activating tokens marked <<like this>>,
the strongest first, then a few weaker ones from each activation quantile, then the tokens the
feature's decoder direction promotes through the unembedding (logit lens).
"""

from __future__ import annotations

import re
from collections import Counter

from features.examples import Example
from features.llm import ChatModel

SYSTEM = (
    "You study features inside a language model. Each excerpt below is text where one feature is active; the "
    "tokens where it is active are marked <<like this>>. Say what the marked tokens have in common (a word, a "
    "topic, a grammatical role, a pattern). Answer with one short phrase of at most 12 words, on a last line that "
    "starts with 'Explanation:'."
)
MAX_LABEL_CHARS = 160
MAX_LABEL_WORDS = 20


def highlight(ex: Example, marked=None) -> str:
    """The excerpt as text with the marked tokens (default: where the feature fires) in <<>>."""
    marked = ex.acts > 0 if marked is None else marked
    parts = [f"<<{tok}>>" if m else tok for tok, m in zip(ex.tokens, marked)]
    return "".join(parts).replace("\n", " ").strip()


def explain_prompt(examples: list[Example], promoted: list[str]) -> list[dict]:
    shown = [ex for ex in examples if ex.split == "explain"]
    top = [ex for ex in shown if ex.kind == "top"]
    weaker = [ex for ex in shown if ex.kind == "quantile"]
    scale = max((ex.peak for ex in shown), default=1.0) or 1.0
    lines = ["Strongest activations:"]
    lines += [f"{i + 1}. {highlight(ex)} (strength {round(10 * ex.peak / scale)})" for i, ex in enumerate(top)]
    if weaker:
        lines.append("Weaker activations:")
        lines += [f"{i + 1}. {highlight(ex)} (strength {round(10 * ex.peak / scale)})" for i, ex in enumerate(weaker)]
    if promoted:
        lines.append("Tokens the feature makes more likely next: " + ", ".join(repr(t) for t in promoted))
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "\n".join(lines)}]


def parse_label(reply: str) -> str:
    """The phrase after the last 'Explanation:' (or a lone short line); ValueError for anything else."""
    found = re.findall(r"explanation\s*:\s*(.+)", reply, flags=re.IGNORECASE)
    lines = [ln.strip() for ln in reply.strip().splitlines() if ln.strip()]
    label = found[-1] if found else (lines[0] if len(lines) == 1 else "")
    label = label.strip().strip("`*").strip()
    if len(label) > 1 and label[0] == label[-1] and label[0] in "\"'":  # a quoted phrase
        label = label[1:-1].strip()
    if not re.search(r"[A-Za-z]", label) or len(label) > MAX_LABEL_CHARS or "<<" in label or len(label.split()) > MAX_LABEL_WORDS:
        raise ValueError(f"no explanation in {reply[:80]!r}")
    return label


def llm_label(chat: ChatModel, examples: list[Example], promoted: list[str], max_tokens: int) -> str:
    return chat.ask(explain_prompt(examples, promoted), max_tokens, parse_label, prefix="Explanation:")


def peak_tokens(examples: list[Example], n: int = 5) -> list[str]:
    """The most frequent peak tokens of the activating examples (stripped; most common first)."""
    counts = Counter()
    for ex in examples:
        if ex.kind != "random" and ex.tokens and ex.peak > 0:
            token = ex.tokens[int(ex.acts.argmax())].strip()
            counts[token or repr(ex.tokens[int(ex.acts.argmax())])] += 1
    return [tok for tok, _ in counts.most_common(n)]


def heuristic_label(examples: list[Example]) -> str:
    """Token-count label from the explainer's examples: the peak tokens and a common bigram."""
    shown = [ex for ex in examples if ex.split == "explain"]
    tokens = peak_tokens(shown, 3)
    if not tokens:
        return ""
    bigrams = Counter()
    for ex in shown:
        i = int(ex.acts.argmax())
        if i > 0:
            bigrams[(ex.tokens[i - 1] + ex.tokens[i]).strip()] += 1
    label = "tokens " + ", ".join(f'"{t}"' for t in tokens)
    if bigrams:
        phrase, count = bigrams.most_common(1)[0]
        if count * 2 >= len(shown) and phrase != tokens[0]:
            label += f' (often "{phrase}")'
    return label


def label_tokens(label: str) -> set[str]:
    """The quoted tokens of a heuristic label, lower-cased: what the heuristic scorer looks for."""
    return {t.lower() for t in re.findall(r'"([^"]+)"', label.split(" (often")[0])}
