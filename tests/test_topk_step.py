"""The fast TopK step computes sae-lens's loss and gradients, with torch's kernels and with Triton's
(sae/triton_topk.py, checked in tests/triton_kernel_checks.py).

The Triton kernels run on the GPU when there is one, else in Triton's interpreter on CPU tensors. The
interpreter must be on before triton is first imported, and a test session has imported it already
(torch and sae-lens do), so the kernel checks always run in a pytest subprocess of their own.
"""

import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from sae_lens.saes.sae import TrainStepInput

from activations.errors import ConfigError
from conftest import ROOT
from pipeline.config import SAEConfig
from sae.architectures import build_sae, inner_levels, nested_widths
from sae.step import TORCH_KERNELS, kernels_for, topk_step
from triton_kernel_checks import FUSED_SHAPES, SHAPES, assert_step_equals_sae_lens

CHECKS = ROOT / "tests" / "triton_kernel_checks.py"


def test_fast_topk_step_equals_sae_lens_training_pass():
    assert_step_equals_sae_lens(torch.device("cpu"), TORCH_KERNELS, tokens=256)


@pytest.mark.parametrize("balance", [1.0, 0.5])
def test_matryoshka_topk_step_adds_each_prefixs_own_reconstruction_loss(balance):
    """matryoshka_topk: sae-lens's TopK loss, plus for each inner level the error of the first `width` latents'
    reconstruction on their own (dense, from sae-lens's own activations) times balance ** its depth, in value
    and in every gradient."""
    torch.manual_seed(0)
    cfg = OmegaConf.structured(SAEConfig(architecture="matryoshka_topk", k=16, d_sae=96, matryoshka_widths=[12, 48, 96],
                                         matryoshka_balance=balance))
    sae = build_sae(cfg, 48, {"model_name": "m", "hook_name": "L0.ffn_out"})
    levels = inner_levels(cfg, sae.cfg.d_sae)
    assert levels == ((12, balance ** 2), (48, balance))  # the innermost level weighs least
    x = torch.randn(256, 48)
    dead = torch.zeros(96, dtype=torch.bool)
    dead[::3] = True
    ours = topk_step(sae, x, dead, bf16_encoder=False, levels=levels)
    ours.loss.backward()
    our_grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    theirs = sae.training_forward_pass(TrainStepInput(x, {}, dead, 0, False))
    loss, norms = theirs.loss, sae.W_dec.norm(dim=-1)
    for width, depth in ((12, 2), (48, 1)):  # as sae-lens's Matryoshka decodes a level (its TopK rescales by the decoder norms)
        inner = (theirs.feature_acts / norms)[:, :width] @ sae.W_dec[:width] + sae.b_dec
        loss = loss + balance ** depth * (inner - x).pow(2).sum(-1).mean()
    loss.backward()
    torch.testing.assert_close(ours.loss, loss)
    # The inner levels reconstruct worse, so their weighted losses count: each adds over a quarter of the
    # whole dictionary's loss times its weight (at balance 1, the 1.5x this test always asked for).
    assert ours.loss - theirs.loss > 0.25 * theirs.loss * sum(weight for _, weight in levels)
    for name, p in sae.named_parameters():
        torch.testing.assert_close(our_grads[name], p.grad, rtol=1e-4, atol=1e-6)

    assert nested_widths(OmegaConf.structured(SAEConfig(architecture="matryoshka_topk")), 64) == (8, 16, 32, 64)
    assert nested_widths(OmegaConf.structured(SAEConfig()), 64) == ()  # plain TopK: no inner levels
    assert inner_levels(OmegaConf.structured(SAEConfig(architecture="matryoshka")), 64) == ()  # sae-lens's own loss
    with pytest.raises(ConfigError, match="matryoshka_balance=-1.0 must be >= 0"):
        inner_levels(OmegaConf.structured(SAEConfig(architecture="matryoshka_topk", matryoshka_balance=-1.0)), 64)
    with pytest.raises(ConfigError, match="must increase and end at d_sae=96"):
        nested_widths(OmegaConf.structured(SAEConfig(architecture="matryoshka_topk", matryoshka_widths=[48, 12, 96])), 96)


@pytest.mark.slow  # 18 s interpreted on a CPU: make test runs it, make test-fast leaves it out
def test_triton_kernels_equal_torchs_and_sae_lens():
    """Decoder and encoder backward on each shape, and the whole step: on the GPU compiled, else interpreted."""
    pytest.importorskip("triton")  # a dev dependency on Linux x86_64, where CI runs
    interpret = {} if torch.cuda.is_available() else {"TRITON_INTERPRET": "1"}  # compiled on a GPU, even if set here
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, **interpret}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(CHECKS)],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    # the bf16 forward check runs compiled only (the interpreter's bf16 products are wrong)
    outcome = f"{2 * len(SHAPES) + len(FUSED_SHAPES) + 3} passed" if interpret == {} else \
        f"{2 * len(SHAPES) + len(FUSED_SHAPES) + 2} passed, 1 skipped"
    assert run.returncode == 0 and outcome in run.stdout, run.stdout[-3000:] + run.stderr[-2000:]


def test_cpu_steps_run_torch_kernels():
    assert kernels_for(torch.device("cpu"), use_triton=True) is TORCH_KERNELS
    assert kernels_for(torch.device("cuda"), use_triton=False) is TORCH_KERNELS
