"""make steer-features: which features steer, measured, stored, shown; and the output score."""

from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from activations.rundir import RunDir
from activations.sites import FeatureId, Site
from conftest import SMOL_SITE, compose_config, copy_run, run_stage
from features.report import build_report
from features.tables import set_feature_columns
from pipeline.steer import run_action
from steering.exports import export_ds4, export_gguf
from steering.feature_eval import (FeatureEvaluation, auroc, baseline_instruction, choose_setting, evaluate_features,
                                   group_line, predictor_scores, repeat_share, save_dial, summary)
from steering.interventions import SteeringError
from steering.steerer import Steerer, tuned_dial_name
from steering.vectors import SteeringVector, VectorError

QUICK = ["steer_features.dev_prompts=2", "steer_features.test_prompts=4", "steer_features.add_scales=[0.5]",
         "steer_features.clamp_scales=[4.0]", "steer_features.prompt_scales=[1.0]", "steer_features.max_new_tokens=6", "steer_features.batch_size=4",
         "steer_features.bootstrap=50", "steer_features.tune.steps=2", "steer_features.tune.samples=1",
         "steer_features.tune.scales=[1.0]"]


def steer_config(runs, *overrides):
    return compose_config("steer", [f"run.runs_dir={runs}", *QUICK, *overrides])


@pytest.fixture(scope="module")
def evaluated(smol_labelled, tmp_path_factory):
    """A labelled run with two features evaluated (one given by ID, one sampled) through the stage."""
    runs = copy_run(smol_labelled, tmp_path_factory.mktemp("steer_features") / "runs")
    table = RunDir(str(runs), "demo").feature_table(SMOL_SITE, ["index", "dead"])
    given = next(i for i, dead in zip(table["index"], table["dead"]) if not dead)
    outcome = run_action("features", steer_config(runs, "steer_features.n=1", f"steer_features.features=[{SMOL_SITE}/{given}]"))
    return runs, given, outcome


@pytest.fixture(scope="module")
def steerer(evaluated):
    """One Steerer over the evaluated run, for the tests that evaluate again (no second model load each)."""
    return Steerer(evaluated[0] / "demo")


def test_helpers_measure_what_they_say():
    assert repeat_share(torch.tensor([5, 6, 5, 6, 5, 6, 5, 6])) == pytest.approx(1 - 2 / 5)
    assert repeat_share(torch.tensor([1, 2, 3, 4, 5, 6])) == 0.0 and repeat_share(torch.tensor([1, 2])) == 0.0
    assert baseline_instruction('tokens "LORD", "God"') == "Use the words LORD, God in your answer."
    assert baseline_instruction("the sea and ships") == "Mention the sea and ships in your answer."
    # the word a completion hint names comes first; punctuation tokens are no words to use
    assert (baseline_instruction('tokens "fore", "\' \'", "aned" (often "Wherefore")')
            == "Use the words Wherefore, fore, aned in your answer.")
    assert auroc([0.9, 0.8, 0.1, 0.2], [True, True, False, False]) == 1.0
    assert auroc([0.1, 0.2], [True, True]) is None


def test_the_summary_counts_visible_steering_per_dial_and_scores_each_predictor():
    def dial(name, gain, visibly):
        return {"dial": name, "presence_gain": gain, "presence_over_baseline": gain - 0.2, "within_limits": True,
                "visibly": visibly, "gain": gain / 10, "perplexity_ratio": 1.5, "repeats": 0.0, "train_seconds": 30.0}

    def result(index, tuned_gain, op="add"):
        tuned = dial("tuned", tuned_gain, tuned_gain >= 0.25) if tuned_gain is not None else None
        return {"index": index, "op": op, **dial("decoder", 0.0, False), "tuned": tuned,
                "steers": bool(tuned and tuned["visibly"]), "unsteered": {"presence": 0.1}, "baseline": {"presence": 0.3}}

    results = [result(0, 0.5), result(1, 0.1), result(2, 0.3, "clamp"), result(3, None)]
    s = summary(results, {"output_score": {0: 0.9, 1: 0.1, 2: 0.5}, "other": {}})
    assert s["steer_share"] == 0.5 and s["by_op"] == {"add": 3, "clamp": 1}
    assert s["dials"]["tuned"]["made"] == 3 and s["dials"]["tuned"]["visibly"] == 0.5  # of all 4 features
    assert s["dials"]["tuned"]["presence_gain"] == pytest.approx(0.3) and s["dials"]["decoder"]["visibly"] == 0.0
    assert s["dials"]["tuned"]["matches_baseline"] == 0.5  # gains 0.5 and 0.3 reach the baseline's +0.2
    assert s["predictors"] == {"output_score": 1.0, "other": None}  # feature 3 has no score; no scores: no AUROC
    assert s["baseline_presence_gain"] == pytest.approx(0.2)
    line = group_line("top 2", results[:2])  # the report's line per group (the random sample, the predictor's top)
    assert line.startswith("- top 2: 2 features, **50% steer visibly**") and "tuned 50%" in line and "decoder 0%" in line


