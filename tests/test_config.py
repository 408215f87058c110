"""Config choices are typed: a typo fails when the config is composed, naming what is allowed."""

import pytest
import torch
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


@pytest.mark.slow  # stage subprocesses
def test_the_command_line_refuses_a_typo_before_any_work():
    result = run_stage("pipeline.train", "sae.architecture=topkk", check=False)
    assert result.returncode != 0 and "expected one of [topk, batchtopk" in result.stderr


def test_stages_print_their_own_errors_in_one_line_and_let_bugs_show_a_traceback(capsys):
    from activations.store import StoreError
    from pipeline.cli import one_line_errors

    with pytest.raises(SystemExit) as exited:
        with one_line_errors("train"):
            raise StoreError("no activation store at runs/x: run `make harvest` first")
    assert exited.value.code == 2
    assert capsys.readouterr().err == "train: error: no activation store at runs/x: run `make harvest` first\n"
    with pytest.raises(KeyError):  # not ours: a bug, whose traceback must reach the user
        with one_line_errors("train"):
            raise KeyError("mean_norm")


def test_shipped_prompt_sets_are_found_from_any_directory(tmp_path, monkeypatch):
    from steering.contrast import read_prompts

    monkeypatch.chdir(tmp_path)
    assert len(read_prompts("heldout.txt")) >= 48 and read_prompts("contrast.txt")
    mine = tmp_path / "mine.txt"
    mine.write_text("# a comment\nWhy?\n\nHow?\n")
    assert read_prompts(str(mine)) == ["Why?", "How?"]


def test_a_device_this_machine_lacks_is_refused_in_one_line():
    from activations.errors import ConfigError
    from activations.models import resolve_device

    with pytest.raises(ConfigError, match=r"^train.device=cuda:99 but torch .* sees .*: use train.device=cpu"):
        resolve_device("cuda:99", "train.device")
    with pytest.raises(ConfigError, match=r"^model.device=gpu is not a device: use cpu, cuda, cuda:N or auto$"):
        resolve_device("gpu", "model.device")
    assert resolve_device("cpu", "model.device") == torch.device("cpu")


@pytest.mark.parametrize("stage", ["harvest", "train", "label", "report", "steer", "serve"])
def test_a_stage_run_here_logs_to_the_terminal_and_leaves_no_file_in_the_current_directory(stage):
    """A stage's run.dir is `.`: Hydra's default job logging would leave an empty <stage>.log in whatever
    directory the user ran it from. Jobs of a launcher keep theirs, in the run's jobs/ (test_launch.py)."""
    handlers = compose_config(stage, [], hydra=True).hydra.job_logging.handlers
    assert set(handlers) == {"console"}, f"{stage}: {set(handlers)}"
    launched = compose_config("harvest", ["launcher=submitit_local"], hydra=True).hydra.job_logging.handlers
    assert "file" in launched
