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


@pytest.fixture
def kernel_device():
    """Where the Triton kernels run: the GPU when there is one, else the interpreter on the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    assert os.environ.get("TRITON_INTERPRET") == "1", "on CPU this file runs under TRITON_INTERPRET=1"
    return torch.device("cpu")


def triton_topk():
    from sae import triton_topk  # imported by the tests only: test_topk_step imports this file's helper
    return triton_topk


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
    grad_values = torch.randn(tokens, k, generator=g).to(kernel_device)
    results = []
    for encode in (triton_topk().sparse_topk_encode, lambda *args: dense_encode(*args)[:2]):
        values, chosen = encode(x, W_enc, b_enc, k, torch.float32)
        x.grad = W_enc.grad = b_enc.grad = None
        values.backward(grad_values)
        results.append((values.detach(), chosen, x.grad, W_enc.grad, b_enc.grad))
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


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
