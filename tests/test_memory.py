"""The start-up memory check: exact weight counts from the meta device, and a one-line refusal with the
numbers when the devices are short (GPUs faked here; the counts and the stage's refusal are real)."""

import pytest
import torch
from omegaconf import OmegaConf
from transformers import DeepseekV4Config

from conftest import compose_config, run_stage
from activations.memory import MemoryShortError, check_memory, count_weights
from activations.models import _truncate_config, load_model

GB = 1e9


def flash_config(max_layer=None):
    """DeepSeek-V4-Flash's architecture: transformers' DeepseekV4Config defaults, checked against the published config."""
    config = DeepseekV4Config()
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size, config.n_routed_experts,
            config.num_experts_per_tok, config.n_shared_experts, config.moe_intermediate_size,
            config.hc_mult) == (43, 4096, 129_280, 256, 6, 1, 2048, 4)
    assert config.mlp_layer_types[:4] == ["hash_moe"] * 3 + ["moe"]
    return _truncate_config(config, max_layer)


def fake_gpus(monkeypatch, n: int, free: float):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(free), int(143 * GB)))


def test_meta_count_is_the_built_model():
    cfg = compose_config("harvest", ["model=tiny_deepseek_v4"]).model
    model, _ = load_model(cfg)
    tensors = [*model.parameters(), *model.buffers()]
    config = DeepseekV4Config(**OmegaConf.to_container(cfg.config))
    assert count_weights(config, torch.float32) == (sum(t.numel() for t in tensors),
                                                    sum(t.numel() * t.element_size() for t in tensors))


def test_whole_flash_is_284b_parameters_570_gb_in_bf16():
    params, weight_bytes = count_weights(flash_config(), torch.bfloat16)
    assert 280e9 < params < 290e9 and 560 * GB < weight_bytes < 580 * GB


def test_flash_to_layer_20_fits_a_node_of_8_h200_not_one(monkeypatch):
    config = flash_config(max_layer=20)
    fake_gpus(monkeypatch, 8, 141 * GB)
    need = check_memory("deepseek_v4_flash", config, torch.bfloat16, "auto", torch.device("cuda"))
    assert 135e9 < need.params < 145e9 and 280 * GB < need.total < 320 * GB  # 21 of 43 blocks, embeddings, lm_head

    fake_gpus(monkeypatch, 1, 141 * GB)
    with pytest.raises(MemoryShortError) as short:
        check_memory("deepseek_v4_flash", config, torch.bfloat16, "auto", torch.device("cuda"))
    assert str(short.value).startswith(
        "deepseek_v4_flash up to layer 20 (21 of 43 blocks, 139B parameters) needs about 308 GB in bfloat16 "
        "(279 GB of weights, 29 GB of headroom) but the 1 GPU here has 141 GB free: use more GPUs")

    monkeypatch.setenv("DIALBOX_MEMORY_CHECK", "0")
    check_memory("deepseek_v4_flash", config, torch.bfloat16, "auto", torch.device("cuda"))


def test_load_model_refuses_before_allocating(monkeypatch):
    class TinyRam:
        available = 10_000

    monkeypatch.setattr("activations.memory.psutil.virtual_memory", TinyRam)
    with pytest.raises(MemoryShortError, match=r"tiny_deepseek_v4 \(.*this machine's RAM has 0 GB free"):
        load_model(compose_config("harvest", ["model=tiny_deepseek_v4"]).model)


@pytest.mark.slow
def test_flash_harvest_on_this_machine_fails_early_in_one_line(tmp_path):
    flash_config().save_pretrained(tmp_path / "flash")  # config.json only: no weights, no hub
    result = run_stage("pipeline.harvest", f"run.runs_dir={tmp_path}", "model=deepseek_v4_flash",
                       f"model.path={tmp_path / 'flash'}", "harvest.sites=[L20.ffn_out]", check=False)
    assert result.returncode == 2
    assert result.stderr.startswith("harvest: error: deepseek_v4_flash up to layer 20 (21 of 43 blocks, 139B "
                                    "parameters) needs about 307 GB in bfloat16")
    assert result.stderr.count("\n") == 1


def test_random_flash_is_4_blocks_of_flash_width_27b_parameters():
    cfg = compose_config("harvest", ["model=random_deepseek_v4_flash"]).model
    assert (cfg.source, cfg.dtype, cfg.device, cfg.init_on_device) == ("random", "bfloat16", "cuda", True)
    config = DeepseekV4Config(**OmegaConf.to_container(cfg.config))
    flash = flash_config()
    assert (config.num_hidden_layers, config.hidden_size, config.n_routed_experts, config.num_experts_per_tok,
            config.n_shared_experts, config.moe_intermediate_size, config.hc_mult) == (4, 4096, 256, 6, 1, 2048, 4)
    assert config.mlp_layer_types == flash.mlp_layer_types[:4]
    # Flash's compress_ratios begin 0, 0, 4, 128 (DeepseekV4Config's own default is V4-Pro's schedule)
    assert config.layer_types == ["sliding_attention", "sliding_attention", "compressed_sparse_attention",
                                  "heavily_compressed_attention"]
    assert config.compress_rates == flash.compress_rates and config.sliding_window == flash.sliding_window == 128
    params, weight_bytes = count_weights(config, torch.bfloat16)
    assert 26.5e9 < params < 27e9 and 53 * GB < weight_bytes < 54 * GB


def test_init_on_device_draws_in_the_dtype_and_counts_memory_in_it(monkeypatch):
    overrides = ["model=tiny_deepseek_v4", "model.dtype=bfloat16"]
    detour, _ = load_model(compose_config("harvest", overrides).model)
    model, _ = load_model(compose_config("harvest", [*overrides, "model.init_on_device=true"]).model)
    dtypes = {name: t.dtype for name, t in model.state_dict().items()}
    assert dtypes == {name: t.dtype for name, t in detour.state_dict().items()}  # float32 only where transformers keeps it
    assert dtypes["model.layers.0.mlp.experts.gate_up_proj"] == torch.bfloat16
    assert dtypes["model.layers.0.attn_hc.fn"] == torch.float32
    assert model.model.layers[0].mlp.gate.tid2eid.any()  # the hash layer's table is filled
    logits = model(torch.tensor([[1, 300, 400, 500] * 8])).logits
    assert logits.dtype == torch.bfloat16 and logits.isfinite().all()

    config = DeepseekV4Config(**OmegaConf.to_container(compose_config("harvest", overrides).model.config))
    bf16_need = check_memory("tiny", config, torch.bfloat16, "", torch.device("cpu")).total
    float32_need = check_memory("tiny", config, torch.float32, "", torch.device("cpu")).total

    class Ram:  # room for the model drawn in bf16, not for its float32 detour
        available = (bf16_need + float32_need) // 2

    monkeypatch.setattr("activations.memory.psutil.virtual_memory", Ram)
    load_model(compose_config("harvest", [*overrides, "model.init_on_device=true"]).model)
    with pytest.raises(MemoryShortError, match="in float32"):
        load_model(compose_config("harvest", overrides).model)