@pytest.mark.slow
def test_a_short_evaluation_stores_its_results_and_the_report_shows_them(evaluated):
    runs, given, outcome = evaluated
    results = outcome["results"]
    assert [r["index"] for r in results][0] == given and len(results) == 2 and outcome["evaluated_now"] == 2
    assert outcome["groups"] == {"random sample (1)": {results[1]["index"]}}  # the given feature is in no group
    for r in results:
        assert r["op"] in ("add", "clamp") and r["prompts"] == 4 and len(r["dev"]["sweep"]) == 3
        assert r["positions"] == ("prompt" if r["dev"]["setting"] == "add 1 (norm, prompt only)" else "all")
        assert 0 <= r["concept"] <= 1 and 0 <= r["fluency"] <= 1 and isinstance(r["steers"], bool)
        low, high = r["gain_over_control_ci95"]
        assert low <= r["gain_over_control"] <= high
        assert r["control_feature"] != r["feature"] and len(r["examples"]) == 2
    site_dir = runs / "demo" / "features" / SMOL_SITE
    table = pq.read_table(site_dir / "features.parquet").to_pydict()
    evaluated_rows = [k for k, op in enumerate(table["steer_op"]) if op is not None]
    assert sorted(table["index"][k] for k in evaluated_rows) == sorted(r["index"] for r in results)
    assert all(table["steer_prompts"][k] == 4 and table["steers"][k] is not None for k in evaluated_rows)
    assert "output_score" in table and sum(v is not None for v in table["output_score"]) > 0
    scores = predictor_scores(RunDir.at(runs / "demo"), SMOL_SITE)  # what make steer-features' AUROCs are of
    assert set(scores) == {"output_score", "density"} and all(i in scores["density"] for i in table["index"])

    assert all(table["steer_dial"][k] in ("decoder", "tuned") for k in evaluated_rows)
    assert [table["steer_positions"][k] for k in evaluated_rows] == [next(r["positions"] for r in results if r["index"] ==
                                                                          table["index"][k]) for k in evaluated_rows]
    for r in results:  # the tuned dial is a named vector with its provenance, or the reason there is none
        assert (r["tuned"] is None) == bool(r["tuned_reason"])
        if r["tuned"]:
            meta = json.loads((runs / "demo" / "vectors" / f"{r['tuned']['vector']}.json").read_text())
            source = meta["source"]
            assert source["features"] == [r["feature"]] and source["method"] == "tuned" and source["steps"] == 2
            assert meta["positions"] == r["tuned"]["positions"] == "prompt"  # tune.positions' default

    build_report(site_dir.parent, runs / "demo" / "report")
    data = runs / "demo" / "report" / "data" / SMOL_SITE
    index = json.loads((data / "index.json").read_text())
    assert sum(v is not None for v in index["steer"]) == 2 and "output" in index
    chunk = json.loads((data / f"chunk-{given // 128}.json").read_text())
    shown = next(f for f in chunk if f["index"] == given)["steering"]
    assert shown["dials"][0]["setting"] == results[0]["dev"]["setting"]
    assert shown["examples"][0]["decoder"] == results[0]["examples"][0]["steered"]
    assert shown["examples"][0]["baseline"] == results[0]["examples"][0]["baseline"]


