"""Harvesting DeepSeek-V4's routing: the stored choices against a recompute of our own, Flash's
expert counts, the store tools, and the one-line refusal on a model without a router."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr

from conftest import compose_config, run_stage
from activations.errors import ConfigError
from activations.harvesting import harvest, harvest_with
from activations.models import load_model
from activations.store import merge, verify
from activations.store.blocks import row_bytes
from store_fixtures import recommit

TINY = ["model=tiny_deepseek_v4", "data.context_length=32", "harvest.batch_size=4", "store.chunk_rows=128"]
FFN_IN = "harvest.sites=[L0.ffn_in,L1.ffn_in,L2.ffn_in,L3.ffn_in]"
# DeepSeek-V4-Flash's routing shapes at a small width: 256 experts, top-6, hash layers 0-2.
FLASH_EXPERTS = ["model.config.n_routed_experts=256", "model.config.num_experts_per_tok=6",
                 "model.config.mlp_layer_types=[hash_moe,hash_moe,hash_moe,moe]"]


def harvest_biased(runs_dir, *overrides):
    """Harvest with a random e_score_correction_bias in every learned router (init leaves it 0, so
    the choice would not show whether the bias entered it); returns (store, model)."""
    cfg = compose_config("harvest", [f"run.runs_dir={runs_dir}", *TINY, "harvest.router=true", *overrides])
    model, tokenizer = load_model(cfg.model)
    generator = torch.Generator().manual_seed(1)
    for layer in model.model.layers:
        if hasattr(layer.mlp.gate, "e_score_correction_bias"):
            layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(cfg.model.config.n_routed_experts,
                                                                     generator=generator) * 0.05)
    store, _ = harvest_with(cfg, model, tokenizer)
    return store, model


def recompute_routing(layer, ffn_in: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeepSeek-V4's routing written out from its definition: the FFN reads RMSNorm(ffn_in); scores
    = sqrt(softplus(x W^T)); learned layers choose top-k of scores + e_score_correction_bias, hash
    layers tid2eid[token]; weights = the chosen scores over their sum, times routed_scaling_factor."""
    norm, gate = layer.post_attention_layernorm, layer.mlp.gate
    x = torch.from_numpy(ffn_in)
    x = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))
    scores = F.softplus(F.linear(x, gate.weight)).sqrt()
    if hasattr(gate, "tid2eid"):
        ids = gate.tid2eid[torch.from_numpy(tokens).long()]
    else:
        ids = (scores + gate.e_score_correction_bias).argsort(dim=-1, descending=True)[:, : gate.top_k]
    chosen = scores.gather(1, ids)
    weights = chosen / (chosen.sum(dim=-1, keepdim=True) + 1e-20) * gate.routed_scaling_factor
    return ids.numpy(), weights.to(torch.bfloat16).float().numpy()


