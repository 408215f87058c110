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

from conftest import ROOT
from sae.step import TORCH_KERNELS, kernels_for
from triton_kernel_checks import FUSED_SHAPES, SHAPES, assert_step_equals_sae_lens

CHECKS = ROOT / "tests" / "triton_kernel_checks.py"


def test_fast_topk_step_equals_sae_lens_training_pass():
    assert_step_equals_sae_lens(torch.device("cpu"), TORCH_KERNELS, tokens=256)


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