@pytest.mark.slow
def test_a_feature_id_steers_with_its_best_dial_and_dial_picks_one(evaluated, steerer, tmp_path, monkeypatch):
    runs, given, outcome = evaluated
    monkeypatch.setattr(steerer, "run", RunDir.at(copy_run(runs, tmp_path / "runs") / "demo"))  # written below
    monkeypatch.setattr(steerer, "_calibrations", {})
    feature, site = FeatureId.parse(f"{SMOL_SITE}/{given}"), Site.parse(SMOL_SITE)
    direction = torch.randn(576, generator=torch.Generator().manual_seed(0))
    save_dial(steerer, tuned_dial_name(feature), site, direction, {"method": "tuned", "features": [str(feature)]},
              "prompt")
    for best in ("decoder", "tuned"):
        set_feature_columns(steerer.run.features(SMOL_SITE), {"steer_dial": {given: best}}, {"steer_dial": "string"})
        steerer._calibrations.clear()
        edit = steerer.resolve([str(feature)])[site][0]  # no op, scale or dial: the best dial
        if best == "tuned":
            assert edit.op == "add" and edit.amount == 1.0 and torch.equal(edit.vector.cpu(), direction)
            assert edit.positions == "prompt"  # where it was tuned to act ...
            assert steerer.resolve([f"{feature} positions=all"])[site][0].positions == "all"  # ... unless told
            assert any("tuned dial" in note for note in steerer.notes)
        else:
            chosen = outcome["results"][0]
            assert edit.op == chosen["op"] and any("calibrated setting" in note for note in steerer.notes)
            assert edit.positions == chosen["positions"]
    decoder_row = steerer.sae(site).W_dec[given].detach().float()
    assert torch.equal(steerer.resolve([f"{feature} dial=decoder"])[site][0].vector, decoder_row)
    assert torch.equal(steerer.resolve([f"{feature} scale=2"])[site][0].vector, decoder_row)  # a scale: the decoder row
    assert steerer.resolve([f"{feature} dial=tuned scale=0.5"])[site][0].amount == 0.5

    other = next(i for i in range(given + 1, 10_000) if not (steerer.run.vectors / f"{SMOL_SITE}-{i}-tuned.json").exists())
    for spec, words in [(f"{SMOL_SITE}/{other} dial=tuned", "has no tuned dial"), (f"{feature} dial=best", "bad dial"),
                        (f"{feature} dial=tuned op=clamp", "a tuned dial is added"),
                        (f"{tuned_dial_name(feature)} dial=tuned", "dial is for features")]:
        with pytest.raises(SteeringError, match=words):
            steerer.resolve([spec])

    # a dial exports as vectors do: a llama.cpp control vector at its layer (ds4 takes no resid_post)
    vector = SteeringVector.load(steerer.run.vectors, tuned_dial_name(feature))
    path = export_gguf(vector, tmp_path / "gguf")[0]
    reader = gguf.GGUFReader(path)
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    assert reader.fields["dialbox.positions"].contents() == "prompt"
    np.testing.assert_array_equal(tensors["direction.3"], direction.numpy())
    with pytest.raises(VectorError, match="ds4 steers only at ffn_out"):
        export_ds4(vector, tmp_path / "ds4")


@pytest.mark.slow
def test_bad_input_is_refused_in_one_line(evaluated, steerer):
    runs = evaluated[0]
    table = steerer.run.feature_table(SMOL_SITE, ["index", "dead"])
    dead = next((i for i, d in zip(table["index"], table["dead"]) if d), None)
    cases = [(f"{SMOL_SITE}/99999", "unknown feature"), ("L5.resid_post/1", "not at the evaluated site")]
    if dead is not None:
        cases.append((f"{SMOL_SITE}/{dead}", "is dead"))
    for feature, words in cases:
        with pytest.raises(SteeringError, match=words):
            evaluate_features(steerer, steer_config(runs, f"steer_features.features=[{feature}]").steer_features)
    result = run_stage("pipeline.steer", "features", f"run.runs_dir={runs}", "steer_features.site=L5.resid_post",
                       check=False)
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert result.returncode == 2 and len(errors) == 1 and "no SAE at" in errors[0]
    assert result.stderr.rstrip().endswith(errors[0])


@pytest.mark.slow
def test_the_judge_rates_through_an_openai_compatible_endpoint(server, smol_labelled, tmp_path):
    runs = copy_run(smol_labelled, tmp_path / "runs")
    base_url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    outcome = run_action("features", steer_config(runs, "steer_features.n=1", f"steer_features.judge.base_url={base_url}",
                                                  "steer_features.judge.model=smollm2_135m"))
    result = outcome["results"][0]
    judged = result["judge"]
    assert set(judged) == {"decoder", "baseline"} | ({"tuned"} if result["tuned"] else set())
    assert all(set(r) == {"concept", "relevance", "fluency"} for r in judged.values())
    assert all(0 <= v <= 1 for r in judged.values() for v in r.values() if v == v)  # nan: no usable rating
    assert (runs / "demo" / "steer_eval" / "judge_cache.jsonl").exists()


