#!/usr/bin/env bash
# One short check on a CUDA machine: the TopK step's Triton kernels against torch and sae-lens
# (tests/test_topk_step.py, compiled for the GPU), harvest and train the tiny random DeepSeek-V4 on
# the GPU, then:
# - bench-harvest-flash (a minute or two): a random DeepSeek-V4 at Flash's true shape for its first
#   4 blocks (hidden 4096, 256 experts top-6, hc_mult 4; 53.5 GB of bf16 weights drawn on the GPU),
#   harvested at 4 sites: tokens/s against the bare forward, peak GPU memory;
# - bench-train at DeepSeek-V4-Flash width (d_in 4096, 65,536 latents, k=64, batch 4096): the step
#   against sae-lens, training from the store (threaded loader, pinned batches) against memory, the
#   step against the bf16 peak, the step with the Triton kernels against torch's, the decoder alone,
#   and the store reader alone at width 4096;
# - last, and by far the longest (five SAEs x 200M samples, not yet timed on a GPU; SYNTH=0 skips it):
#   bench-synth at the published budget, Dialbox's and sae-lens's SAEs scored against SynthSAEBench-16k's
#   true features (the model is built on the GPU into $DIALBOX_CACHE the first time).
#
#   pipeline/bench/gpu_check.sh OUT_DIR
#
# Needs the project's Python packages importable and the embedded tokenizer in
# $DIALBOX_CACHE (the tiny model borrows SmolLM2's). Writes logs, metrics and the
# bench-harvest-flash, bench-train-cuda and bench-synth-cuda sections of BENCHMARKS.md into OUT_DIR.
set -euo pipefail
out=${1:?usage: gpu_check.sh OUT_DIR}
mkdir -p "$out"
export WANDB_MODE=disabled PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/gpu.txt" || true
uptime | tee -a "$out/gpu.txt"  # the host's load: the loader's threads share its CPUs
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' | tee -a "$out/gpu.txt"
python3 -c 'import triton; print("triton", triton.__version__)' 2>&1 | tail -1 | tee -a "$out/gpu.txt"
python3 -m pytest -q -x -p no:cacheprovider tests/test_topk_step.py 2>&1 | tail -4 | tee "$out/kernel-tests.log" \
  || echo "FAILED: kernel tests"

device=${DEVICE:-cuda} tokens=${TOKENS:-400000}  # DEVICE=cpu TOKENS=20000 BENCH=0 for a dry run
runs=${RUNS:-$out/runs}
time python3 -m pipeline.harvest run.runs_dir="$runs" model=tiny_deepseek_v4 model.device="$device" \
  'harvest.sites=[L1.resid_post,L2.attn_in,L3.ffn_out]' harvest.max_tokens="$tokens" harvest.batch_size=64 \
  2>&1 | tr '\r' '\n' | tail -6 | tee "$out/harvest.log" || echo "FAILED: harvest"
time python3 -m pipeline.train run.runs_dir="$runs" train.device="$device" sae.k=16 train.batch_size=4096 \
  eval.tokens=16384 2>&1 | tr '\r' '\n' | tail -4 | tee "$out/train.log" || echo "FAILED: train"
for site in "$runs"/demo/saes/*/; do cp "$site/metrics.json" "$out/metrics-$(basename "$site").json" || true; done

if [ "${BENCH:-1}" = 1 ]; then
  time python3 -m pipeline.bench.harvest_flash model.device="$device" 2>&1 | tr '\r' '\n' | tail -16 \
    | tee "$out/bench-harvest-flash.log" || echo "FAILED: bench-harvest-flash"
  cp BENCHMARKS.md "$out/BENCHMARKS.md"  # again below: this section survives a bench-train that runs out of time
  time python3 -m pipeline.bench.train --device cuda --d-in 4096 --d-sae 65536 --k 64 --batch 4096 \
    2>&1 | tail -30 | tee "$out/bench-train.log"
  cp BENCHMARKS.md "$out/BENCHMARKS.md"
  if [ "${SYNTH:-1}" = 1 ]; then
    time python3 -m pipeline.bench.synth --device "$device" --samples 200000000 --eval-samples 1000000 2>&1 \
      | tr '\r' '\n' | tail -60 | tee "$out/bench-synth.log" || echo "FAILED: bench-synth"
    cp BENCHMARKS.md "$out/BENCHMARKS.md"
  fi
fi
