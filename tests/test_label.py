"""The label stage: mining against a brute-force pass, example splits, explainers and scorers,
the OpenAI-compatible client against a real HTTP server on 127.0.0.1, and the stage end to end."""

import json
import math
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from sae_lens import SAE

from conftest import LABEL_SMALL, copy_run, run_stage
from features.examples import Example, ExamplePlan, feature_examples
from features.explain import heuristic_label, parse_label
from features.llm import LLMError, OpenAIChat, ResponseCache
from features.mining import HIST_EDGES, FeatureMiner, MiningPlan, save_state, slot_acts
from features.score import TokenJudge, detection, fuzzing
from activations.store import ActivationStore

SITE = "L3.resid_post"
PLAN = MiningPlan(context_tokens=16, top_examples=5, sampled_examples=6, pool_blocks=40, batch_blocks=8)


def open_run(runs):
    store = ActivationStore(runs / "demo")
    sae = SAE.load_from_disk(runs / "demo" / "saes" / SITE)
    return store, sae


def brute_force(store, sae, plan):
    """Every activation at once: what the streaming miner must agree with."""
    miner = FeatureMiner(store, SITE, sae, plan, torch.device("cpu"))
    rows = miner.n_blocks * plan.context_tokens
    acts = miner.encode(torch.from_numpy(store.read(SITE, 0, rows)))
    return miner, acts.view(miner.n_blocks, plan.context_tokens, -1)


def test_mining_agrees_with_a_dense_pass(smol_runs):
    store, sae = open_run(smol_runs)
    miner, acts = brute_force(store, sae, PLAN)
    state = miner.run()
    flat = acts.flatten(0, 1)
    assert torch.equal(state["fires"], (flat > 0).sum(0))
    assert torch.equal(state["hist"].sum(1), state["fires"])
    torch.testing.assert_close(state["act_sum"], flat.sum(0, dtype=torch.float64))
    peaks = acts.amax(1)  # [blocks, F]
    live = torch.nonzero(state["fires"] > 0).flatten()
    assert len(live) > 100
    for f in live[:200].tolist():
        want = peaks[:, f].topk(PLAN.top_examples)
        kept = state["top_keys"][f] > -math.inf
        n = min(PLAN.top_examples, int((peaks[:, f] > 0).sum()))
        assert int(kept.sum()) == n
        torch.testing.assert_close(state["top_keys"][f, :n], want.values[:n])
        for slot in range(n):  # the per-token activations kept are the block's
            block = int(state["top_blocks"][f, slot])
            torch.testing.assert_close(slot_acts(state, "top", f, slot), acts[block, :, f], rtol=1e-3, atol=1e-2)
        sampled = state["sample_blocks"][f, state["sample_keys"][f] > -math.inf]
        firing = set(torch.nonzero(peaks[:, f] > 0).flatten().tolist())
        assert set(sampled.tolist()) <= firing
        assert len(sampled) == min(PLAN.sampled_examples, len(firing))
        torch.testing.assert_close(state["sample_peaks"][f, :len(sampled)].sort().values,
                                   peaks[sampled, f].sort().values)
    assert torch.equal(state["pool_fires"], peaks[state["pool"]] > 0)
    # The histogram's bins hold each activation's value.
    f = live[0].item()
    values = flat[:, f][flat[:, f] > 0].numpy()
    expected = np.histogram(np.clip(values, HIST_EDGES[0], HIST_EDGES[-1]), HIST_EDGES)[0]
    assert np.array_equal(state["hist"][f].numpy(), expected)


