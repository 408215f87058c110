"""The steering evaluation, in a tiny configuration on SmolLM2 (the full one is `make steer-eval`)."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from activations.sites import Site
from conftest import compose_config
from steering.evaluation import Outcome, answer_logprobs, make_judge, read_answers, score
from steering.steerer import encode_prompt
from steering.vectors import SteeringVector
from pipeline.config import JudgeConfig
from pipeline.steer import run_action


@pytest.mark.parametrize("model", ["smol", "tiny"])
def test_answers_read_in_padded_batches_match_one_sequence_at_a_time(model, request):
    """read_answers runs the contexts' shared start once and the LM head on answer positions only: the
    log-probabilities and the site's rows must still be those of each sequence run alone, in a Llama and in
    DeepSeek-V4 (its compressed attention has a cache of its own)."""
    steerer = request.getfixturevalue(model)
    site = Site.parse(steerer.run.trained_sites()[0])
    if model == "smol":
        contexts = [encode_prompt(steerer.tokenizer, p, True) for p in ("Hi", "Tell me about the moon, please.", "Why?")]
    else:  # no chat template: contexts that share their first 12 tokens
        contexts = [torch.cat([torch.arange(5, 17), torch.tensor(t)]) for t in ([40, 41], [50], [60, 61, 62, 63])]
    answers = [torch.tensor(t, dtype=torch.long) for t in ([504, 3136, 314], [], [28, 1789, 29, 30, 441])]
    batched = read_answers(steerer, contexts, answers, batch_size=3, site=site)
    for c, a, (got, rows) in zip(contexts, answers, batched):
        ids = torch.cat([c, a])[None]
        with torch.inference_mode():
            logp = steerer.model(input_ids=ids).logits.float().log_softmax(-1)[0]
        expected = sum(float(logp[len(c) - 1 + k, t]) for k, t in enumerate(a.tolist()))
        assert got == pytest.approx(expected, abs=1e-3)
        alone = steerer.adapter.capture([site], ids)[site][0, len(c):].float()
        torch.testing.assert_close(rows, alone, atol=1e-3, rtol=1e-3)
    assert answer_logprobs(steerer, contexts, answers, 3) == [lp for lp, _ in batched]


def outcome(lengths, nll, relevant):
    return Outcome("x", None, None, lengths, nll, relevant, [], {}, [""] * len(lengths))


def test_scores_are_proxies_combined_by_harmonic_mean():
    e = OmegaConf.create({"concept": "length"})
    plain = outcome([100, 100], [2.0, 2.0], [1, 1])
    half = outcome([50, 50], [2.0, 2.0], [1, 0])
    score(half, plain, ["a", "b"], e, None)
    assert half.scores["concept"] == pytest.approx(0.5) and half.scores["relevance"] == 0.5
    assert half.scores["fluency"] == pytest.approx(1.0) and half.scores["score"] == pytest.approx(0.6)
    empty = outcome([0, 0], [float("nan")] * 2, [0, 0])  # maximal "terseness" that answers nothing scores 0
    score(empty, plain, ["a", "b"], e, None)
    assert empty.scores["concept"] == 1.0 and empty.scores["score"] == 0.0


@pytest.mark.slow
def test_tiny_evaluation_sweeps_on_dev_and_reports_on_test(own_smol_run, tmp_path):
    prompts, contrast = tmp_path / "heldout.txt", tmp_path / "contrast.txt"
    prompts.write_text("\n".join(["What is rain?", "Why do birds sing?", "What is a river?", "How do trees grow?",
                                  "What is snow?", "Why is grass green?"]) + "\n")
    contrast.write_text("What is wind?\nHow do clouds form?\n")
    cfg = compose_config("steer", [f"run.runs_dir={own_smol_run.parent}", f"run.run_name={own_smol_run.name}",
                                   "contrast.name=terse-test", f"contrast.prompts={contrast}", "contrast.layers=[2,3]",
                                   "eval.target=terse-test", f"eval.prompts={prompts}", "eval.dev_prompts=2",
                                   "eval.layers=[2,3]", "eval.scales=[4.0]", "eval.max_new_tokens=8",
                                   "eval.batch_size=4", "eval.bootstrap=100"])
    results = run_action("eval", cfg)
    names = [c["condition"] for c in results["conditions"]]
    assert names[0] == "unsteered" and names[1].startswith("prompt baseline") and len(names) == 4
    assert names[2] == f"steered L{results['chosen']['layer']} x4" and names[3].startswith("random direction")
    assert [s["setting"] for s in results["sweep"]] == ["L2 x4", "L3 x4"]
    for c in results["conditions"]:
        low, high = c["mean_length_ci95"]
        assert low <= c["mean_length"] <= high <= 8
        assert 0 <= c["relevance"] <= 1 and c["perplexity"] > 1
    assert results["conditions"][0]["reduction_vs_unsteered"] == 0
    assert set(results["verdict"]) >= {"reduction", "reduction_target_met", "control_excluded"}

    vectors = own_smol_run / "vectors"
    steered, control = SteeringVector.load(vectors, "terse-test"), SteeringVector.load(vectors, "terse-test.random")
    for layer in (2, 3):
        assert float(control.directions[layer].norm()) == pytest.approx(float(steered.directions[layer].norm()), rel=1e-5)
        assert abs(float(torch.cosine_similarity(control.directions[layer], steered.directions[layer], dim=0))) < 0.3
    saved = json.loads((own_smol_run / "steer_eval" / "results.json").read_text())
    assert saved["chosen"] == results["chosen"] and (own_smol_run / "steer_eval" / "report.md").exists()
    assert (own_smol_run / "config" / "steer-eval.yaml").exists()


def test_an_llm_judge_rates_answers_through_the_openai_compatible_server(server, smol):
    """The judge is the steering server itself (SmolLM2 over real HTTP): any such endpoint will do."""
    base_url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    judge = make_judge(OmegaConf.structured(JudgeConfig(base_url=base_url, model="smollm2_135m")), server.steerer.run)
    ratings = judge(["What is rain?", "Name a colour."], ["Water falling from clouds.", "Blue."], "a terse answer")
    assert set(ratings) == {"concept", "relevance", "fluency"} and all(0 <= v <= 1 for v in ratings.values())
    assert server.steerer.run.root == smol.run.root  # this test's own copy of the run
    assert len(smol.run.judge_cache.read_text().splitlines()) == 6
