"""Config choices are typed: a typo fails when the config is composed, naming what is allowed."""

import pytest
from hydra.errors import ConfigCompositionException

from conftest import compose_config, run_stage


@pytest.mark.parametrize("stage, override, allowed", [
    ("train", "sae.architecture=topkk", "topk, batchtopk, jumprelu, relu_l1, matryoshka"),
    ("train", "train.parallel=sites", "data, site"),
    ("label", "explainer.kind=gpt", "heuristic, local, openai"),
    ("steer", "export.format=onnx", "native, ds4, gguf"),
    ("steer", "contrast.site_kind=resid", "resid_pre, resid_post, attn_in, attn_out, ffn_in, ffn_out"),
    ("harvest", "model.source=internet", "embedded, hub, random"),
    ("harvest", "store.dtype=float16", "bfloat16, float32"),
])
def test_a_bad_choice_fails_at_compose_time_naming_the_choices(stage, override, allowed):
    with pytest.raises(ConfigCompositionException) as caught:
        compose_config(stage, [override])
    assert allowed in str(caught.value.__cause__ or caught.value)


def test_a_good_choice_composes_as_its_string():
    cfg = compose_config("train", ["sae=jumprelu", "train.parallel=site"])
    assert cfg.sae.architecture == "jumprelu" and f"{cfg.train.parallel}" == "site"


def test_the_command_line_refuses_a_typo_before_any_work():
    result = run_stage("pipeline.train", "sae.architecture=topkk", check=False)
    assert result.returncode != 0 and "expected one of [topk, batchtopk" in result.stderr