def test_a_killed_mining_pass_resumes_to_the_same_state(smol_runs, tmp_path):
    store, sae = open_run(smol_runs)
    full = FeatureMiner(store, SITE, sae, PLAN, torch.device("cpu")).run()
    partial = FeatureMiner(store, SITE, sae, PLAN, torch.device("cpu"))
    W = PLAN.context_tokens
    for b in range(3):  # three batches, then "killed" after its checkpoint
        x = torch.from_numpy(store.read(SITE, b * PLAN.batch_blocks * W, (b + 1) * PLAN.batch_blocks * W))
        partial.update(b * PLAN.batch_blocks, partial.encode(x).view(PLAN.batch_blocks, W, -1), b)
    save_state(partial.state, tmp_path / "mining.pt")
    resumed = FeatureMiner(store, SITE, sae, PLAN, torch.device("cpu")).run(tmp_path / "mining.pt")
    for key, value in full.items():
        if torch.is_tensor(value):
            assert torch.equal(value, resumed[key]), key
        else:
            assert value == resumed[key], key


def test_explainer_and_scorer_examples_are_disjoint(smol_runs):
    store, sae = open_run(smol_runs)
    state = FeatureMiner(store, SITE, sae, PLAN, torch.device("cpu")).run()
    plan = ExamplePlan(quantiles=3, explain_top=2, explain_per_quantile=1, random_examples=5)
    checked = 0
    for f in torch.nonzero(state["fires"] > 0).flatten().tolist():
        examples = feature_examples(state, f, plan, PLAN.context_tokens)
        shown = {ex.block for ex in examples if ex.split == "explain"}
        scored = {ex.block for ex in examples if ex.split == "score"}
        assert shown and not shown & scored, f
        assert all(ex.peak == 0 for ex in examples if ex.kind == "random")
        checked += bool(scored)
    assert checked > 100


def example(tokens, acts, split="score", kind="top"):
    return Example(kind, 0, -1, 0, np.array(acts, np.float32), split, tokens)


def test_heuristic_label_names_the_peak_tokens_and_scores_them():
    lord = [example([" the", " Lord", " said"], [0, 5, 1], "explain") for _ in range(3)]
    held_out = [example([" and", " Lord", " spake"], [0, 4, 0]) for _ in range(4)]
    negatives = [example([" in", " the", " land"], [0, 0, 0], kind="random") for _ in range(4)]
    label = heuristic_label(lord)
    assert label.startswith('tokens "Lord"') and '"the Lord"' in label
    examples = lord + held_out + negatives
    assert detection(TokenJudge(), label, examples, 10) == 1.0
    assert detection(TokenJudge(), 'tokens "land"', examples, 10) == 0.0
    assert fuzzing(TokenJudge(), label, examples, 10, seed=0) == 1.0


@pytest.mark.parametrize("reply,label", [
    ("Some thinking.\nExplanation: names of rivers", "names of rivers"),
    ("Explanation: \"the word 'Lord'\"", "the word 'Lord'"),
    ("plural nouns", "plural nouns"),
])
def test_parse_label(reply, label):
    assert parse_label(reply) == label


@pytest.mark.parametrize("reply", ["", "1. The LORD sp<<ake>> unto\n2. x", "Explanation: 42", "line one\nline two"])
def test_parse_label_refuses_garbage(reply):
    with pytest.raises(ValueError):
        parse_label(reply)


# -- a stand-in for an OpenAI-compatible endpoint (vLLM, a hosted API), over real HTTP ---------


