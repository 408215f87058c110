"""Features x experts: which mixture-of-experts experts the model sends a feature's tokens to.

The mining pass (features/mining.py) counts, for each feature f and each routed layer l at or after
its site, n(f, e): tokens where f fires and layer l chose expert e, beside n(f) (tokens where f fires),
load(e) (tokens where l chose e) and N (tokens mined). From these:

  lift(f, e)     = P(e | f fires) / P(e) = (n(f, e) / n(f)) / (load(e) / N)
  lift_low(f, e) = the same with P(e | f) at its Wilson 95% lower bound, so that an expert seen on
                   2 of a rare feature's 3 tokens does not outrank one seen on 900 of 1,000;
                   experts are ranked by it
  entropy(f, l)  = the entropy (bits) of f's expert distribution n(f, .) at layer l: 0 when its tokens
                   all go to top_k experts, log2(n_experts) at most

features.parquet gets per feature the top experts (`experts`: "L5/E37", with expert_lift,
expert_lift_low, expert_count) and expert_entropy (one per counted layer, meta.json's expert_layers);
experts.parquet, per site, one row per (layer, expert): its load and the features that most select it.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from activations.atomic import replacing
from activations.rundir import LabelFiles

Z = 1.96  # the Wilson bound's z: 95%
EXPERT_SCHEMA = pa.schema([
    ("layer", pa.int32()), ("expert", pa.int32()), ("expert_id", pa.string()), ("load", pa.int64()),
    ("load_frac", pa.float64()), ("features", pa.list_(pa.int32())), ("feature_lift", pa.list_(pa.float32())),
    ("feature_lift_low", pa.list_(pa.float32())), ("feature_count", pa.list_(pa.int64())),
])
# The features.parquet columns, added where the site's store holds router arrays.
FEATURE_FIELDS = [("experts", pa.list_(pa.string())), ("expert_lift", pa.list_(pa.float32())),
                  ("expert_lift_low", pa.list_(pa.float32())), ("expert_count", pa.list_(pa.int64())),
                  ("expert_entropy", pa.list_(pa.float32()))]


def expert_id(layer: int, expert: int) -> str:
    return f"L{layer}/E{expert}"


def counted_layers(router: dict, site_layer: int, count: int) -> list[int]:
    """The first `count` routed layers of a store at or after a site's layer."""
    return sorted(layer for layer in router if layer >= site_layer)[:count]


def wilson_low(hits: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Lower end of the Wilson score interval of a proportion hits / n (0 where n = 0)."""
    n = n.double().clamp(min=1)
    p = hits.double() / n
    centre = p + Z * Z / (2 * n)
    spread = Z * torch.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n))
    return ((centre - spread) / (1 + Z * Z / n)).clamp(min=0)


def lifts(state: dict, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(counts, lift, lift_low), each [features, experts], of one counted layer."""
    counts, load = state[f"experts_L{layer}"], state[f"load_L{layer}"]
    fires = state["fires"].double().clamp(min=1)[:, None]
    base = load.double() / max(int(state["tokens"]), 1)
    base = torch.where(base > 0, base, torch.ones_like(base))  # an expert never chosen has counts 0 anyway
    return counts, counts.double() / fires / base, wilson_low(counts, state["fires"][:, None]) / base


def entropy_bits(counts: torch.Tensor) -> torch.Tensor:
    """Entropy in bits of each row's distribution (0 for an empty row)."""
    q = counts.double() / counts.sum(dim=1, keepdim=True).clamp(min=1)
    return -(q * torch.log2(q.clamp(min=1e-300))).sum(dim=1)


def expert_columns(state: dict, layers: list[int], top: int) -> dict:
    """The features.parquet columns: each feature's top experts by lift_low over the counted layers."""
    if not layers:
        return {}
    per_layer = [lifts(state, layer) for layer in layers]
    names = [expert_id(layer, e) for layer, (counts, _, _) in zip(layers, per_layer) for e in range(counts.shape[1])]
    counts, lift, low = (torch.cat([p[i] for p in per_layer], dim=1) for i in range(3))
    low = low.masked_fill(counts == 0, -1.0)  # never together: not an expert of the feature
    best = low.topk(min(top, low.shape[1]), dim=1).indices
    columns = {key: [] for key, _ in FEATURE_FIELDS}
    for f, row in enumerate(best.tolist()):
        row = [e for e in row if counts[f, e] > 0]
        columns["experts"].append([names[e] for e in row])
        columns["expert_lift"].append([float(lift[f, e]) for e in row])
        columns["expert_lift_low"].append([float(low[f, e]) for e in row])
        columns["expert_count"].append([int(counts[f, e]) for e in row])
    entropies = torch.stack([entropy_bits(c) for c, _, _ in per_layer], dim=1)  # [features, layers]
    columns["expert_entropy"] = entropies.tolist()
    return columns


def expert_table(state: dict, layers: list[int], first_feature: int, top: int) -> pa.Table:
    """experts.parquet rows: per (layer, expert) its load and its top features by lift_low."""
    rows = {name: [] for name in EXPERT_SCHEMA.names}
    tokens = max(int(state["tokens"]), 1)
    for layer in layers:
        counts, lift, low = lifts(state, layer)
        low = low.masked_fill(counts == 0, -1.0)
        best = low.T.topk(min(top, low.shape[0]), dim=1).indices  # [experts, top]
        for e, features in enumerate(best.tolist()):
            features = [f for f in features if counts[f, e] > 0]
            load = int(state[f"load_L{layer}"][e])
            for name, value in (("layer", layer), ("expert", e), ("expert_id", expert_id(layer, e)), ("load", load),
                                ("load_frac", load / tokens), ("features", [first_feature + f for f in features]),
                                ("feature_lift", [float(lift[f, e]) for f in features]),
                                ("feature_lift_low", [float(low[f, e]) for f in features]),
                                ("feature_count", [int(counts[f, e]) for f in features])):
                rows[name].append(value)
    return pa.table(rows, schema=EXPERT_SCHEMA)


def write_experts(out: Path, table: pa.Table) -> None:
    with replacing(LabelFiles(out).experts) as tmp:
        pq.write_table(table, tmp)


def merge_expert_tables(tables: list[pa.Table], top: int) -> pa.Table:
    """One site's experts.parquet from its feature slices': the same loads, each expert's features
    from every slice ranked again by lift_low."""
    merged = tables[0].to_pydict()
    lists = ("features", "feature_lift", "feature_lift_low", "feature_count")
    for table in tables[1:]:
        other = table.to_pydict()
        for name in lists:
            merged[name] = [a + b for a, b in zip(merged[name], other[name])]
    for i in range(len(merged["expert"])):
        order = sorted(range(len(merged["features"][i])), key=lambda j: -merged["feature_lift_low"][i][j])[:top]
        for name in lists:
            merged[name][i] = [merged[name][i][j] for j in order]
    return pa.table(merged, schema=EXPERT_SCHEMA)

