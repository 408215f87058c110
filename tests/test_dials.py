"""steering/dials.py: a tuned dial learns, from preference pairs, to make the model write the positive answers."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from activations.sites import Site
from conftest import SMOL_SITE, TINY_SITES, live_feature
from steering.dials import Pair, answer_logprobs, tune_dial
from steering.steerer import encode_prompt

OCEAN = "The ocean is vast and the sea is deep; waves roll over the ocean floor."
TOWN = "I walked through the town and bought some bread at the bakery."


def pairs_for(smol, prompts):
    encode = lambda text: torch.tensor(smol.tokenizer(text, add_special_tokens=False).input_ids)  # noqa: E731
    return [Pair(encode_prompt(smol.tokenizer, p, smol.chat_default), encode(" " + OCEAN), encode(" " + TOWN))
            for p in prompts]


def margin(smol, site, pairs, push, positions="prompt"):
    with torch.no_grad():
        logprobs = answer_logprobs(smol, site, [(p.context, p.positive) for p in pairs]
                                   + [(p.context, p.negative) for p in pairs], push, positions)
    answers = torch.cat([p.positive for p in pairs] + [p.negative for p in pairs]).to(logprobs.device)
    taken = logprobs.gather(1, answers[:, None])[:, 0]
    n = sum(len(p.positive) for p in pairs)
    return float(taken[:n].mean() - taken[n:].mean())


def test_a_tuned_dial_learns_to_prefer_the_positive_answers_and_leaves_the_model_alone(smol):
    site = Site.parse(SMOL_SITE)
    pairs = pairs_for(smol, ["Tell me about your day.", "Describe a place you like."])
    start = smol.sae(site).W_dec[live_feature(smol, SMOL_SITE)].detach().float().cpu()
    start = start / start.norm() * 0.25 * smol.mean_norm(site)
    weights = [p.detach().clone() for p in smol.model.parameters()][:3]
    flags = [p.requires_grad for p in smol.model.parameters()]
    cfg = OmegaConf.create({"steps": 6, "lr": 0.05, "beta": 4.0, "nll": 1.0, "kl": 1.0, "positions": "prompt"})
    vector, losses = tune_dial(smol, site, start, pairs, cfg)
    assert len(losses) == 6 and vector.shape == start.shape and torch.isfinite(vector).all()
    # the trained dial prefers the positive answers more than its start did, and the -v direction less
    assert margin(smol, site, pairs, vector.to(smol.device)) > margin(smol, site, pairs, start.to(smol.device)) + 0.05
    assert margin(smol, site, pairs, -vector.to(smol.device)) < margin(smol, site, pairs, vector.to(smol.device))
    # only the dial was trained: the model's weights and their requires_grad flags are as they were
    assert all(torch.equal(a, b) for a, b in zip(weights, list(smol.model.parameters())[:3]))
    assert [p.requires_grad for p in smol.model.parameters()] == flags
    with pytest.raises(ValueError, match="at least one pair"):
        tune_dial(smol, site, start, [], cfg)


def test_a_tuned_dial_trains_through_deepseek_v4_hyper_connection_streams(tiny):
    """The same code at DeepSeek-V4's residual, four hyper-connection streams (a tiny random model)."""
    site = Site.parse(TINY_SITES[0])
    ids = lambda n, seed: torch.randint(10, 200, (n,), generator=torch.Generator().manual_seed(seed))  # noqa: E731
    pairs = [Pair(ids(6, k), ids(5, 10 + k), ids(5, 20 + k)) for k in range(2)]
    start = tiny.sae(site).W_dec[0].detach().float().cpu()
    for positions in ("prompt", "generated", "all"):
        cfg = OmegaConf.create({"steps": 4, "lr": 0.05, "beta": 4.0, "nll": 1.0, "kl": 1.0, "positions": positions})
        vector, losses = tune_dial(tiny, site, start, pairs, cfg)
        assert vector.shape == start.shape and not torch.equal(vector, start) and all(map(math.isfinite, losses))
        assert (margin(tiny, site, pairs, vector.to(tiny.device), positions)
                > margin(tiny, site, pairs, start.to(tiny.device), positions))
    # each answer's first token is predicted from the request's last row: pushed under prompt and all, as in
    # generation, but not under generated, whose push starts on the answer's own rows
    texts, push = [(pairs[0].context, pairs[0].positive)], start.to(tiny.device) * 10
    with torch.no_grad():
        plain = answer_logprobs(tiny, site, texts, torch.zeros_like(push))
        for positions, first_pushed in (("prompt", True), ("generated", False), ("all", True)):
            pushed = answer_logprobs(tiny, site, texts, push, positions)
            assert (not torch.allclose(pushed[0], plain[0])) == first_pushed, positions
            assert not torch.allclose(pushed[1:], plain[1:]), positions