class FakeEndpoint:
    """Answers /v1/chat/completions like a tidy LLM: an explanation naming the most marked token,
    and yes/no by looking for the label's word. `fail_first` requests get HTTP 503, `garbage`
    requests get a reply with neither an explanation nor yes/no."""

    def __init__(self):
        self.requests, self.auth, self.fail_first, self.garbage, self.down = 0, set(), 0, 0, False
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                endpoint.requests += 1
                endpoint.auth.add(self.headers.get("Authorization"))
                if endpoint.down or endpoint.fail_first > 0:
                    endpoint.fail_first -= 1
                    self.send_error(503)
                    return
                content = endpoint.answer(body["messages"][-1]["content"])
                if endpoint.garbage > 0:
                    endpoint.garbage -= 1
                    content = "Sorry,\nI cannot help with that."
                payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @staticmethod
    def answer(prompt: str) -> str:
        if "described as:" in prompt:
            word = prompt.split("described as: the word ")[1].split("\n")[0].strip().lower()
            excerpt = prompt.split("Excerpt:")[1].lower()
            if "<<" in excerpt:  # fuzzing: are the marked tokens the word?
                excerpt = " ".join(part.split(">>")[0] for part in excerpt.split("<<")[1:])
            return "Yes" if word in excerpt else "No"
        marked = [part.split(">>")[0].strip() for part in prompt.split("<<")[1:]]
        word = max(set(marked), key=marked.count) if marked else "nothing"
        return f"The marks share a word.\nExplanation: the word {word}"


@pytest.fixture
def endpoint():
    fake = FakeEndpoint()
    yield fake
    fake.server.shutdown()


def test_openai_client_retries_then_reports_the_reason(endpoint, tmp_path):
    chat = OpenAIChat(endpoint.url, "fake-model", "", ResponseCache(tmp_path / "cache.jsonl"), retries=2, backoff_s=0.01)
    endpoint.fail_first = 2
    assert chat.ask([{"role": "user", "content": "<<Lord>> said"}], 20, parse_label) == "the word Lord"
    assert endpoint.requests == 3
    endpoint.garbage = 5
    with pytest.raises(LLMError, match="unusable reply"):
        chat.ask([{"role": "user", "content": "<<river>>"}], 20, parse_label)
    endpoint.down = True
    with pytest.raises(LLMError, match="HTTP 503"):
        chat.ask([{"role": "user", "content": "<<sea>>"}], 20, parse_label)
    # The good reply was cached: asking again makes no request, even with the endpoint down.
    before = endpoint.requests
    again = OpenAIChat(endpoint.url, "fake-model", "", ResponseCache(tmp_path / "cache.jsonl"))
    assert again.ask([{"role": "user", "content": "<<Lord>> said"}], 20, parse_label) == "the word Lord"
    assert endpoint.requests == before


def test_unreachable_endpoint_is_a_clear_error(tmp_path):
    chat = OpenAIChat("http://127.0.0.1:9/v1", "m", "", ResponseCache(None), retries=0)
    with pytest.raises(LLMError, match="unreachable"):
        chat.ask([{"role": "user", "content": "x"}], 5, parse_label)


@pytest.mark.slow
def test_label_stage_with_an_openai_endpoint_end_to_end(smol_runs, tmp_path, endpoint):
    runs = copy_run(smol_runs, tmp_path / "runs")
    secret = "sk-test-must-not-leak-4242"
    env = {**os.environ, "DIALBOX_TEST_KEY": secret}
    args = [f"run.runs_dir={runs}", *LABEL_SMALL, "explainer=openai", f"explainer.base_url={endpoint.url}",
            "explainer.model=fake-model", "explainer.api_key_env=DIALBOX_TEST_KEY", "explainer.max_features=6",
            "explainer.backoff_s=0.01", "explainer.retries=1",
            "label.output_score=false"]  # the LLM path is under test; output scores cost 12 s of each of 3 runs
    endpoint.down = True  # first run: the endpoint is down
    result = run_stage("pipeline.label", *args, env=env)
    out = runs / "demo" / "features" / SITE
    table = pq.read_table(out / "features.parquet").to_pandas()
    assert (table.label_source == "unlabelled").sum() == 6
    assert table[table.label_source == "unlabelled"].label_error.str.contains("HTTP 503").all()
    endpoint.down = False  # the rerun picks the unlabelled features up
    result = run_stage("pipeline.label", *args, env=env)
    table = pq.read_table(out / "features.parquet").to_pandas()
    llm = table[table.label_source == "llm:fake-model"]
    assert len(llm) == 6 and llm.label.str.startswith("the word").all()
    # A feature firing in too few contexts leaves none to score (a skip, not an error); the others get both
    # scores. Which six are sampled depends on the SAE, so the test asks this of whichever they are.
    scored = llm.detection.notna() & llm.fuzzing.notna()
    assert scored.sum() >= 2 and llm[~scored].label_error.isna().all()
    assert scored.all() or llm[~scored].density.max() < llm[scored].density.min()
    assert llm[scored].score.max() > 0.6, llm[["label", "detection", "fuzzing"]]  # a label naming its token is seen
    assert (table.label_source == "heuristic").sum() == (~table.dead).sum() - 6
    assert table[table.dead].label.isna().all()
    assert endpoint.auth == {f"Bearer {secret}"}  # the key from the environment reached the endpoint
    # A third run makes no request at all: every good reply is cached.
    before = endpoint.requests
    run_stage("pipeline.label", *args, env=env)
    assert endpoint.requests == before
    # The key is in no file of the run and in no output.
    for path in (runs / "demo").rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    assert secret not in result.stdout + result.stderr