@pytest.mark.slow
def test_a_rerun_evaluates_only_what_is_not_done_and_redoes_a_line_cut_by_a_kill(evaluated, steerer):
    """Last in the module: it cuts the evaluated run's results file, and the rerun restores it."""
    runs, given, first = evaluated
    path = runs / "demo" / "features" / SMOL_SITE / "steering.jsonl"
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])  # killed while writing the second
    cfg = steer_config(runs, "steer_features.n=1", f"steer_features.features=[{given}]").steer_features
    outcome = evaluate_features(steerer, cfg)
    assert outcome["evaluated_now"] == 1
    assert [r["index"] for r in outcome["results"]] == [r["index"] for r in first["results"]]
    assert evaluate_features(steerer, cfg)["evaluated_now"] == 0


CONCEPT_SITE = "L15.resid_post"  # mid-depth, the demo's site: where SmolLM2's rows carry topics
SEA = ["The ocean waves crashed against the rocky shore as the tide came in.",
       "Sailors crossed the stormy sea in a small ship, far from any harbour.",
       "Whales and dolphins swim in the deep blue waters of the Pacific Ocean.",
       "We walked along the beach and watched the surf roll over the sand."]
LAND = ["The committee approved the budget for the new library building.",
        "She baked bread in the kitchen and served it with butter and jam.",
        "The train to the city leaves the station every hour in the morning.",
        "He wrote a letter to his brother about the harvest and the weather."]


def diff_mean(steerer, site: str, texts: list[str], others: list[str]) -> torch.Tensor:
    """The mean row of `texts` at `site` minus that of `others` (each text's first row left out: its norm is an
    outlier). Between sentences about the sea and others, its top rows in the demo corpus are " seas", " waters",
    " waves", " ocean", " sea", " depths", " coasts": a sea direction."""
    def mean(batch):
        ids = [steerer.tokenizer(t, return_tensors="pt").input_ids for t in batch]
        return torch.cat([steerer.adapter.capture([site], i)[Site.parse(site)][0, 1:] for i in ids]).float().mean(0)

    with torch.inference_mode():
        return mean(texts) - mean(others)


def plant(sae_dir, index: int, direction: torch.Tensor, store, site: str, read: bool = True,
          quantile: float = 0.99) -> None:
    """Make feature `index` write `direction` (its decoder row) and, with `read`, also read it: it then
    fires, strongly enough for TopK to keep it, on rows whose component along the direction is above the
    store's `quantile`."""
    from safetensors.torch import load_file, save_file

    weights = load_file(sae_dir / "sae_weights.safetensors")
    unit = direction / direction.norm()
    if read:
        rows = torch.from_numpy(store.read(site, 0, store.n_tokens)) - weights["b_dec"]
        weights["W_enc"][:, index] = unit * 1000
        weights["b_enc"][index] = -1000 * torch.quantile(rows @ unit, quantile)
    weights["W_dec"][index] = unit * weights["W_dec"].norm(dim=1).mean()
    save_file(weights, sae_dir / "sae_weights.safetensors")