def by_expert(ids: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's (id, weight) pairs ordered by id, so choices compare whatever order they came in."""
    order = np.argsort(ids, axis=1, kind="stable")
    return np.take_along_axis(ids, order, 1), np.take_along_axis(weights, order, 1)


def test_stored_routing_equals_a_recompute_from_the_ffn_input(runs_dir):
    store, model = harvest_biased(runs_dir, FFN_IN, "harvest.max_tokens=1024", "store.dtype=float32")
    n, tokens = store.n_tokens, store.tokens(0, store.n_tokens)["tokens"]
    assert sorted(store.router) == [0, 1, 2, 3]
    assert [store.router[l]["hashed"] for l in range(4)] == [True, False, False, False]
    for layer in range(4):
        stored_ids, stored_weights = store.read_router(layer, 0, n)
        assert stored_ids.dtype == np.int16 and stored_ids.shape == (n, 2)
        assert (np.diff(stored_weights, axis=1) <= 0).all(), "heaviest expert first"
        ids, weights = recompute_routing(model.model.layers[layer], store.read(f"L{layer}.ffn_in", 0, n), tokens)
        got, want = by_expert(stored_ids, stored_weights), by_expert(ids, weights)
        np.testing.assert_array_equal(got[0], want[0], err_msg=f"expert ids at layer {layer}")
        np.testing.assert_array_equal(got[1], want[1], err_msg=f"gate weights at layer {layer}")


def test_flash_expert_counts_store_24_bytes_per_token_per_layer(runs_dir, tmp_path):
    store, model = harvest_biased(runs_dir, *FLASH_EXPERTS, "harvest.sites=[L3.ffn_out]", "harvest.max_tokens=256")
    n = store.n_tokens
    assert store.router == {0: {"top_k": 6, "n_experts": 256, "hashed": True},
                            1: {"top_k": 6, "n_experts": 256, "hashed": True},
                            2: {"top_k": 6, "n_experts": 256, "hashed": True},
                            3: {"top_k": 6, "n_experts": 256, "hashed": False}}
    tokens = torch.from_numpy(store.tokens(0, n)["tokens"]).long()
    for layer in range(4):
        ids, weights = store.read_router(layer, 0, n)
        assert ids.shape == weights.shape == (n, 6)
        assert ((0 <= ids) & (ids < 256)).all() and all(len(set(row)) == 6 for row in ids.tolist())
        np.testing.assert_allclose(weights.sum(axis=1), 1.5, atol=2e-2)  # normalised, times routed_scaling_factor
        if layer < 3:  # hash layers: the frozen table's experts
            table = model.model.layers[layer].mlp.gate.tid2eid[tokens].numpy()
            np.testing.assert_array_equal(np.sort(ids, axis=1), np.sort(table, axis=1))
    # 24 B of tokens columns + one 64-wide bf16 site + 4 routed layers x 6 x (2 + 2) B
    assert row_bytes(store) == 24 + 64 * 2 + 4 * 24
    assert verify(store.root, progress=False).ok
    merged = merge(store.root, tmp_path / "merged" / "activations", order="windows", progress=False)
    for layer in range(4):
        for a, b in zip(store.read_router(layer, 0, n), merged.read_router(layer, 0, n)):
            np.testing.assert_array_equal(a, b)
    info = run_stage("pipeline.store", "info", str(store.root)).stdout
    assert "router" in info and "L2" in info and "hash" in info and "learned" in info
    assert any(line.split()[:5] == ["L3", "learned", "6", "256", "24"] for line in info.splitlines())


def test_verify_names_an_expert_id_out_of_range(runs_dir):
    store, _ = harvest_biased(runs_dir, "harvest.sites=[L1.ffn_out]", "harvest.max_tokens=256")
    ids = zarr.open_array(store.root.zarr_store(read_only=False), path="shards/r00000-of-00001/router.L1.ids")
    ids[5, 0] = 99  # a valid chunk (its crc rewritten) holding an expert the layer does not have
    recommit(store.root.path, "r00000-of-00001", "router.L1.ids", 0)  # as though its writer had written it
    problems = verify(store.root, progress=False).problems
    assert any("router.L1.ids rows [0, 128)" in p and "expert ids outside [0, 8)" in p for p in problems), problems


def test_a_model_without_a_router_refuses_in_one_line(runs_dir):
    with pytest.raises(ConfigError, match="has no router"):
        harvest(compose_config("harvest", [f"run.runs_dir={runs_dir}", "harvest.router=true",
                                           "harvest.sites=[L1.resid_post]", "harvest.max_tokens=64"]))


def test_router_layers_beyond_the_model_are_refused(runs_dir):
    with pytest.raises(ConfigError, match="router_layers has layer 7"):
        harvest(compose_config("harvest", [f"run.runs_dir={runs_dir}", *TINY, "harvest.router_layers=[7]",
                                           "harvest.sites=[L1.resid_post]", "harvest.max_tokens=64"]))


def test_router_arrays_on_object_storage_equal_a_local_store(runs_dir, tmp_path):
    """store.url on fsspec's memory:// (the code path of s3://): the same ids and weights, verified and merged."""
    common = [*TINY, "harvest.router=true", "harvest.sites=[L2.ffn_out]", "harvest.max_tokens=512"]
    local = harvest(compose_config("harvest", [f"run.runs_dir={runs_dir}", *common]))
    remote = harvest(compose_config("harvest", [f"run.runs_dir={tmp_path / 'remote-runs'}", *common,
                                                f"store.url=memory://{tmp_path.name}/run/activations"]))
    assert str(remote.root).startswith("memory://") and remote.router == local.router
    for layer in local.router:
        for a, b in zip(local.read_router(layer, 0, local.n_tokens), remote.read_router(layer, 0, remote.n_tokens)):
            np.testing.assert_array_equal(a, b)
    assert verify(remote.root, progress=False).ok
    merged = merge(remote.root, tmp_path / "merged" / "activations", progress=False)
    np.testing.assert_array_equal(merged.read_router(2, 0, merged.n_tokens)[0], local.read_router(2, 0, local.n_tokens)[0])
