"""Every site reads the tensor the guide says it does, on real models.

Each site's rows are checked against a computation done here from the model's own modules
(not through the adapter), on SmolLM2-135M (llama family, the embedded model, converted once
into the cache) and on a tiny random DeepSeek-V4 (hyper-connection streams).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from activations.adapters import make_adapter
from activations.config import ModelConfig
from activations.errors import ConfigError
from activations.models import load_model, resolve_dtype
from activations.sites import SITE_KINDS, Site, SiteError

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
CLOSE = dict(rtol=1e-4, atol=1e-4)


def model_cfg(name: str, **overrides):
    """The model config Hydra composes from conf/model/<name>.yaml (a DictConfig typed by ModelConfig)."""
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(CONF / f"{name}.yaml"), overrides)


def token_batch(model, seq: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(3, model.config.vocab_size, (2, seq), generator=generator).to(model.device)


def causal_mask(seq: int, window: int | None = None) -> torch.Tensor:
    """Additive mask [1, 1, seq, seq]: query q sees keys k <= q (and q - k < window)."""
    distance = torch.arange(seq)[:, None] - torch.arange(seq)[None, :]
    allowed = distance >= 0
    if window is not None:
        allowed &= distance < window
    return torch.zeros(seq, seq).masked_fill(~allowed, float("-inf"))[None, None]


def logits_of(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False).logits


@pytest.fixture(scope="module")
def smol():
    cfg = model_cfg("smollm2_135m", device="cpu")
    model, _ = load_model(cfg)
    return model, make_adapter(model, cfg), token_batch(model, 12)


@pytest.fixture(scope="module")
def tiny():
    cfg = model_cfg("tiny_deepseek_v4")
    model, _ = load_model(cfg)
    # 64 tokens: several compressed entries per CSA/HCA layer, more than index_topk, past the window.
    return model, make_adapter(model, cfg), token_batch(model, 64)


# --- llama family ---------------------------------------------------------------------------


@pytest.mark.parametrize("layer", [2, 29])
def test_llama_sites_match_block_computed_by_hand(smol, layer):
    model, adapter, ids = smol
    block = model.model.layers[layer]
    got = adapter.capture([Site(layer, kind) for kind in SITE_KINDS], ids)
    with torch.inference_mode():
        hidden = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
        x = hidden[layer]
        positions = torch.arange(ids.shape[1])[None]
        rope = model.model.rotary_emb(x, positions)
        attn = block.self_attn(
            hidden_states=block.input_layernorm(x), position_embeddings=rope, attention_mask=causal_mask(ids.shape[1])
        )[0]
        mid = x + attn
        ffn = block.mlp(block.post_attention_layernorm(mid))
        out = mid + ffn

    expected = {"resid_pre": x, "attn_in": x, "attn_out": attn, "ffn_in": mid, "ffn_out": ffn, "resid_post": out}
    for kind, value in expected.items():
        torch.testing.assert_close(got[Site(layer, kind)], value, **CLOSE, msg=f"L{layer}.{kind}")
    if layer + 1 < adapter.n_layers:
        torch.testing.assert_close(got[Site(layer, "resid_post")], hidden[layer + 1], **CLOSE)
    else:  # the last of output_hidden_states has been through the final norm
        torch.testing.assert_close(model.model.norm(got[Site(layer, "resid_post")]), hidden[-1], **CLOSE)


# --- DeepSeek-V4 ----------------------------------------------------------------------------


def hc_pre_weights(hc, streams):
    """The `pre` stream weights of a hyper-connection, recomputed from its parameters."""
    n = hc.hc_mult
    flat = streams.flatten(2).float()
    norm = hc.input_norm  # its epsilon is `eps` up to transformers 5.24, `variance_epsilon` from 5.25
    eps = norm.variance_epsilon if hasattr(norm, "variance_epsilon") else norm.eps
    flat = flat * torch.rsqrt(flat.square().mean(-1, keepdim=True) + eps)
    mixes = flat @ hc.fn[:n].float().T
    return torch.sigmoid(mixes * hc.scale[0] + hc.base[:n]) + hc.hc_eps


def test_deepseek_sites_match_block_computed_by_hand(tiny):
    model, adapter, ids = tiny
    config = model.config
    seq = ids.shape[1]
    with torch.inference_mode():
        hidden = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    for layer, block in enumerate(model.model.layers):
        got = adapter.capture([Site(layer, kind) for kind in SITE_KINDS], ids)
        with torch.inference_mode():
            streams = hidden[layer]  # what enters the block, [b, s, hc, d]
            attn_in = (hc_pre_weights(block.attn_hc, streams).unsqueeze(-1) * streams).sum(2)
            positions = torch.arange(seq)[None]
            rope = {kind: model.model.rotary_emb(streams, positions, layer_type=kind) for kind in ("main", "compress")}
            attn_out = block.self_attn(
                block.input_layernorm(attn_in),
                position_embeddings=rope,
                position_ids=positions,
                attention_mask=causal_mask(seq, config.sliding_window).expand(len(ids), -1, -1, -1),
            )[0]
            post, comb, _ = block.attn_hc(streams)
            mid = post.unsqueeze(-1) * attn_out.unsqueeze(-2) + comb.transpose(-1, -2) @ streams
            ffn_in = (hc_pre_weights(block.ffn_hc, mid).unsqueeze(-1) * mid).sum(2)
            ffn_out = block.mlp(block.post_attention_layernorm(ffn_in), input_ids=ids)
            post, comb, _ = block.ffn_hc(mid)
            out = post.unsqueeze(-1) * ffn_out.unsqueeze(-2) + comb.transpose(-1, -2) @ mid

        expected = {
            "resid_pre": streams.mean(2),  # the tiny config reduces with hc_reduce=mean
            "attn_in": attn_in,
            "attn_out": attn_out,
            "ffn_in": ffn_in,
            "ffn_out": ffn_out,
            "resid_post": out.mean(2),
        }
        for kind, value in expected.items():
            torch.testing.assert_close(got[Site(layer, kind)], value, **CLOSE, msg=f"L{layer}.{kind}")


def test_deepseek_stream_reductions(tiny):
    model, _, ids = tiny
    with torch.inference_mode():
        hidden = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    streams_in, streams_out = hidden[1], hidden[2]  # what enters and leaves layer 1
    expected = {
        "mean": lambda s: s.mean(2),
        "concat": lambda s: s.flatten(2),
        "stream0": lambda s: s[:, :, 0],
        "stream3": lambda s: s[:, :, 3],
    }
    for hc_reduce, reduce in expected.items():
        adapter = make_adapter(model, model_cfg("tiny_deepseek_v4", hc_reduce=hc_reduce))
        got = adapter.capture(["L1.resid_pre", "L1.resid_post"], ids)
        width = 4 * 64 if hc_reduce == "concat" else 64
        assert adapter.width("L1.resid_post") == width and adapter.width("L1.ffn_out") == 64
        assert adapter.describe()["hc_reduce"] == hc_reduce and adapter.describe()["hc_mult"] == 4
        torch.testing.assert_close(got[Site(1, "resid_pre")], reduce(streams_in), **CLOSE)
        torch.testing.assert_close(got[Site(1, "resid_post")], reduce(streams_out), **CLOSE)


def test_tiny_deepseek_is_sane(tiny):
    model, adapter, ids = tiny
    assert set(model.config.layer_types) == {
        "sliding_attention",
        "compressed_sparse_attention",
        "heavily_compressed_attention",
    }
    hash_layer = model.model.layers[0].mlp
    assert hash_layer.is_hash and hash_layer.gate.tid2eid.any()  # load_model filled the hash table
    assert torch.isfinite(logits_of(model, ids)).all()
    assert adapter.describe() == {
        "model": "tiny_deepseek_v4",
        "family": "deepseek_v4",
        "model_type": "deepseek_v4",
        "d_model": 64,
        "n_layers": 4,
        "hc_mult": 4,
        "hc_reduce": "mean",
    }


def test_random_weights_do_not_depend_on_dtype(tiny):
    model, _, _ = tiny
    bf16, _ = load_model(model_cfg("tiny_deepseek_v4", dtype="bfloat16"))
    assert bf16.model.layers[0].self_attn.q_a_proj.weight.dtype == torch.bfloat16
    assert bf16.model.layers[0].attn_hc.fn.dtype == torch.float32  # the model keeps these in float32
    for name, weight in bf16.state_dict().items():
        assert torch.equal(weight, model.state_dict()[name].to(weight.dtype)), name


# --- write() on both families ---------------------------------------------------------------


@pytest.mark.parametrize("family", ["smol", "tiny"])
@pytest.mark.parametrize("kind", SITE_KINDS)
def test_write_back_what_was_read_is_exact_and_a_new_value_sticks(family, kind, request):
    model, adapter, ids = request.getfixturevalue(family)
    site = Site(1, kind)
    clean = logits_of(model, ids)

    with adapter.hooks({site: lambda rows: rows}):
        torch.testing.assert_close(logits_of(model, ids), clean, rtol=0, atol=1e-6)

    generator = torch.Generator().manual_seed(2)
    written, read_back = {}, {}

    def write(rows):
        noise = torch.randn(rows.shape, generator=generator).to(rows)
        written["rows"] = rows + noise * rows.norm(dim=-1, keepdim=True) / rows.shape[-1] ** 0.5
        return written["rows"]

    # Hooks run in registration order: the outer block writes, the inner one reads what it wrote.
    with adapter.hooks({site: write}), adapter.hooks({site: lambda rows: read_back.setdefault("rows", rows)}):
        steered = logits_of(model, ids)
    torch.testing.assert_close(read_back["rows"], written["rows"], **CLOSE)
    assert (steered - clean).abs().max() > 1e-3, f"writing {site} did not change the logits"


@pytest.mark.parametrize("family", ["smol", "tiny"])
def test_resid_post_write_is_what_the_next_block_reads(family, request):
    model, adapter, ids = request.getfixturevalue(family)
    zeros = {}
    with adapter.hooks({"L0.resid_post": lambda rows: zeros.setdefault("rows", torch.zeros_like(rows))}):
        got = adapter.capture(["L1.resid_pre"], ids)
        steered = logits_of(model, ids)
    torch.testing.assert_close(got[Site(1, "resid_pre")], zeros["rows"], **CLOSE)
    assert (steered - logits_of(model, ids)).abs().max() > 1e-3


# --- truncated forward and truncated loading ------------------------------------------------


@pytest.mark.parametrize("family", ["smol", "tiny"])
def test_capture_stops_after_the_deepest_site(family, request):
    model, adapter, ids = request.getfixturevalue(family)
    sites = [Site(0, "ffn_out"), Site(1, "attn_out"), Site(1, "resid_post")]
    calls = []
    later = model.model.layers[2].register_forward_pre_hook(lambda *args: calls.append("layer 2"))
    head = model.lm_head.register_forward_pre_hook(lambda *args: calls.append("lm_head"))
    try:
        got = adapter.capture(sites, ids)
    finally:
        later.remove()
        head.remove()
    assert calls == []

    full = {}
    with adapter.hooks({site: (lambda rows, site=site: full.setdefault(site, rows.clone())) for site in sites}):
        logits_of(model, ids)
    assert got.keys() == full.keys()
    for site in sites:
        torch.testing.assert_close(got[site], full[site], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["smollm2_135m", "tiny_deepseek_v4"])
def test_truncated_loading_matches_the_full_model(name, request):
    _, full_adapter, ids = request.getfixturevalue("smol" if name == "smollm2_135m" else "tiny")
    cfg = model_cfg(name, device="cpu")
    model, _ = load_model(cfg, max_layer=1)
    adapter = make_adapter(model, cfg)
    assert len(model.model.layers) == adapter.loaded_layers == 2
    assert adapter.n_layers == full_adapter.n_layers > 2
    sites = [Site(1, "resid_post"), Site(1, "ffn_in")]
    got, expected = adapter.capture(sites, ids), full_adapter.capture(sites, ids)
    for site in sites:
        torch.testing.assert_close(got[site], expected[site], **CLOSE)
    # a site that exists in the model but was not loaded says so
    with pytest.raises(SiteError, match="loaded truncated"):
        adapter.site(Site(2, "resid_post"))


@pytest.mark.parametrize("units, expected", [((False, False), torch.float32), ((True, False), torch.bfloat16),
                                             ((False, True), torch.bfloat16)])
def test_model_dtype_auto_is_bfloat16_only_where_it_runs_natively(units, expected, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: units[0])
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: units[1])
    assert resolve_dtype("auto", torch.device("cpu")) == expected
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("float32", torch.device("cuda")) == torch.float32
    with pytest.raises(ConfigError, match="unknown model.dtype 'fp16': use one of float32, bfloat16 or auto"):
        resolve_dtype("fp16", torch.device("cpu"))
    model, _ = load_model(model_cfg("tiny_deepseek_v4", dtype="auto", device="cpu"))
    assert model.model.embed_tokens.weight.dtype == expected


class Reports(logging.Handler):
    """transformers' load reports, as its logger emits them."""

    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_a_truncated_load_reports_only_what_is_wrong(tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    reports, logger = Reports(), logging.getLogger("transformers.modeling_utils")
    level = logger.level
    logger.setLevel(logging.WARNING)  # as a fresh process has it, whatever earlier tests set
    logger.addHandler(reports)
    config = LlamaConfig(vocab_size=49152, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    cfg = model_cfg("smollm2_135m", source="hub", path=str(tmp_path), tokenizer="embedded", device="cpu")
    load_model(cfg, max_layer=1)
    assert not reports.messages  # blocks 2-3 left out on purpose: nothing to report
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.layers.0.mlp.up_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    load_model(cfg, max_layer=1)
    logger.removeHandler(reports)
    logger.setLevel(level)
    [report] = reports.messages  # a weight the kept blocks lack is still reported
    assert "LOAD REPORT" in report and "layers.0.mlp.up_proj.weight" in report and "MISSING" in report


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["smol", "tiny"])
def test_bad_sites_name_the_valid_ones(family, request):
    _, adapter, _ = request.getfixturevalue(family)
    with pytest.raises(SiteError, match="valid kinds are resid_pre, resid_post"):
        adapter.site(Site(0, "mlp_out"))
    last = adapter.n_layers - 1
    with pytest.raises(SiteError, match=f"layers 0..{last}"):
        adapter.site(Site(last + 1, "resid_post"))
    assert adapter.site("L0.ffn_out").width == adapter.d_model


def test_bad_hook_results_and_empty_captures_are_refused(tiny):
    _, adapter, ids = tiny
    with pytest.raises(SiteError, match="must return the shape it was given"):
        with adapter.hooks({"L0.ffn_out": lambda rows: rows[..., :3]}):
            adapter.capture(["L1.resid_pre"], ids)
    with pytest.raises(SiteError, match="at least one site"):
        adapter.capture([], ids)


@pytest.mark.parametrize("hc_reduce", ["median", "stream4", "stream", "streamx"])
def test_bad_hc_reduce_lists_valid_values(tiny, hc_reduce):
    model, _, _ = tiny
    with pytest.raises(ValueError, match="valid values are mean, concat, stream0..stream3"):
        make_adapter(model, model_cfg("tiny_deepseek_v4", hc_reduce=hc_reduce))


def test_family_mismatch_is_refused(tiny):
    model, _, _ = tiny
    with pytest.raises(ValueError, match="set model.family=deepseek_v4"):
        make_adapter(model, model_cfg("tiny_deepseek_v4", family="llama"))
