"""Features x experts on the tiny random DeepSeek-V4 (routing stored): the mining pass's counts
against a dense pass, the lifts from their definition, and the label stage's tables."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from sae_lens import SAE
from selenium.webdriver.common.by import By

from conftest import compose_config, copy_run
from activations.store import ActivationStore
from features.experts import counted_layers, expert_columns, wilson_low
from features.label import label
from features.mining import FeatureMiner, MiningPlan
from features.report import build_report
from test_browser import browser, serving, table_rows, wait_for  # noqa: F401  (browser is a fixture)

SITE = "L1.resid_post"


@pytest.fixture(scope="module")
def tiny_labelled(tiny_run, tmp_path_factory):
    runs = copy_run(tiny_run.parent, tmp_path_factory.mktemp("tiny_labelled") / "runs")
    label(compose_config("label", [f"run.runs_dir={runs}", "label.output_score=false"]))
    return runs / "demo"


def dense_counts(store, layer: int, fires: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(counts [features, experts], load [experts]) from every row at once."""
    ids = torch.from_numpy(store.read_router(layer, 0, len(fires))[0]).long()
    chosen = torch.zeros(len(fires), store.router[layer]["n_experts"]).scatter_(1, ids, 1.0)
    return (fires.double().T @ chosen.double()).long(), chosen.sum(0).long()


def test_expert_counts_agree_with_a_dense_pass(tiny_run):
    store = ActivationStore(tiny_run)
    layers = counted_layers(store.router, 1, 2)
    assert layers == [1, 2]  # the next 2 routed layers from the site's on
    plan = MiningPlan(context_tokens=16, top_examples=5, sampled_examples=6, pool_blocks=40, batch_blocks=8,
                      expert_layers=tuple(layers))
    miner = FeatureMiner(store, SITE, SAE.load_from_disk(tiny_run / "saes" / SITE), plan, torch.device("cpu"))
    state = miner.run()
    rows = miner.n_blocks * plan.context_tokens
    fires = miner.encode(torch.from_numpy(store.read(SITE, 0, rows))) > 0
    for layer in layers:
        counts, load = dense_counts(store, layer, fires)
        assert torch.equal(state[f"experts_L{layer}"], counts)
        assert torch.equal(state[f"load_L{layer}"], load)
        assert int(load.sum()) == 2 * rows  # top-2: two experts per token

    columns = expert_columns(state, layers, top=4)
    f = int(fires.sum(0).argmax())  # the busiest feature
    name = columns["experts"][f][0]
    layer, expert = int(name[1:name.index("/")]), int(name.split("/E")[1])
    counts, load = dense_counts(store, layer, fires)
    n_f = int(fires[:, f].sum())
    assert columns["expert_count"][f][0] == int(counts[f, expert])
    assert columns["expert_lift"][f][0] == pytest.approx(float(counts[f, expert] / n_f / (load[expert] / rows)), rel=1e-6)
    q = counts[f].double() / counts[f].sum()
    assert columns["expert_entropy"][f][layers.index(layer)] == pytest.approx(float(-(q[q > 0] * q[q > 0].log2()).sum()))
    assert columns["expert_lift_low"][f] == sorted(columns["expert_lift_low"][f], reverse=True)


def test_the_lower_bound_ranks_rare_co_occurrence_below_steady(tiny_run):
    # 2 of 3 tokens (67%) against 900 of 1,000 (90%) and 600 of 1,000 (60%): the bound puts the rare one last.
    low = wilson_low(torch.tensor([2, 900, 600]), torch.tensor([3, 1000, 1000]))
    assert low[1] > low[2] > low[0]
    assert 0.55 < float(low[2]) < 0.6


