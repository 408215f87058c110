"""make steer-features: which features steer, measured, stored, shown; and the output score."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch

from activations.rundir import RunDir
from conftest import SMOL_SITE, compose_config, copy_run, run_stage
from features.report import build_report
from pipeline.steer import run_action
from steering.feature_eval import (auroc, baseline_instruction, choose_setting, evaluate_features, repeat_share,
                                   summary)
from steering.interventions import SteeringError
from steering.steerer import Steerer

QUICK = ["steer_features.dev_prompts=2", "steer_features.test_prompts=4", "steer_features.add_scales=[0.5]",
         "steer_features.clamp_scales=[4.0]", "steer_features.max_new_tokens=6", "steer_features.batch_size=4",
         "steer_features.bootstrap=50"]


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


def test_the_output_score_auroc_uses_only_the_features_that_have_one():
    def result(index, steers):
        return {"index": index, "steers": steers, "op": "add", "score": 0.5, "gain": 0.1, "gain_over_baseline": 0.0,
                "perplexity_ratio": 1.0}

    results = [result(0, True), result(1, False), result(2, True), result(3, False)]
    assert "output_score_auroc" not in summary(results, {})  # label.output_score=false: no scores at all
    assert "output_score_auroc" not in summary(results, {0: None, 1: None, 2: None, 3: None})
    assert summary(results, {0: 0.9, 1: 0.1, 2: None, 3: None})["output_score_auroc"] == 1.0


@pytest.mark.slow
def test_a_short_evaluation_stores_its_results_and_the_report_shows_them(evaluated):
    runs, given, outcome = evaluated
    results = outcome["results"]
    assert [r["index"] for r in results][0] == given and len(results) == 2 and outcome["evaluated_now"] == 2
    for r in results:
        assert r["op"] in ("add", "clamp") and r["prompts"] == 4 and len(r["dev"]["sweep"]) == 2
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

    build_report(site_dir.parent, runs / "demo" / "report")
    data = runs / "demo" / "report" / "data" / SMOL_SITE
    index = json.loads((data / "index.json").read_text())
    assert sum(v is not None for v in index["steer"]) == 2 and "output" in index
    chunk = json.loads((data / f"chunk-{given // 128}.json").read_text())
    shown = next(f for f in chunk if f["index"] == given)["steering"]
    assert shown["op"] == results[0]["op"] and shown["examples"][0]["steered"] == results[0]["examples"][0]["steered"]


@pytest.mark.slow
def test_a_feature_given_without_a_scale_steers_with_its_calibrated_setting(evaluated, steerer):
    runs, given, outcome = evaluated
    edit = next(iter(steerer.resolve([f"{SMOL_SITE}/{given}"]).values()))[0]
    chosen = outcome["results"][0]
    assert edit.op == chosen["op"] and any("calibrated setting" in note for note in steerer.notes)


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
    judged = outcome["results"][0]["judge"]
    assert set(judged) == {"steered", "baseline"}
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


LATE_SITE = "L28.resid_post"  # two blocks before the unembedding: a direction there writes the next token


def plant(sae_dir, index: int, direction: torch.Tensor, store, site: str, read: bool = True) -> None:
    """Make feature `index` write `direction` (its decoder row) and, with `read`, also read it: it then
    fires, strongly enough for TopK to keep it, on rows whose component along the direction is in the
    store's top 0.2%."""
    from safetensors.torch import load_file, save_file

    weights = load_file(sae_dir / "sae_weights.safetensors")
    unit = direction / direction.norm()
    if read:
        rows = torch.from_numpy(store.read(site, 0, store.n_tokens)) - weights["b_dec"]
        weights["W_enc"][:, index] = unit * 1000
        weights["b_enc"][index] = -1000 * torch.quantile(rows @ unit, 0.998)
    weights["W_dec"][index] = unit * weights["W_dec"].norm(dim=1).mean()
    save_file(weights, sae_dir / "sae_weights.safetensors")


@pytest.mark.slow
def test_a_feature_built_to_steer_steers_and_a_random_direction_does_not(tmp_path):
    """A planted output feature (it writes the unembedding direction of ' ocean' two blocks before the
    output, and reads the same direction) steers; a feature whose decoder row is replaced by a random
    direction (it still reads what it read) does not."""
    from activations.harvesting import harvest
    from features.label import label
    from sae.training import train

    runs = tmp_path / "runs"
    common = [f"run.runs_dir={runs}"]
    harvest(compose_config("harvest", [*common, f"harvest.sites=[{LATE_SITE}]", "harvest.max_tokens=2048", "model.dtype=auto",
                                       "data.context_length=64", "harvest.batch_size=8", "store.chunk_rows=256"]))
    train(compose_config("train", [*common, "sae.expansion_factor=1", "sae.k=8", "train.batch_size=256",
                                   "eval.ce=false", "eval.tokens=256"]))
    label(compose_config("label", [*common, "label.output_score=false"]))
    run = RunDir(str(runs), "demo")
    table = run.feature_table(LATE_SITE, ["index", "dead"])
    live = [i for i, dead in zip(table["index"], table["dead"]) if not dead]
    planted, random_index = live[0], live[1]
    steerer = Steerer(run.root)
    word = steerer.tokenizer(" ocean", add_special_tokens=False).input_ids[0]
    store = run.open_store()
    plant(run.saes(LATE_SITE), planted, steerer.model.get_output_embeddings().weight[word].detach().float(), store,
          LATE_SITE)
    direction = torch.randn(576, generator=torch.Generator().manual_seed(0))
    plant(run.saes(LATE_SITE), random_index, direction, store, LATE_SITE, read=False)
    cfg = compose_config("steer", [
        *common, f"steer_features.site={LATE_SITE}", "steer_features.n=0",
        f"steer_features.features=[{planted},{random_index}]", "steer_features.dev_prompts=4",
        "steer_features.test_prompts=16", "steer_features.add_scales=[0.15]", "steer_features.clamp_scales=[]",
        # Two blocks before the output a push of 0.15 x the mean norm already floods some answers with the word
        # (perplexity 2-2.5x, a quarter of the 4-grams repeated); the limits are loosened so that the test is
        # about the concept, not the limits.
        "steer_features.max_ppl_ratio=3", "steer_features.max_repeats=0.5",
        "steer_features.max_new_tokens=16", "steer_features.batch_size=16", "steer_features.bootstrap=500"])
    outcome = evaluate_features(steerer, cfg.steer_features)  # the steerer loads the SAE now: the planted one
    by_index = {r["index"]: r for r in outcome["results"]}
    assert by_index[planted]["steers"], by_index[planted]
    assert by_index[planted]["gain_over_control_ci95"][0] > 0
    assert not by_index[random_index]["steers"], by_index[random_index]


def test_the_setting_is_chosen_within_the_perplexity_limit():
    sweep = [("mild", {"score": 0.10, "perplexity": 3.0, "repeats": 0.0}),
             ("strong", {"score": 0.30, "perplexity": 9.0, "repeats": 0.0}),
             ("middle", {"score": 0.20, "perplexity": 4.0, "repeats": 0.0}),
             ("loop", {"score": 0.25, "perplexity": 2.5, "repeats": 0.7})]  # "1111...": likely, and a loop
    assert choose_setting(sweep, max_perplexity=5.0, max_repeats=0.2)[0] == "middle"
    assert choose_setting(sweep, max_perplexity=2.0, max_repeats=0.2)[0] == "strong"  # none within: the best of all