@pytest.mark.slow
def test_label_stage_writes_the_tables(smol_labelled_by_stage):
    runs, stdout = smol_labelled_by_stage
    assert "heuristic" in stdout
    out = runs / "demo" / "features" / SITE
    table = pq.read_table(out / "features.parquet").to_pandas()
    meta = json.loads((out / "meta.json").read_text())
    assert len(table) == meta["n_features"] == 1152
    assert (table.feature_id == [f"{SITE}/{i}" for i in range(1152)]).all()
    live = table[~table.dead]
    assert len(live) > 100 and (live.label_source == "heuristic").all() and live.label.notna().all()
    # A feature firing in too few contexts leaves none to score; with unit-norm decoders at the start almost
    # every latent lives (983 of 1152 here), rare ones among them, so about 70% have enough contexts.
    scored = live.score.dropna()
    assert len(scored) > 0.6 * len(live) and scored.between(0, 1).all() and scored.mean() > 0.6
    assert live.logit_pos.map(len).eq(10).all() and live.neighbours.map(len).eq(8).all()
    assert (live.hist_counts.map(sum) / meta["tokens_mined"] - live.density).abs().max() < 1e-9
    examples = pq.read_table(out / "examples.parquet").to_pandas()
    for f, group in examples.groupby("index"):
        assert not set(group[group.split == "explain"].start) & set(group[group.split == "score"].start), f
    first = examples[examples.kind == "top"].iloc[0]
    assert len(first.tokens) == len(first.acts) == 16 and max(first.acts) == pytest.approx(first.max_act)


@pytest.mark.slow
def test_label_split_in_two_feature_ranges_equals_one_pass(smol_runs, smol_labelled_by_stage, tmp_path):
    whole, _ = smol_labelled_by_stage
    split = copy_run(smol_runs, tmp_path / "split")
    first = run_stage("pipeline.label", f"run.runs_dir={split}", *LABEL_SMALL, "label.features=[600,1152]")
    assert "merged" not in first.stdout and not (split / "demo/features" / SITE / "features.parquet").exists()
    second = run_stage("pipeline.label", f"run.runs_dir={split}", *LABEL_SMALL, "label.features=[0,600]")
    assert "merged" in second.stdout
    for name in ("features.parquet", "examples.parquet"):
        a = pq.read_table(whole / "demo/features" / SITE / name)
        b = pq.read_table(split / "demo/features" / SITE / name)
        assert a.equals(b), name
    meta = json.loads((split / "demo/features" / SITE / "meta.json").read_text())
    assert meta["features"] == [0, 1152] and meta["parts"] == [[0, 600], [600, 1152]]


def test_label_refuses_a_run_without_saes(tmp_path):
    result = run_stage("pipeline.label", f"run.runs_dir={tmp_path}", check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("label: error: no activation store")
