"""The feature browser's data: the label stage's tables turned into files a browser fetches.

    runs/<run>/features/<site>/{features,examples}.parquet, meta.json   (from `make label`)
        ->
    runs/<run>/report/index.html, app.js, style.css   the page itself, copied from features/static/
    runs/<run>/report/data/sites.json                 every site: its meta.json plus counts
    runs/<run>/report/data/<site>/index.json          columnar arrays for the index table
    runs/<run>/report/data/<site>/chunk-<k>.json      everything about features k*chunk_size ..
    runs/<run>/report/data/<site>/experts.json        MoE runs with routing: each expert's load and top features

The page fetches one site's index when it opens it and one chunk when it opens a feature,
so a site of 65,536 features opens fast however many example contexts it has.

Tokens and labels are corpus text and may hold markup: they are written only as JSON
strings, and app.js puts them on the page with textContent, never as HTML.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from activations.rundir import LabelFiles
from activations.sites import Site
from features.tables import read_steering_results
from activations.errors import DialboxError

STATIC = Path(__file__).parent / "static"
KINDS = ("top", "quantile", "random")


class ReportError(DialboxError, ValueError):
    """Feature tables that are missing, incomplete or inconsistent."""


def build_report(features_dir: Path, out: Path, sites: list[str] = (), chunk_size: int = 128,
                 index_top_tokens: int = 5) -> list[dict]:
    """Write the browser for `sites` (default: all) to `out`; returns each site's summary."""
    site_dirs = find_sites(Path(features_dir), sites)
    # Built beside `out` and swapped in at the end, so a browser never reads a half-written report.
    partial = Path(out).with_name(Path(out).name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(STATIC, partial)
    try:
        summaries = [write_site(d, partial / "data" / d.name, chunk_size, index_top_tokens) for d in site_dirs]
        write_json(partial / "data" / "sites.json", {"chunk_size": chunk_size, "sites": summaries})
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    os.replace(partial, out)
    return summaries


def find_sites(features_dir: Path, wanted: list[str]) -> list[Path]:
    if not features_dir.is_dir():
        raise ReportError(f"no feature tables in {features_dir}: run `make label` first")
    names = [str(Site.parse(s)) for s in wanted] or [p.name for p in features_dir.iterdir() if p.is_dir()]
    if not names:
        raise ReportError(f"no sites in {features_dir}: run `make label` first")
    dirs = [features_dir / name for name in sorted(names, key=Site.parse)]
    for d in dirs:
        files = LabelFiles(d)
        for path in (files.meta, files.features, files.examples):
            if not path.is_file():
                raise ReportError(f"{d} has no {path.name}: run `make label` for site {d.name}")
    return dirs


def write_site(src: Path, dst: Path, chunk_size: int, index_top_tokens: int) -> dict:
    files = LabelFiles(src)
    meta = json.loads(files.meta.read_text())
    features = pq.read_table(files.features).sort_by("index")
    check_features(src, meta, features)
    dst.mkdir(parents=True)
    labels = features.column("label").to_pylist()
    index = index_columns(features, labels, index_top_tokens)
    write_json(dst / "index.json", index)
    examples = example_rows(files.examples)
    steering = read_steering_results(src)
    for k, chunk in enumerate(feature_chunks(features, labels, examples, chunk_size, steering)):
        write_json(dst / f"chunk-{k}.json", chunk)
    if files.experts.is_file():
        write_json(dst / "experts.json", expert_records(pq.read_table(files.experts), labels))
    n_dead, n_labelled = sum(index["dead"]), sum(label is not None for label in labels)
    return {**meta, "n_dead": n_dead, "n_labelled": n_labelled, "n_unlabelled": len(labels) - n_labelled - n_dead}


def check_features(src: Path, meta: dict, features: pa.Table) -> None:
    if meta.get("site") != src.name:
        raise ReportError(f"{src}/meta.json is for site {meta.get('site')!r}: run `make label` for site {src.name}")
    # The browser finds feature i at position i and in chunk i // chunk_size.
    n = meta["n_features"]
    if not np.array_equal(features.column("index").to_numpy(), np.arange(n)):
        raise ReportError(f"{src}/features.parquet holds {features.num_rows} rows, not features 0..{n - 1} once "
                          f"each (a label.features slice?): run `make label` for the whole site {src.name}")


def index_columns(features: pa.Table, labels: list, top_n: int) -> dict:
    """What the index table shows, searches and sorts by, one array per column (small to parse)."""
    column = features.column
    return {
        "index": column("index").to_pylist(),
        "label": labels,
        "dead": [int(d) for d in column("dead").to_pylist()],
        "density": [sig(x, 3) for x in column("density").to_pylist()],
        "max_act": [sig(x, 4) for x in column("max_act").to_pylist()],
        "score": [sig(x, 3) for x in column("score").to_pylist()],
        "top": [tokens[:top_n] for tokens in column("top_tokens").to_pylist()],
        # Written by later stages (make label's output score, make steer-features): null when not run.
        **{key: [sig(x, 3) for x in optional_column(features, name)] for key, name in
           (("output", "output_score"), ("steer", "steer_score"))},
        "steers": [None if x is None else int(x) for x in optional_column(features, "steers")],
    }


def optional_column(features: pa.Table, name: str) -> list:
    return features.column(name).to_pylist() if name in features.column_names else [None] * features.num_rows


def feature_chunks(features: pa.Table, labels: list, examples, chunk_size: int, steering: dict | None = None):
    """Yield lists of `chunk_size` feature records, each with its examples, reading examples once."""
    row = next(examples, None)
    for start in range(0, features.num_rows, chunk_size):
        chunk = [feature_record(f, labels, (steering or {}).get(f["index"]))
                 for f in features.slice(start, chunk_size).to_pylist()]
        end = start + len(chunk)
        while row is not None and row["index"] < end:
            index = row.pop("index")
            if index < start:
                raise ReportError("examples.parquet is not sorted by feature index: run `make label` again")
            row["max_act"] = sig(row["max_act"], 4)
            chunk[index - start]["examples"][row.pop("kind")].append(row)
            row = next(examples, None)
        for record in chunk:
            for rows in record["examples"].values():
                rows.sort(key=lambda e: (e["quantile"], e["rank"]))
        yield chunk
    if row is not None:
        raise ReportError(f"examples.parquet has examples of feature {row['index']}, "
                          f"beyond the {features.num_rows} features: run `make label` again")


def feature_record(row: dict, labels: list, steering: dict | None = None) -> dict:
    """One feature as the feature page reads it: value/token pairs zipped, neighbours with labels,
    its steering evaluation when there is one."""
    for key, digits in (("density", 3), ("max_act", 4), ("mean_act", 4),
                        ("detection", 3), ("fuzzing", 3), ("score", 3), ("output_score", 3)):
        row[key] = sig(row.get(key), digits)
    row["steering"] = steering_record(steering) if steering else None
    row["id"] = row.pop("feature_id")
    for side in ("logit_pos", "logit_neg"):
        row[side] = [[tok, sig(v, 3)] for tok, v in zip(row[side], row.pop(f"{side}_values"))]
    row["neighbours"] = [[n, sig(c, 3), labels[n]] for n, c in zip(row["neighbours"], row.pop("neighbour_cos"))]
    row["examples"] = {kind: [] for kind in KINDS}
    if "experts" in row:  # [expert ID, lift, lift's lower bound, co-occurrences], best first
        row["experts"] = [[e, sig(lift, 3), sig(low, 3), n] for e, lift, low, n in
                          zip(row["experts"], row.pop("expert_lift"), row.pop("expert_lift_low"), row.pop("expert_count"))]
        row["expert_entropy"] = [sig(h, 3) for h in row["expert_entropy"]]
    return row


def expert_records(experts: pa.Table, labels: list) -> list[dict]:
    """The site's expert view: per (layer, expert) its load and its top features, with their labels."""
    return [{"id": e["expert_id"], "layer": e["layer"], "expert": e["expert"], "load": e["load"],
             "load_frac": sig(e["load_frac"], 3),
             "features": [[f, sig(lift, 3), sig(low, 3), n, labels[f]] for f, lift, low, n in
                          zip(e["features"], e["feature_lift"], e["feature_lift_low"], e["feature_count"])]}
            for e in experts.to_pylist()]


def steering_record(r: dict) -> dict:
    """What the page's Steering section shows: each dial's test numbers beside the unsteered model and the prompt
    baseline, and two sample answers of each; model text stays plain JSON strings (the page sets text nodes)."""
    dials = [d for d in (r, r.get("tuned")) if d]
    examples = [{"prompt": e["prompt"], "unsteered": e["unsteered"], "baseline": e.get("baseline", "")}
                for e in r.get("examples", [])]
    for d in dials:
        for e, answer in zip(examples, d.get("examples", [])):
            e[d["dial"]] = answer["steered"]
    return {"steers": r["steers"], "dial": r["dial"], "prompts": r["prompts"],
            "baseline_instruction": r.get("baseline_instruction", ""), "control_feature": r.get("control_feature"),
            "criteria": r.get("criteria"),
            "unsteered": condition_record(r["unsteered"]), "baseline": condition_record(r["baseline"]),
            "dials": [dial_record(d) for d in dials], "tuned_reason": r.get("tuned_reason"), "examples": examples}


def condition_record(scores: dict) -> dict:
    return {"presence": sig(scores.get("presence"), 3), "concept": sig(scores.get("concept"), 3)}


def dial_record(d: dict) -> dict:
    out = {"dial": d["dial"], "setting": d["setting"], "visibly": bool(d.get("visibly")),
           **{k: sig(d.get(k), 3) for k in ("presence", "presence_gain", "presence_over_control", "presence_over_baseline",
                                            "concept", "gain", "perplexity_ratio", "repeats")}}
    out["presence_gain_ci95"] = [sig(x, 3) for x in d.get("presence_gain_ci95") or []]
    return out


def example_rows(path: Path, batch_rows: int = 4096):
    """examples.parquet row by row in file order, a batch at a time: it can be gigabytes."""
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows):
        table = pa.Table.from_batches([batch])
        table = table.set_column(table.schema.get_field_index("acts"), "acts", rounded_acts(table))
        yield from table.to_pylist()


def rounded_acts(table: pa.Table) -> pa.ListArray:
    """Activations to 4 significant digits of each context's peak, all the page can show (a float32
    printed in full takes 18 characters, and a chunk file holds thousands of them)."""
    acts = table.column("acts").combine_chunks()
    lengths = pc.list_value_length(acts).to_numpy(zero_copy_only=False)
    values = acts.flatten().to_numpy(zero_copy_only=False).astype(np.float64)
    peak = np.repeat(np.abs(table.column("max_act").to_numpy(zero_copy_only=False)).astype(np.float64), lengths)
    decimals = np.clip(3 - np.floor(np.log10(np.maximum(peak, 1e-9))), 0, 9)
    scale = 10.0 ** decimals  # whole powers of ten, so 0.123 prints as 0.123
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.round(values * scale) / scale))


def sig(x: float | None, digits: int) -> float | None:
    """A number for the page, to `digits` significant digits; null stays null (and so does NaN)."""
    if x is None or not math.isfinite(x):
        return None
    return float(f"{x:.{digits}g}")


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False), encoding="utf-8")
