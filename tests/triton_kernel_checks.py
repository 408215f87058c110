"""The Triton kernels of sae/triton_topk.py against torch: the decoder equals embedding_bag and the
encoder backward the dense one, forward and backward, and the whole TopK step with them equals
sae-lens's loss and gradients in float32.

Not collected by itself (no test_ prefix): tests/test_topk_step.py runs this file in a pytest
subprocess, on the GPU when there is one, else in Triton's interpreter on CPU tensors
(TRITON_INTERPRET=1, which must be set before triton is first imported).
"""

import os

import pytest
import torch
from omegaconf import OmegaConf
from sae_lens.saes.sae import TrainStepInput

from pipeline.config import SAEConfig
from sae.architectures import build_sae
from sae.step import dense_encode, topk_step, torch_decode, triton_kernels

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture
def kernel_device():
    """Where the Triton kernels run: the GPU when there is one, else the interpreter on the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    assert INTERPRETED, "on CPU this file runs under TRITON_INTERPRET=1"
    return torch.device("cpu")


def triton_topk():
    from sae import triton_topk  # imported by the tests only: test_topk_step imports this file's helper
    return triton_topk


def triton_encode():
    from sae import triton_encode
    return triton_encode


# (tokens, k, latents, d_in): d_in across two column blocks and short of a block; k over one block of 16
# and not a multiple of it; few latents, so latents repeat within a token (decoder) and runs of a latent
# cross the scatter programs' shares of 64 pairs
SHAPES = [(5, 3, 40, 130), (7, 17, 20, 33), (40, 8, 600, 16)]


@pytest.mark.parametrize("tokens, k, latents, d_in", SHAPES)
def test_triton_decoder_equals_embedding_bag_forward_and_backward(kernel_device, tokens, k, latents, d_in):
    g = torch.Generator().manual_seed(tokens)
    indices = torch.randint(latents, (tokens, k), generator=g).to(kernel_device)
    table = torch.randn(latents, d_in, generator=g).to(kernel_device).requires_grad_()
    weights = torch.randn(tokens, k, generator=g).to(kernel_device).requires_grad_()
    grad_out = torch.randn(tokens, d_in, generator=g).to(kernel_device)
    results = []
    for decode in (triton_topk().sparse_decode, torch_decode):
        out = decode(indices, table, weights)
        table.grad = weights.grad = None
        out.backward(grad_out)
        results.append((out.detach(), table.grad, weights.grad))
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tokens, k, latents, d_in", SHAPES)
def test_triton_encoder_backward_equals_the_dense_one(kernel_device, tokens, k, latents, d_in):
    g = torch.Generator().manual_seed(tokens)
    x, W_enc, b_enc = (torch.randn(*shape, generator=g).to(kernel_device).requires_grad_()
                       for shape in ((tokens, d_in), (d_in, latents), (latents,)))
    # a gradient per (token, latent): the two encoders list a token's top k in different orders
    grad_per_latent = torch.randn(tokens, latents, generator=g).to(kernel_device)
    results = []
    for encode in (triton_topk().sparse_topk_encode, lambda *args: dense_encode(*args)[:2]):
        values, chosen = encode(x, W_enc, b_enc, k, torch.float32)
        x.grad = W_enc.grad = b_enc.grad = None
        values.backward(grad_per_latent.gather(1, chosen))
        chosen, order = chosen.sort(dim=-1)
        results.append((values.detach().gather(1, order), chosen, x.grad, W_enc.grad, b_enc.grad))
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


# (tokens, k, latents, d_in, candidates per tile), in tiles of 64 tokens x 128 latents: tokens across two
# blocks and short of one; latents across tiles, the last short (of candidates too, in the second shape); d_in
# short of a step of 64, and across two; and 2 candidates a tile for a top 8, so that tokens with more of
# theirs in one tile are recomputed densely
FUSED_SHAPES = [(70, 8, 600, 40, None), (5, 64, 300, 100, None), (70, 8, 2000, 40, 2)]


@pytest.mark.parametrize("tokens, k, latents, d_in, c", FUSED_SHAPES)
def test_fused_encoder_forward_equals_addmm_topk(kernel_device, tokens, k, latents, d_in, c):
    g = torch.Generator().manual_seed(tokens + k)
    x, W, b = (torch.randn(*shape, generator=g).to(kernel_device) for shape in ((tokens, d_in), (d_in, latents), (latents,)))
    values, chosen = triton_encode().fused_topk(x, W, b, k, c=c)
    expected = torch.addmm(b, x, W).topk(k, dim=-1)
    torch.testing.assert_close(values.sort(dim=-1, descending=True).values, expected.values)
    assert torch.equal(chosen.sort(dim=-1).values, expected.indices.sort(dim=-1).values)
    if c:  # the case is real: some token has more than c of its top k in one tile
        tiles = expected.indices // triton_encode().TILE_SHAPES[0][1]
        assert max(row.bincount().max() for row in tiles.cpu()) > c


@pytest.mark.skipif(INTERPRETED, reason="Triton 3.9's interpreter multiplies bf16 tiles as integers; compiled on a GPU only")
def test_fused_encoder_forward_in_bf16_keeps_the_top_k(kernel_device):
    """bf16 inputs: the chosen latents are the top k of the exact products, up to bf16 rounding near the k-th."""
    g = torch.Generator().manual_seed(1)
    x, W = torch.randn(64, 96, generator=g), torch.randn(96, 512, generator=g)
    b = torch.randn(512, generator=g)
    x16, W16 = x.bfloat16().to(kernel_device), W.bfloat16().to(kernel_device)
    values, chosen = triton_encode().fused_topk(x16, W16, b.to(kernel_device), 16)
    exact = torch.addmm(b, x16.float().cpu(), W16.float().cpu())
    torch.testing.assert_close(values.cpu(), exact.gather(1, chosen.cpu()), rtol=1e-5, atol=1e-4)
    kth = exact.topk(16, dim=-1).values[:, -1:]
    assert (exact.gather(1, chosen.cpu()) >= kth - 1e-3).all()
    # the step's forward: whichever way timed fastest here, which gives the same top k
    fastest_values, _ = triton_encode().fastest_forward(x16, W16, b.to(kernel_device), 16)
    torch.testing.assert_close(fastest_values.sort(dim=-1).values, values.sort(dim=-1).values, rtol=2e-2, atol=2e-2)


def test_the_step_keeps_the_fastest_forward_that_agrees_with_cublas(kernel_device, monkeypatch):
    """The choice on the first batch: the fastest of the ways, but never a fused one whose answer is wrong.
    (do_bench is replaced by fixed times: the choice, not the timing, is under test; the interpreter has none.)"""
    import triton.testing

    te = triton_encode()
    g = torch.Generator().manual_seed(2)
    x, W, b = (torch.randn(*shape, generator=g).to(kernel_device) for shape in ((70, 40), (40, 600), (600,)))
    fused = [name for name in te.forwards() if name != te.BASELINE]
    times = iter([3.0, 1.0, 2.0, 4.0, 3.0])  # the baseline, then the fused ways in order
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **_: (fn(), next(times))[1])
    monkeypatch.setattr(te, "_fastest", {})
    values, chosen = te.fastest_forward(x, W, b, 8)
    assert list(te._fastest.values()) == [fused[0]]
    assert torch.equal(chosen.sort(dim=-1).values, torch.addmm(b, x, W).topk(8).indices.sort(dim=-1).values)

    right = te.fused_topk
    monkeypatch.setattr(te, "fused_topk", lambda *args, **kw: (lambda v, i: (v, (i + 1) % 600))(*right(*args, **kw)))
    assert list(te.time_forwards(x, W, b, 8)) == [te.BASELINE]  # every fused way left out


def test_topk_step_with_triton_kernels_equals_sae_lens_training_pass(kernel_device):
    assert_step_equals_sae_lens(kernel_device, triton_kernels(), tokens=64)


def assert_step_equals_sae_lens(device: torch.device, kernels, tokens: int) -> None:
    """The TopK step's loss, reconstruction and every gradient equal sae-lens's training pass (float32, AuxK on)."""
    torch.manual_seed(0)
    sae = build_sae(OmegaConf.structured(SAEConfig(k=16)), 48, {"model_name": "m", "hook_name": "L0.ffn_out"},
                    str(device))
    x = torch.randn(tokens, 48, device=device)
    dead = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=device)
    dead[::3] = True  # AuxK runs, and decodes its 24 latents through the same decoder
    ours = topk_step(sae, x, dead, bf16_encoder=False, kernels=kernels)
    ours.loss.backward()
    our_grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    theirs = sae.training_forward_pass(TrainStepInput(x, {}, dead, 0, False))
    theirs.loss.backward()
    torch.testing.assert_close(ours.loss, theirs.loss)
    torch.testing.assert_close(ours.recon, theirs.sae_out.detach())
    for name, p in sae.named_parameters():
        torch.testing.assert_close(our_grads[name], p.grad, rtol=1e-4, atol=1e-6)
