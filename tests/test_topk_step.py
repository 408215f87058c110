"""The fast TopK step computes sae-lens's loss and gradients, with torch's kernels and with Triton's;
the Triton decoder equals torch's embedding_bag, and the Triton encoder backward the dense one.

The Triton kernels run on the GPU when there is one, else in Triton's interpreter on CPU tensors:
the interpreter must be on before triton is first imported, and a test session has imported it
already (torch and sae-lens do), so on CPU the kernel tests run again in a pytest subprocess with
TRITON_INTERPRET=1.
"""

import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from sae_lens.saes.sae import TrainStepInput

from conftest import ROOT
from pipeline.config import SAEConfig
from sae.architectures import build_sae
from sae.step import TORCH_KERNELS, dense_encode, kernels_for, topk_step, torch_decode, triton_kernels

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture
def kernel_device():
    """Where the Triton kernels run: the GPU when there is one, else the interpreter on the CPU."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if not INTERPRETED:
        pytest.skip("on CPU, test_kernels_pass_under_the_interpreter runs this under TRITON_INTERPRET=1")
    return torch.device("cpu")


def triton_topk():
    from sae import triton_topk  # imported only where kernel_device allows it
    return triton_topk


def test_kernels_pass_under_the_interpreter():
    pytest.importorskip("triton")
    if torch.cuda.is_available() or INTERPRETED:
        pytest.skip("the kernel tests run directly here")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__, "-k", "triton"],
                         cwd=ROOT, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True)
    assert run.returncode == 0 and f"{2 * len(SHAPES) + 1} passed" in run.stdout, run.stdout[-3000:] + run.stderr[-2000:]


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


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_fast_topk_step_equals_sae_lens_training_pass(kernels, request):
    device = request.getfixturevalue("kernel_device") if kernels == "triton" else torch.device("cpu")
    step_kernels = triton_kernels() if kernels == "triton" else TORCH_KERNELS
    torch.manual_seed(0)
    sae = build_sae(OmegaConf.structured(SAEConfig(k=16)), 48, {"model_name": "m", "hook_name": "L0.ffn_out"},
                    str(device))
    x = torch.randn(256 if kernels == "torch" else 64, 48, device=device)
    dead = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=device)
    dead[::3] = True  # AuxK runs, and decodes its 24 latents through the same decoder
    ours = topk_step(sae, x, dead, bf16_encoder=False, kernels=step_kernels)
    ours.loss.backward()
    our_grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    theirs = sae.training_forward_pass(TrainStepInput(x, {}, dead, 0, False))
    theirs.loss.backward()
    torch.testing.assert_close(ours.loss, theirs.loss)
    torch.testing.assert_close(ours.recon, theirs.sae_out.detach())
    for name, p in sae.named_parameters():
        torch.testing.assert_close(our_grads[name], p.grad, rtol=1e-4, atol=1e-6)


def test_cpu_steps_run_torch_kernels():
    assert kernels_for(torch.device("cpu"), use_triton=True) is TORCH_KERNELS
    assert kernels_for(torch.device("cuda"), use_triton=False) is TORCH_KERNELS