@pytest.mark.slow
def test_a_feature_built_to_steer_gets_dials_that_steer_visibly_and_a_random_direction_does_not(tmp_path):
    """A planted concept feature (it reads and writes a sea direction: it fires on the top 1% of the store's
    rows along it, " waters", " seas", ...) steers visibly, by its decoder row and by its tuned dial: a quarter
    more test answers about the sea than unsteered and than the random control, within the fluency limits. A
    feature whose decoder row is replaced by a random direction (it still reads what it read) steers by neither."""
    from activations.harvesting import harvest
    from features.label import label
    from sae.training import train

    runs = tmp_path / "runs"
    common = [f"run.runs_dir={runs}"]
    harvest(compose_config("harvest", [*common, f"harvest.sites=[{CONCEPT_SITE}]", "harvest.max_tokens=2048",
                                       "model.dtype=auto", "data.context_length=64", "harvest.batch_size=8",
                                       "store.chunk_rows=256"]))
    train(compose_config("train", [*common, "sae.expansion_factor=1", "sae.k=8", "train.batch_size=256",
                                   "eval.ce=false", "eval.tokens=256"]))
    label(compose_config("label", [*common, "label.output_score=false"]))
    run = RunDir(str(runs), "demo")
    table = run.feature_table(CONCEPT_SITE, ["index", "dead"])
    live = [i for i, dead in zip(table["index"], table["dead"]) if not dead]
    planted, random_index = live[0], live[1]
    steerer = Steerer(run.root)
    store = run.open_store()
    plant(run.saes(CONCEPT_SITE), planted, diff_mean(steerer, CONCEPT_SITE, SEA, LAND), store, CONCEPT_SITE)
    direction = torch.randn(576, generator=torch.Generator().manual_seed(0))
    plant(run.saes(CONCEPT_SITE), random_index, direction, store, CONCEPT_SITE, read=False)
    shutil.rmtree(run.features(CONCEPT_SITE))  # labelled again: max activations (presence's yardstick) of the planted SAE
    label(compose_config("label", [*common, "label.output_score=false"]))
    cfg = compose_config("steer", [
        *common, f"steer_features.site={CONCEPT_SITE}", "steer_features.n=0",
        f"steer_features.features=[{planted},{random_index}]", "steer_features.dev_prompts=8",
        "steer_features.test_prompts=16", "steer_features.max_new_tokens=16", "steer_features.batch_size=32",
        "steer_features.bootstrap=500",
        # A short sweep: the decoder row added everywhere and on the request only. The second gives the fluent dev
        # answers about the sea that the tuned dial learns from (3 of 8 here; sampled answers gave none).
        "steer_features.add_scales=[0.15]", "steer_features.clamp_scales=[]", "steer_features.prompt_scales=[0.5]",
        "steer_features.tune.steps=8", "steer_features.tune.samples=0", "steer_features.tune.scales=[0.5,1.0]"])
    prompts_in_training, splits = [], []
    tuned_dial, answers = FeatureEvaluation.tuned_dial, FeatureEvaluation.answers

    def tuning(self, *args):  # every prompt the tuned dial's data is generated from, recorded
        self.tuning = True
        splits.append((self.dev, self.test))
        try:
            return tuned_dial(self, *args)
        finally:
            self.tuning = False

    def answering(self, conditions, *args, **kwargs):
        if getattr(self, "tuning", False):
            prompts_in_training.extend(p for prompts, _, _ in conditions for p in prompts)
        return answers(self, conditions, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FeatureEvaluation, "tuned_dial", tuning)
        patch.setattr(FeatureEvaluation, "answers", answering)
        outcome = evaluate_features(steerer, cfg.steer_features)  # the steerer loads the SAE now: the planted one
    by_index = {r["index"]: r for r in outcome["results"]}
    planted_result, random_result = by_index[planted], by_index[random_index]
    assert "sea" in planted_result["label"].lower() or "water" in planted_result["label"].lower(), planted_result["label"]
    assert planted_result["tuned"], planted_result["tuned_reason"]
    for dial in (planted_result, planted_result["tuned"]):
        assert dial["visibly"], brief(dial)
    for dial in (random_result, random_result["tuned"]):
        assert dial is None or not dial["visibly"], brief(dial)
    assert not random_result["steers"]
    dev, test = splits[0]  # a test prompt never reaches a tuned dial's data: its answers come from dev prompts
    assert set(prompts_in_training) == set(dev) and set(prompts_in_training).isdisjoint(test) and len(test) == 16


def brief(dial: dict) -> dict:
    """A dial's test numbers, for an assertion's message."""
    return {k: dial[k] for k in ("dial", "setting", "presence", "presence_gain", "presence_gain_ci95",
                                 "gain_over_control_ci95", "perplexity_ratio", "repeats")}


def test_the_setting_is_chosen_within_the_perplexity_limit():
    sweep = [("mild", {"score": 0.10, "perplexity": 3.0, "repeats": 0.0}),
             ("strong", {"score": 0.30, "perplexity": 9.0, "repeats": 0.0}),
             ("middle", {"score": 0.20, "perplexity": 4.0, "repeats": 0.0}),
             ("loop", {"score": 0.25, "perplexity": 2.5, "repeats": 0.7})]  # "1111...": likely, and a loop
    assert choose_setting(sweep, max_perplexity=5.0, max_repeats=0.2)[0] == "middle"
    assert choose_setting(sweep, max_perplexity=2.0, max_repeats=0.2)[0] == "strong"  # none within: the best of all
