"""A small valid label-stage output (runs/<run>/features/<site>/) for the report and browser tests.

Feature i is dead when i % 10 == 9, unlabelled when i % 7 == 6 (and not dead), labelled otherwise.
Every context is `tokens` with the feature's peak on token i % len(tokens).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

WORDS = ["In", " the", " beginning", " God", " created", " the", " heaven", " and", " the", " earth", ".", "\n"]
THEMES = ["the word 'the' in narrative", "creation and beginnings", "names of God", "sentence-final periods",
          "conjunction 'and' joining clauses", "heaven and earth", "line breaks between verses"]
HIST_EDGES = [0.01 * 2**k for k in range(9)]
# Corpus text that would run if it were ever parsed as HTML (window.pwned set, an alert open).
MARKUP = ["<script>window.pwned=1</script>", "<script>alert(1)</script>",
          '"><img src=x onerror=window.pwned=1>', '"><img src=x onerror=alert(1)>', "</textarea>"]


def is_dead(i: int) -> bool:
    return i % 10 == 9


def is_unlabelled(i: int) -> bool:
    return i % 7 == 6 and not is_dead(i)


def write_site(features_dir: Path, site: str = "L3.resid_post", n: int = 300, tokens: list[str] = WORDS,
               labels: dict[int, str] | None = None, examples: dict[str, int] | None = None) -> Path:
    """Write features.parquet, examples.parquet and meta.json of `n` features; `labels` overrides some."""
    out = Path(features_dir) / site
    out.mkdir(parents=True, exist_ok=True)
    labels = labels or {}
    examples = examples or {"top": 2, "quantile": 2, "random": 1}
    pq.write_table(feature_table(site, n, tokens, labels), out / "features.parquet")
    pq.write_table(example_table(n, tokens, examples), out / "examples.parquet", row_group_size=1000)
    meta = {"site": site, "n_features": n, "tokens_mined": 200_000, "hist_edges": HIST_EDGES,
            "context_tokens": len(tokens), "explainer": "heuristic", "scorer": "heuristic",
            "model": "smollm2_135m", "sae": "topk k=32"}
    (out / "meta.json").write_text(json.dumps(meta))
    return out


def feature_table(site: str, n: int, tokens: list[str], labels: dict[int, str]) -> pa.Table:
    i = np.arange(n)
    dead = i % 10 == 9
    labelled = ~dead & (i % 7 != 6)
    max_act = np.where(dead, 0.0, 1.0 + i % 17).astype(np.float32)
    detection = np.where(labelled, 0.5 + (i % 5) / 10, np.nan)
    fuzzing = np.where(labelled, 0.6 + (i % 4) / 10, np.nan)
    word = [tokens[k % len(tokens)] for k in range(n)]
    words3 = [[word[k], word[(k + 1) % n], word[(k + 2) % n]] for k in range(n)]
    return pa.table({
        "index": pa.array(i, pa.int32()),
        "feature_id": [f"{site}/{k}" for k in range(n)],
        "density": np.where(dead, 0.0, 10.0 ** (-1 - 4 * (i % 13) / 13)),
        "max_act": max_act,
        "mean_act": max_act / 3,
        "dead": dead,
        "label": [labels.get(k, THEMES[k % len(THEMES)]) if labelled[k] else None for k in range(n)],
        "label_source": ["dead" if dead[k] else "heuristic" if labelled[k] else "unlabelled" for k in range(n)],
        "label_error": ["explainer timed out" if not labelled[k] and not dead[k] else None for k in range(n)],
        "detection": pa.array(detection, pa.float32(), from_pandas=True),
        "fuzzing": pa.array(fuzzing, pa.float32(), from_pandas=True),
        "score": pa.array((detection + fuzzing) / 2, pa.float32(), from_pandas=True),
        "top_tokens": words3,
        "logit_pos": words3,
        "logit_pos_values": pa.array([[3.0, 2.0, 1.0]] * n, pa.list_(pa.float32())),
        "logit_neg": words3,
        "logit_neg_values": pa.array([[-1.0, -2.0, -3.0]] * n, pa.list_(pa.float32())),
        "neighbours": pa.array([[(k + 1) % n, (k + 2) % n] for k in range(n)], pa.list_(pa.int32())),
        "neighbour_cos": pa.array([[0.9, 0.5]] * n, pa.list_(pa.float32())),
        "hist_counts": pa.array([[0] * 8 if dead[k] else [500, 200, 90, 40, 10, 5, 1, k % 3] for k in range(n)],
                                pa.list_(pa.int64())),
    })


def example_table(n: int, tokens: list[str], per_kind: dict[str, int]) -> pa.Table:
    rows = []
    for k in range(n):
        if is_dead(k):
            continue
        peak = 1.0 + k % 17
        acts = np.zeros(len(tokens), np.float32)
        acts[k % len(tokens)] = peak
        acts[(k + 1) % len(tokens)] = peak / 4
        for kind, count in per_kind.items():
            for rank in range(count):
                firing = kind != "random"
                rows.append((k, kind, rank, rank if kind == "quantile" else -1, 100 * k + rank,
                             acts if firing else acts * 0, peak if firing else 0.0, "explain" if rank % 2 else "score"))
    columns = list(zip(*rows))
    return pa.table({
        "index": pa.array(columns[0], pa.int32()), "kind": columns[1], "rank": pa.array(columns[2], pa.int32()),
        "quantile": pa.array(columns[3], pa.int32()), "start": pa.array(columns[4], pa.int64()),
        "tokens": [tokens] * len(rows), "acts": pa.array([a.tolist() for a in columns[5]], pa.list_(pa.float32())),
        "max_act": pa.array(columns[6], pa.float32()), "split": columns[7],
    })