def test_label_writes_expert_columns_and_a_per_site_expert_table(tiny_labelled):
    site_dir = tiny_labelled / "features" / SITE
    features = pq.read_table(site_dir / "features.parquet").to_pydict()
    experts = pq.read_table(site_dir / "experts.parquet").to_pydict()
    assert len(experts["expert_id"]) == 2 * 8 and experts["expert_id"][:2] == ["L1/E0", "L1/E1"]
    for layer in (1, 2):  # each token chooses top_k = 2 experts
        assert sum(frac for l, frac in zip(experts["layer"], experts["load_frac"]) if l == layer) == pytest.approx(2.0)
    live = [i for i, dead in enumerate(features["dead"]) if not dead]
    assert all(features["experts"][i] for i in live)
    assert all(len(features["expert_entropy"][i]) == 2 for i in live)
    # The two views agree: an expert's top feature lists that expert, with the same count.
    row = max(range(len(experts["expert_id"])), key=lambda i: experts["feature_lift_low"][i][0])
    f = experts["features"][row][0]
    mine = dict(zip(features["experts"][f], features["expert_count"][f]))
    assert mine[experts["expert_id"][row]] == experts["feature_count"][row][0]
    ffn = pq.read_table(tiny_labelled / "features" / "L2.ffn_out" / "experts.parquet").column("layer").to_pylist()
    assert set(ffn) == {2}  # at L2 only layer 2 is routed at or after the site


@pytest.mark.slow
def test_label_split_in_two_feature_ranges_merges_the_expert_table(tiny_labelled, tmp_path):
    runs = copy_run(tiny_labelled.parent, tmp_path / "runs")
    site_dir = runs / "demo" / "features" / SITE
    for path in site_dir.iterdir():
        path.unlink()
    n = SAE.load_from_disk(runs / "demo" / "saes" / SITE).cfg.d_sae
    for part in ([0, n // 2], [n // 2, n]):
        label(compose_config("label", [f"run.runs_dir={runs}", "label.output_score=false", f"label.sites=[{SITE}]",
                                       f"label.features=[{part[0]},{part[1]}]"]))
    whole = pq.read_table(tiny_labelled / "features" / SITE / "experts.parquet").to_pydict()
    merged = pq.read_table(site_dir / "experts.parquet").to_pydict()
    assert merged["load"] == whole["load"] and merged["feature_count"] == whole["feature_count"]
    assert merged["features"] == whole["features"]
    np.testing.assert_allclose(np.concatenate(merged["feature_lift"]), np.concatenate(whole["feature_lift"]))


def test_report_shows_experts_both_ways_and_searches_by_expert(tiny_labelled, tmp_path, browser):
    root = tmp_path / "report"
    build_report(tiny_labelled / "features", root)
    experts = json.loads((root / "data" / SITE / "experts.json").read_text())
    features = pq.read_table(tiny_labelled / "features" / SITE / "features.parquet").to_pydict()
    f = max(range(len(features["index"])), key=lambda i: len(features["experts"][i]))
    first = features["experts"][f][0]
    with serving(root) as base:
        browser.get(f"{base}#{SITE}/{f}")
        rows = wait_for(browser, "#expert-table tbody tr")
        assert len(rows) == len(features["experts"][f])
        assert rows[0].text.split()[:2] == [first, f"×{features['expert_lift'][f][0]:.3g}"]
        assert rows[0].text.split()[-1] == str(features["expert_count"][f][0])
        rows[0].find_element(By.TAG_NAME, "a").click()  # to the expert's view, which links back to the feature
        wait_for(browser, "section.expert")
        assert browser.execute_script("return location.hash") == f"#{SITE}/experts?e={first.replace('/', '%2F')}"
        sections = browser.find_elements(By.CSS_SELECTOR, "section.expert")
        assert len(sections) == 1 and sections[0].get_attribute("id") == first
        listed = [a.get_attribute("href").split("#")[1] for a in sections[0].find_elements(By.CSS_SELECTOR, "td a")]
        expert = next(e for e in experts if e["id"] == first)
        assert listed == [f"{SITE}/{index}" for index, *_ in expert["features"]]
        browser.get(f"{base}#{SITE}?q={first}")  # search by expert: its features, most selecting first
        wait_for(browser, "#feature-table tbody tr")
        shown = [int(r.find_element(By.TAG_NAME, "td").text) for r in table_rows(browser)]
        assert shown == [index for index, *_ in expert["features"]]
        browser.get(f"{base}#{SITE}/experts")
        assert len(wait_for(browser, "section.expert")) == 2 * 8
