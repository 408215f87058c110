"""Steering by feature ID and named vector on real models: SmolLM2-135M and a tiny random DeepSeek-V4.

The run fixtures here (a small harvest + SAE on each model) are shared by the other steering tests,
which import them.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import SMOL_SITE, TINY_SITES, live_feature, random_vector, run_stage
from steering.interventions import Intervention, SteeringError
from steering.steerer import Steerer
from steering.vectors import VectorError
from activations.sites import SITE_KINDS, Site
from activations.store import ActivationStore

def no_hooks(model) -> bool:
    return not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def logits(steerer: Steerer) -> torch.Tensor:
    ids = torch.arange(5, 25)[None]
    with torch.inference_mode():
        return steerer.model(input_ids=ids, use_cache=False).logits


GREEDY = dict(max_new_tokens=8, temperature=0.0)


# --- parsing ---------------------------------------------------------------------------------


def test_interventions_parse_from_strings_and_dicts():
    a = Intervention.parse("L15.resid_post/1234 op=clamp scale=-2.5 positions=generated")
    assert (a.target, a.op, a.scale, a.positions, a.is_feature) == ("L15.resid_post/1234", "clamp", -2.5, "generated", True)
    b = Intervention.parse({"vector": "terse", "scale": 3, "layers": [4, 6]})
    assert (b.target, b.op, b.scale, b.layers, b.is_feature) == ("terse", None, 3.0, (4, 6), False)
    assert Intervention.parse("terse layers=4,6").layers == Intervention.parse("terse layers=[4,6]").layers == (4, 6)


@pytest.mark.parametrize("spec, words", [
    ("L15.resid_post/12 scale=abc", "bad scale"),
    ({"feature": "L15.resid_post/12", "scale": float("nan")}, "bad scale"),
    ({"feature": "L15.resid_post/12", "scale": True}, "bad scale"),
    ("L15.resid_post/12 op=multiply", "bad op"),
    ("L15.resid_post/12 positions=middle", "bad positions"),
    ({"feature": "L15.resid_post/12", "vector": "terse"}, "exactly one"),
    ({"feature": "L15.resid/12"}, "unknown site kind"),
    ({"feature": "L15.resid_post/x"}, "bad feature ID"),
    ({"feature": "L15.resid_post/1", "strength": 2}, "unknown intervention field 'strength'"),
    ("terse scale", "key=value"),
])
def test_bad_interventions_say_what_is_wrong(spec, words):
    with pytest.raises(ValueError, match=words):
        Intervention.parse(spec)


# --- operations, on a real SAE ---------------------------------------------------------------


def test_add_clamp_and_project_do_what_they_say(smol):
    site = Site.parse(SMOL_SITE)
    f = live_feature(smol, SMOL_SITE)
    sae, top = smol.sae(site), smol.max_act(site, f)
    x = torch.randn(2, 7, 576) * 3
    add = smol.resolve([f"{SMOL_SITE}/{f} scale=2"])[site][0]
    torch.testing.assert_close(add.apply(x) - x, (2 * top * sae.W_dec[f]).expand_as(x), rtol=1e-4, atol=1e-4)
    raw = smol.resolve([f"{SMOL_SITE}/{f} scale=2 units=raw"])[site][0]
    torch.testing.assert_close(raw.apply(x) - x, (2 * sae.W_dec[f]).expand_as(x), rtol=1e-4, atol=1e-4)

    project = smol.resolve([f"{SMOL_SITE}/{f} op=project scale=1"])[site][0]
    v = sae.W_dec[f] / sae.W_dec[f].norm()
    assert (project.apply(x) @ v).abs().max() < 1e-3  # s=1 removes the direction
    assert ((smol.resolve([f"{SMOL_SITE}/{f} op=project scale=-1"])[site][0].apply(x) @ v)
            - 2 * (x @ v)).abs().max() < 1e-3  # s=-1 doubles it

    # clamp: the SAE's reading of the feature is replaced by the target, the rest (error term included) kept
    rows = torch.from_numpy(ActivationStore(smol.run.root).read(SMOL_SITE, 0, 64))
    clamp = smol.resolve([f"{SMOL_SITE}/{f} op=clamp scale=0.5"])[site][0]
    active = sae.encode(rows)[:, f]
    assert active.max() > 0
    expected = rows + (0.5 * top - active)[:, None] * sae.W_dec[f]
    torch.testing.assert_close(clamp.apply(rows), expected, rtol=1e-4, atol=1e-3)


def test_max_activation_units_come_from_the_feature_table_when_there_is_one(own_smol_run):
    steerer = Steerer(own_smol_run)
    site = Site.parse(SMOL_SITE)
    table = own_smol_run / "features" / SMOL_SITE / "features.parquet"
    table.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"index": [0, 1, 2], "max_act": [7.0, 11.0, 0.0]}), table)
    try:
        edit = steerer.resolve([f"{SMOL_SITE}/1 scale=2"])[site][0]
        torch.testing.assert_close(edit.apply(torch.zeros(576)), 22.0 * steerer.sae(site).W_dec[1])
        assert any(str(table) in note for note in steerer.notes)
        with pytest.raises(SteeringError, match="never fired"):
            steerer.resolve([f"{SMOL_SITE}/2 scale=1"])
    finally:
        table.unlink()


def test_unusable_interventions_are_refused_before_anything_runs(smol):
    random_vector(smol, "added", "resid_post", [2], 1.0)
    cases = [
        ([f"{SMOL_SITE}/999999 scale=1"], "unknown feature .* features 0..1151"),
        (["L4.resid_post/1 scale=1"], "no SAE at"),
        (["L99.resid_post/1 scale=1"], "layer 99 out of range"),
        (["nosuchvector scale=1"], "no vector named 'nosuchvector'"),
        (["added op=project"], "not interchangeable"),
        (["added op=clamp"], "clamp sets an SAE feature"),
        (["added layers=5"], "no direction at layer 5"),
        ([f"{SMOL_SITE}/1 op=project units=max_act"], "drop units"),
    ]
    for spec, words in cases:
        with pytest.raises(ValueError, match=words):
            smol.resolve(spec)
    assert no_hooks(smol.model)


def test_a_vector_from_another_model_is_refused(smol, tiny):
    random_vector(tiny, "tinyvec", "resid_post", [1], 1.0)
    smol.run.vectors.mkdir(exist_ok=True)  # a fresh run has no vectors/ yet
    (tiny.run.root / "vectors" / "tinyvec.json").rename(smol.run.root / "vectors" / "tinyvec.json")
    (tiny.run.root / "vectors" / "tinyvec.safetensors").rename(smol.run.root / "vectors" / "tinyvec.safetensors")
    with pytest.raises(VectorError, match="made on tiny_deepseek_v4"):
        smol.resolve(["tinyvec"])


# --- generation ------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["smol", "tiny"])
def test_every_site_kind_steers_and_leaves_the_model_as_it_was(which, request):
    steerer = request.getfixturevalue(which)
    before = logits(steerer)
    prompt = "Tell me about the sea."
    plain = steerer.generate(prompt, (), **GREEDY)[0].text
    for kind in SITE_KINDS:
        norm = 40.0 if which == "smol" else 8.0
        # a fixed seed per kind (str hash() differs between processes: one draw left the attn_in text unchanged)
        random_vector(steerer, f"rand-{kind}", kind, [1, 2], norm, seed=SITE_KINDS.index(kind))
        steered = steerer.generate(prompt, [f"rand-{kind} scale=1"], **GREEDY)[0].text
        assert steered != plain, kind
        assert no_hooks(steerer.model)
    torch.testing.assert_close(logits(steerer), before, rtol=0, atol=0)


def test_feature_steering_at_a_hyper_connection_site_and_an_ffn_output(tiny):
    prompt = "Tell me about the sea."
    plain = tiny.generate(prompt, (), **GREEDY)[0].text
    for site in TINY_SITES:
        f = live_feature(tiny, site)
        for op, scale in (("add", 8), ("clamp", 8), ("project", -30)):  # project amplifies: s < 0
            steered = tiny.generate(prompt, [f"{site}/{f} op={op} scale={scale}"], **GREEDY)[0].text
            assert steered != plain, (site, op)
    assert no_hooks(tiny.model)


def test_interventions_compose_in_order(smol):
    random_vector(smol, "compose", "resid_post", [2, 4], 30.0)
    prompt = "Name three colours."
    plain = smol.generate(prompt, (), **GREEDY)[0].tokens
    double = smol.generate(prompt, ["compose scale=2"], **GREEDY)[0].tokens
    assert double != plain
    assert smol.generate(prompt, ["compose scale=1", "compose scale=1"], **GREEDY)[0].tokens == double
    assert smol.generate(prompt, ["compose scale=2", "compose scale=-2"], **GREEDY)[0].tokens == plain


def test_positions_prompt_generated_and_all(smol):
    random_vector(smol, "where", "resid_post", [3], 40.0)
    prompt = "Name three colours."
    runs = {p: smol.generate(prompt, [f"where positions={p}"], max_new_tokens=8)[0].tokens
            for p in ("all", "prompt", "generated")}
    plain = smol.generate(prompt, (), max_new_tokens=8)[0].tokens
    assert runs["prompt"] != plain and runs["generated"] != plain
    # steering only generated rows cannot change the first new token: it comes from the last prompt row
    assert runs["generated"][0] == plain[0] and runs["prompt"][0] == runs["all"][0]


def test_hooks_are_removed_when_generation_fails(smol):
    from transformers.generation.streamers import BaseStreamer

    class Explode(BaseStreamer):
        def __init__(self):
            self.calls = 0

        def put(self, value):
            self.calls += 1
            if self.calls == 3:
                raise RuntimeError("client went away")

        def end(self):
            pass

    before = logits(smol)
    random_vector(smol, "boom", "resid_post", [2], 30.0)
    with pytest.raises(RuntimeError, match="client went away"):
        smol.generate("Hello", ["boom", f"{SMOL_SITE}/{live_feature(smol, SMOL_SITE)} op=clamp"], max_new_tokens=8,
                      streamer=Explode())
    assert no_hooks(smol.model)
    torch.testing.assert_close(logits(smol), before, rtol=0, atol=0)


def test_a_batch_generates_what_each_prompt_generates_alone(smol):
    random_vector(smol, "batch", "resid_post", [2], 20.0)
    prompts = ["Hi", "Write a sentence about the moon and the stars."]
    together = smol.generate(prompts, ["batch"], max_new_tokens=6)
    alone = [smol.generate(p, ["batch"], max_new_tokens=6)[0] for p in prompts]
    assert [g.tokens for g in together] == [g.tokens for g in alone]


@pytest.mark.slow
def test_steer_cli_prints_both_columns_and_refuses_bad_input_in_one_line(own_smol_run):
    f = live_feature(Steerer(own_smol_run), SMOL_SITE)
    common = [f"run.runs_dir={own_smol_run.parent}", f"run.run_name={own_smol_run.name}", "steer.max_new_tokens=8"]
    out = run_stage("pipeline.steer", *common, f'steer.interventions=["{SMOL_SITE}/{f} scale=4"]').stdout
    assert "unsteered" in out and f"steered: {SMOL_SITE}/{f} scale=4" in out and " | " in out
    assert (own_smol_run / "config" / "steer-generate.yaml").exists()
    bad = run_stage("pipeline.steer", *common, f"steer.interventions=[{SMOL_SITE}/5000000]", check=False)
    assert bad.returncode == 2
    errors = [line for line in bad.stderr.splitlines() if line.startswith("steer generate: error:")]
    assert len(errors) == 1 and "unknown feature" in errors[0] and "Traceback" not in bad.stderr
