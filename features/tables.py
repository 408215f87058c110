"""The label stage's output files in `runs/<run>/features/<site>/` (the report reads these):

  features.parquet  one row per feature: stats, label, label source, scores, top tokens, logit
                    lens, neighbours, activation histogram (bin edges in meta.json)
  examples.parquet  one row per example context, sorted by feature, with its split
  experts.parquet   MoE models with stored routing: one row per (routed layer, expert), its load and
                    the features that most select it (features/experts.py)
  meta.json         what was mined with what
  steering.jsonl    make steer-features' result per feature, one JSON line each (appended as it goes)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from activations.atomic import replacing, temporary_beside, write_text
from activations.rundir import LabelFiles
from features.examples import Example
from features.experts import FEATURE_FIELDS, merge_expert_tables, write_experts

FEATURE_SCHEMA = pa.schema([
    ("index", pa.int32()), ("feature_id", pa.string()), ("density", pa.float64()), ("max_act", pa.float32()),
    ("mean_act", pa.float32()), ("dead", pa.bool_()), ("label", pa.string()), ("label_source", pa.string()),
    ("label_error", pa.string()), ("detection", pa.float32()), ("fuzzing", pa.float32()), ("score", pa.float32()),
    ("top_tokens", pa.list_(pa.string())), ("logit_pos", pa.list_(pa.string())),
    ("logit_pos_values", pa.list_(pa.float32())), ("logit_neg", pa.list_(pa.string())),
    ("logit_neg_values", pa.list_(pa.float32())), ("neighbours", pa.list_(pa.int32())),
    ("neighbour_cos", pa.list_(pa.float32())), ("hist_counts", pa.list_(pa.int64())),
    ("output_score", pa.float32()),
])
EXAMPLE_SCHEMA = pa.schema([
    ("index", pa.int32()), ("kind", pa.string()), ("rank", pa.int32()), ("quantile", pa.int32()),
    ("start", pa.int64()), ("tokens", pa.list_(pa.string())), ("acts", pa.list_(pa.float32())),
    ("max_act", pa.float32()), ("split", pa.string()),
])


class ExampleWriter:
    """Appends the examples of successive features to examples.parquet (renamed into place on close)."""

    def __init__(self, out: Path, context_tokens: int):
        self.path, self.context_tokens = LabelFiles(out).examples, context_tokens
        self.tmp = temporary_beside(self.path)
        self.writer = pq.ParquetWriter(self.tmp, EXAMPLE_SCHEMA)

    def write(self, by_feature: dict[int, list[Example]]) -> None:
        rows = [(f, ex) for f, examples in by_feature.items() for ex in examples]
        columns = {
            "index": [f for f, _ in rows], "kind": [ex.kind for _, ex in rows], "rank": [ex.rank for _, ex in rows],
            "quantile": [ex.quantile for _, ex in rows], "start": [ex.block * self.context_tokens for _, ex in rows],
            "tokens": [ex.tokens for _, ex in rows], "acts": [ex.acts.tolist() for _, ex in rows],
            "max_act": [ex.peak for _, ex in rows], "split": [ex.split for _, ex in rows],
        }
        self.writer.write_table(pa.table(columns, schema=EXAMPLE_SCHEMA))

    def close(self) -> None:
        self.writer.close()
        os.replace(self.tmp, self.path)


def write_features(out: Path, columns: dict) -> None:
    schema = pa.schema([*FEATURE_SCHEMA, *FEATURE_FIELDS]) if "experts" in columns else FEATURE_SCHEMA
    write_features_table(out, pa.table(columns, schema=schema))


def write_features_table(out: Path, table: pa.Table) -> None:
    with replacing(LabelFiles(out).features) as tmp:
        pq.write_table(table, tmp)


def set_feature_columns(site_dir: Path, columns: dict[str, dict[int, object]], types: dict[str, str]) -> None:
    """Replace (or add) columns of a site's features.parquet, given as {name: {feature index: value}};
    features not given get null. Later stages (steering's evaluation) add their results this way."""
    table = pq.read_table(LabelFiles(site_dir).features)
    index = table.column("index").to_pylist()
    for name, values in columns.items():
        array = pa.array([values.get(i) for i in index], type=pa.type_for_alias(types[name]))
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, array)
        else:
            table = table.append_column(name, array)
    write_features_table(site_dir, table)


def write_meta(out: Path, meta: dict) -> None:
    write_text(LabelFiles(out).meta, json.dumps(meta, indent=2))


def merge_parts(site_dir: Path) -> bool:
    """Merge site_dir/parts/<start>-<stop>/ into site_dir once the parts cover every feature.

    Returns False (and changes nothing) while slices are missing. Two jobs finishing together
    both merge the same parts into the same files, each file replaced atomically.
    """
    site = LabelFiles(site_dir)
    parts = sorted(((json.loads(p.meta.read_text()), p) for p in site.parts() if p.complete()),
                   key=lambda part: part[0]["features"][0])
    covered = 0
    for meta, _ in parts:
        if meta["features"][0] != covered:
            return False
        covered = meta["features"][1]
    if not parts or covered != parts[0][0]["n_features"]:
        return False
    write_features_table(site_dir, pa.concat_tables(pq.read_table(p.features) for _, p in parts))
    with replacing(site.examples) as tmp, pq.ParquetWriter(tmp, EXAMPLE_SCHEMA) as writer:
        for _, p in parts:
            for batch in pq.ParquetFile(p.examples).iter_batches():
                writer.write_batch(batch)
    if parts[0][1].experts.exists():
        write_experts(site_dir, merge_expert_tables([pq.read_table(p.experts) for _, p in parts],
                                                    parts[0][0]["expert_features"]))
    meta = {**parts[0][0], "features": [0, covered], "llm_features": sum(m["llm_features"] for m, _ in parts),
            "parts": [m["features"] for m, _ in parts]}
    write_meta(site_dir, meta)
    return True


def read_steering_results(site_dir: Path) -> dict[int, dict]:
    """make steer-features' result per feature index, the last one kept. A line cut short by a kill
    is the feature that was being evaluated: it is skipped, so a rerun redoes it; so is a result from
    before dials were compared by presence (no presence_gain)."""
    path = LabelFiles(site_dir).steering
    results = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            result = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "presence_gain" in result:
            results[result["index"]] = result
    return results


def append_steering_result(site_dir: Path, result: dict) -> None:
    """One feature's result, durable before the next feature starts."""
    path = LabelFiles(site_dir).steering
    path.parent.mkdir(parents=True, exist_ok=True)
    cut = path.exists() and path.stat().st_size and not path.read_bytes().endswith(b"\n")
    with open(path, "a") as f:
        f.write(("\n" if cut else "") + json.dumps(result) + "\n")  # never onto a line a kill cut short
        f.flush()
        os.fsync(f.fileno())


def feature_labels(run, site: str) -> dict[int, str]:
    """{feature index: its label} of a labelled site of a RunDir ({} before the label stage)."""
    columns = run.feature_table(site, ["index", "label"])
    if not columns or "label" not in columns:
        return {}
    return {int(i): str(label or "") for i, label in zip(columns["index"], columns["label"])}
