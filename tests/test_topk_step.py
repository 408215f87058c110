"""The fast TopK step computes sae-lens's loss and gradients, with either decoder; the Triton decoder
equals torch's embedding_bag forward and backward.

The Triton kernels run on the GPU when there is one, else in Triton's interpreter on CPU tensors:
the interpreter must be on before triton is first imported, and this session has imported it
already, so on CPU the kernel tests run again in a pytest subprocess with TRITON_INTERPRET=1.
"""

import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from sae_lens.saes.sae import TrainStepInput

from pipeline.config import SAEConfig
from sae.architectures import build_sae
from conftest import ROOT
from sae.step import decoder_for, topk_step, torch_decode

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


def triton_decode():
    from sae.triton_decoder import sparse_decode  # imported only where kernel_device allows it
    return sparse_decode


def test_kernels_pass_under_the_interpreter():
    pytest.importorskip("triton")
    if torch.cuda.is_available() or INTERPRETED:
        pytest.skip("the kernel tests run directly here")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__, "-k", "triton"],
                         cwd=ROOT, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True)
    assert run.returncode == 0 and f"{len(SHAPES) + 1} passed" in run.stdout, run.stdout[-3000:] + run.stderr[-2000:]


# (tokens, k, latents, d_in): d_in across two column blocks and short of a block; k over one block of 16
# and not a multiple of it; few latents, so rows repeat within a token and runs of a latent cross the
# W-gradient programs' shares of 64 pairs
SHAPES = [(5, 3, 40, 130), (7, 17, 20, 33), (40, 8, 600, 16)]


@pytest.mark.parametrize("tokens, k, latents, d_in", SHAPES)
def test_triton_decoder_equals_embedding_bag_forward_and_backward(kernel_device, tokens, k, latents, d_in):
    g = torch.Generator().manual_seed(tokens)
    indices = torch.randint(latents, (tokens, k), generator=g).to(kernel_device)
    table = torch.randn(latents, d_in, generator=g).to(kernel_device).requires_grad_()
    weights = torch.randn(tokens, k, generator=g).to(kernel_device).requires_grad_()
    grad_out = torch.randn(tokens, d_in, generator=g).to(kernel_device)
    results = []
    for decode in (triton_decode(), torch_decode):
        out = decode(indices, table, weights)
        table.grad = weights.grad = None
        out.backward(grad_out)
        results.append((out.detach(), table.grad, weights.grad))
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("decoder", ["torch", "triton"])
def test_fast_topk_step_equals_sae_lens_training_pass(decoder, request):
    device = request.getfixturevalue("kernel_device") if decoder == "triton" else torch.device("cpu")
    decode = triton_decode() if decoder == "triton" else torch_decode
    torch.manual_seed(0)
    sae = build_sae(OmegaConf.structured(SAEConfig(k=16)), 48, {"model_name": "m", "hook_name": "L0.ffn_out"},
                    str(device))
    x = torch.randn(256 if decoder == "torch" else 64, 48, device=device)
    dead = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=device)
    dead[::3] = True  # AuxK runs, and decodes its 24 latents through the same decoder
    ours = topk_step(sae, x, dead, bf16_encoder=False, decode=decode)
    ours.loss.backward()
    our_grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    theirs = sae.training_forward_pass(TrainStepInput(x, {}, dead, 0, False))
    theirs.loss.backward()
    torch.testing.assert_close(ours.loss, theirs.loss)
    torch.testing.assert_close(ours.recon, theirs.sae_out.detach())
    for name, p in sae.named_parameters():
        torch.testing.assert_close(our_grads[name], p.grad, rtol=1e-4, atol=1e-6)


def test_cpu_steps_decode_with_torch():
    assert decoder_for(torch.device("cpu"), triton_decoder=True) is torch_decode
    assert decoder_for(torch.device("cuda"), triton_decoder=False) is torch_decode
