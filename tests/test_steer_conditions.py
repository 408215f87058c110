"""Conditional steering (`when=<feature>><threshold>`) on SmolLM2: the edit lands exactly where the
condition feature fires and nowhere else, in the Python API, the CLI's syntax and the server."""

from __future__ import annotations

import openai
import pytest
import torch

from conftest import SMOL_SITE, compose_config, random_vector
from activations.sites import FeatureId, Site
from steering.interventions import Condition, Intervention, SteeringError

PROMPT = "The cat sat on the mat, and then the dog ran to the park to play with a red ball."


def forward_logits(steerer, ids, interventions=()) -> torch.Tensor:
    with torch.inference_mode(), steerer.steering(interventions):
        return steerer.model(input_ids=ids, use_cache=False).logits[0]


@pytest.fixture(scope="module")
def firing(smol_steerer):
    """(ids, the condition feature, its activation per prompt position) for PROMPT."""
    ids = torch.tensor(smol_steerer.tokenizer(PROMPT).input_ids)[None]
    site = Site.parse(SMOL_SITE)
    rows = smol_steerer.adapter.capture([site], ids)[site][0]
    acts = smol_steerer.sae(site).encode(rows.float()).detach()
    counts = (acts > 0).sum(0)
    counts[acts[0] > 0] = -1  # not one that fires on the first token: a test needs positions before its first firing
    f = int(counts.argmax())  # the feature that fires at the most positions
    return ids, f"{SMOL_SITE}/{f}", acts[:, f]


def between(acts: torch.Tensor) -> float:
    """A threshold with positions on both sides of it."""
    values = acts.unique()
    return float(values[len(values) // 2 - 1] + values[len(values) // 2]) / 2


def test_conditions_parse_from_strings_and_dicts():
    iv = Intervention.parse("L15.resid_post/1234 scale=4 when=L12.resid_post/88>2.5")
    assert iv.when == Condition(FeatureId(Site(12, "resid_post"), 88), 2.5) and str(iv.when) == "L12.resid_post/88>2.5"
    same = Intervention.parse({"feature": "L15.resid_post/1234", "scale": 4,
                               "when": {"feature": "L12.resid_post/88", "above": 2.5}})
    assert same == iv
    assert Intervention.parse("terse when=L1.ffn_out/3>-1").when.threshold == -1.0
    for bad, words in [("when=L12.resid_post/88", "bad condition"), ("when=L12.resid_post/88>x", "bad condition threshold"),
                       ("when=L12.resid_post/88>nan", "bad condition threshold"), ("when=L12.resid/88>1", "unknown site kind")]:
        with pytest.raises(SteeringError if "kind" not in words else ValueError, match=words):
            Intervention.parse(f"L15.resid_post/1 {bad}")


def test_a_condition_read_after_the_edited_site_is_refused_in_one_line(smol, firing):
    random_vector(smol, "early", "resid_post", [2, 4], 30.0)
    with pytest.raises(SteeringError, match=r"read at L3.resid_post, after the edited site L2.resid_post") as e:
        smol.resolve([f"early when={firing[1]}>0"])
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="unknown feature"):
        smol.resolve([f"early layers=4 when={SMOL_SITE}/999999>0"])


def test_logits_are_unsteered_where_the_condition_is_false_and_edited_where_it_is_true(smol, firing):
    """The edit at the last layer touches only its own position's logits, so each position is exact."""
    ids, feature, acts = firing
    last = smol.adapter.n_layers - 1
    random_vector(smol, "final", "resid_post", [last], 30.0)
    threshold = between(acts)
    fires = acts > threshold
    assert fires.any() and (~fires).any()
    plain = forward_logits(smol, ids)
    always = forward_logits(smol, ids, ["final"])
    gated = forward_logits(smol, ids, [f"final when={feature}>{threshold!r}"])
    assert not torch.equal(always[fires], plain[fires])  # the edit does something
    assert torch.equal(gated[~fires], plain[~fires])
    assert torch.equal(gated[fires], always[fires])


def test_at_its_own_site_a_conditional_edit_leaves_every_position_before_the_first_firing_alone(smol, firing):
    ids, feature, acts = firing
    threshold = between(acts[1:])
    first = int((acts > threshold).nonzero()[0])
    assert first > 0
    plain = forward_logits(smol, ids)
    gated = forward_logits(smol, ids, [f"{feature} scale=8 when={feature}>{threshold!r}"])
    assert torch.equal(gated[:first], plain[:first])
    assert not torch.equal(gated[first:], plain[first:])


def test_a_condition_that_never_fires_leaves_generation_unchanged_and_composes(smol, firing):
    _, feature, _ = firing
    random_vector(smol, "other", "resid_post", [2], 30.0)
    greedy = dict(max_new_tokens=12, temperature=0.0)
    never = f"{feature} op=clamp scale=8 when={feature}>1e9"
    assert smol.generate(PROMPT, [never], **greedy)[0].tokens == smol.generate(PROMPT, (), **greedy)[0].tokens
    assert (smol.generate(PROMPT, ["other", never], **greedy)[0].tokens
            == smol.generate(PROMPT, ["other"], **greedy)[0].tokens)
    always = f"{feature} op=clamp scale=8 when={feature}>-1e9"
    assert (smol.generate(PROMPT, [always], **greedy)[0].tokens
            == smol.generate(PROMPT, [f"{feature} op=clamp scale=8"], **greedy)[0].tokens)


def test_the_cli_syntax_carries_a_condition(firing):
    cfg = compose_config("steer", [f'steer.interventions=["{firing[1]} scale=4 when={firing[1]}>2.5"]'])
    assert Intervention.parse(cfg.steer.interventions[0]).when.threshold == 2.5


def test_the_server_takes_conditions_and_refuses_an_impossible_order(server, smol, firing):
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="unused", max_retries=0)
    _, feature, _ = firing

    def complete(steering):
        return client.completions.create(model="smollm2_135m", prompt=PROMPT, max_tokens=6, temperature=0,
                                         extra_body={"steering": steering}).choices[0].text

    plain = smol.generate(PROMPT, (), max_new_tokens=6, chat=False)[0].text
    assert complete([{"feature": feature, "op": "clamp", "scale": 8, "when": f"{feature}>1e9"}]) == plain
    assert complete([f"{feature} op=clamp scale=8 when={feature}>-1e9"]) != plain
    with pytest.raises(openai.BadRequestError, match="after the edited site"):
        complete([f"served when={feature}>0"])
