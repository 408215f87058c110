"""Typed configs for every stage, registered with Hydra's ConfigStore.

The YAML files in conf/ pick among these (one group per choice: `model=`, `data=`);
every field has a default so a bare `python -m pipeline.harvest` runs the demo. A field whose
values are a fixed set is an Enum: a typo fails when the config is composed, naming the choices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from activations.config import DataConfig, ModelConfig, RunConfig, StoreConfig
from activations.sites import SiteKind
from steering.limits import ServerLimits


class Architecture(StrEnum):
    """sae-lens's training classes (matryoshka_topk is its TopK, trained with nested losses: sae/step.py)."""

    topk = "topk"
    batchtopk = "batchtopk"
    jumprelu = "jumprelu"
    relu_l1 = "relu_l1"
    matryoshka = "matryoshka"
    matryoshka_topk = "matryoshka_topk"


class WandbMode(StrEnum):
    offline = "offline"
    online = "online"
    disabled = "disabled"


class Parallel(StrEnum):
    data = "data"  # every rank trains every SAE on its share of each batch
    site = "site"  # each rank trains its own sites


class ExplainerKind(StrEnum):
    heuristic = "heuristic"  # token counts, no LLM
    local = "local"  # a transformers model in this process
    openai = "openai"  # any OpenAI-compatible chat endpoint


class VectorOperation(StrEnum):
    add = "add"  # h += s * v
    project = "project"  # ds4's h -= s * v (v . h)


class ContrastWhere(StrEnum):
    last = "last"  # the last prompt token, as ds4 does
    mean = "mean"  # the mean over the prompt's tokens


class ExportFormat(StrEnum):
    native = "native"  # safetensors + JSON
    ds4 = "ds4"  # headerless float32 + sidecar
    gguf = "gguf"  # llama.cpp control vector


class Positions(StrEnum):
    all = "all"
    prompt = "prompt"
    generated = "generated"


class Concept(StrEnum):
    length = "length"  # shorter answers = more of it
    keywords = "keywords"  # any of the keywords present
    feature = "feature"  # the target feature's activation on the answer


@dataclass
class HarvestConfig:
    sites: list = field(default_factory=lambda: ["L15.resid_post"])  # L<layer>.<kind>, kinds as in README
    # Stop after the context windows that hold this many tokens, counted over all writers (0 = the whole
    # corpus). Windows are whole, and special-token rows (BOS) are not stored: 1024 at context 64 stores 1008 rows.
    max_tokens: int = 200_000
    batch_size: int = 16  # context windows per forward
    rank: int = 0  # this writer's index: it takes windows w with w % world_size == rank
    world_size: int = 1  # writers harvesting the same store (each its own shard)
    # Windows in flight between the forward and the background writer.
    queue_batches: int = 4
    # Store each token's routed experts (ids int16 + gate weights bf16, 4 B x top_k per layer; 24 B on
    # DeepSeek-V4-Flash) for every MoE layer up to the deepest site's layer. Mixture-of-experts models only.
    router: bool = False
    # The MoE layers whose routing to store (hash-routed layers too, marked as such); non-empty overrides `router`.
    router_layers: list = field(default_factory=list)


@dataclass
class HarvestJob:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    store: StoreConfig = field(default_factory=StoreConfig)
    harvest: HarvestConfig = field(default_factory=HarvestConfig)


@dataclass
class SAEConfig:
    # Which of sae-lens's training classes.
    architecture: Architecture = Architecture.topk
    expansion_factor: int = 16  # latents per input dimension (d_sae = expansion_factor * d_in)
    d_sae: int = 0  # absolute number of latents; overrides expansion_factor when > 0
    k: int = 32  # active latents per token (topk, batchtopk, matryoshka, matryoshka_topk)
    # AuxK dead-latent loss weight for the TopK family (sae-lens's default; OpenAI and sparsify use
    # 1/32, which left 28% of SmolLM2's latents dead after 2M tokens against 2% with 1.0); 0 = off.
    aux_loss_coefficient: float = 1.0
    l1_coefficient: float = 5.0  # relu_l1
    l0_coefficient: float = 1.0  # jumprelu
    jumprelu_init_threshold: float = 0.01  # jumprelu: starting threshold of every latent
    jumprelu_bandwidth: float = 0.05  # jumprelu: width of the straight-through estimator's kernel
    # Nested dictionary sizes for matryoshka and matryoshka_topk; empty = d_sae/8, d_sae/4, d_sae/2, d_sae.
    matryoshka_widths: list = field(default_factory=list)
    # matryoshka_topk: each inner level's loss weighs balance ** (its depth below the whole dictionary),
    # Chanin et al. 2025's balanced Matryoshka. 1 is Matryoshka's plain sum; below 1 the whole dictionary's
    # loss pulls the inner latents back off the child features they hedge with. On SynthSAEBench-16k (1M
    # samples) 0.5 gave F1 / MCC 0.400 / 0.460 against 0.366 / 0.439 at 1 (docs/guide.md).
    matryoshka_balance: float = 0.5
    # Norm of each decoder row (and, as encoder = decoder^T, encoder column) at initialisation;
    # 0 = 1.0 for the TopK family, 0.1 (sae-lens's) for the others (see sae/architectures.py).
    decoder_init_norm: float = 0.0
    # Adam learning rate; 0 = 8e-4 / sqrt(d_sae / 16384): four times sparsify's rule, which on
    # SmolLM2 L15 reached FVU 0.13 in 2M tokens where sparsify's rate reached 0.20.
    lr: float = 0.0


@dataclass
class EvalConfig:
    # Held-out windows (after those harvested) run through the model with the SAE spliced in.
    tokens: int = 8192
    batch_size: int = 8  # windows per forward
    ce: bool = True  # ce_loss_recovered and kl_div need the model; off for a quick run
    # JSON-lines files of held-out text, packed like the harvest's corpus. Empty: the windows right
    # after the harvested ones, which are found by tokenizing the harvested part again (slow for
    # a billion-token hub harvest: give files here instead).
    paths: list = field(default_factory=list)


@dataclass
class WandbConfig:
    project: str = "dialbox"  # wandb project name
    # offline | online | disabled; the WANDB_MODE environment variable wins.
    mode: WandbMode = WandbMode.offline


@dataclass
class TrainConfig:
    sites: list = field(default_factory=list)  # empty = every site in the store
    tokens: int = 0  # tokens per SAE; 0 = one pass over the store
    batch_size: int = 4096  # tokens per step
    seed: int = 0  # data order
    device: str = "cpu"  # cpu | cuda | auto
    lr_warmup_steps: int = 50  # linear warm-up of the learning rate
    lr_decay_fraction: float = 0.2  # decay linearly to 0 over the last part of training
    shuffle_chunks: int = 8  # chunks mixed in the shuffle buffer
    # Threads reading shuffle windows ahead of the step (chunk reads and row shuffles release the GIL).
    loader_workers: int = 2
    # Scale activations to mean norm sqrt(d_in) during training (folded into the saved weights).
    normalize: bool = True
    # Leave out of training, and of the spliced evaluation, tokens whose norm exceeds this multiple
    # of the site's mean norm. The default drops "massive activation" attention-sink tokens (0.03%
    # of SmolLM2's tokens, 95% of its L15 variance), which no dictionary should spend latents on; 0 = keep all.
    outlier_norm: float = 10.0
    # Run the TopK encoder matmul in bf16; the rest stays float32. None = where the device has bf16 units
    # (a GPU's tensor cores, a CPU's AVX512-BF16 or AMX): elsewhere torch emulates bf16 about 100x slower than float32.
    bf16_encoder: Optional[bool] = None
    # On CUDA, with triton installed, run the TopK decoder and the encoder's backward with the
    # Triton kernels of sae/triton_topk.py (over the k active latents only), and the encoder forward
    # fused with its top k (sae/triton_encode.py) where that times faster; false = torch's
    # embedding_bag and a dense encoder, which CPU always uses.
    triton_kernels: bool = True
    # A latent is dead (and AuxK trains it) when it has not fired in this many tokens. 0 = a tenth of the
    # training tokens, at most 10M, and for TopK SAEs at most 200 x d_sae / k (sae/trainer.py, dead_window).
    dead_tokens: int = 0
    log_every: int = 25  # steps between wandb logs and progress-bar updates
    checkpoint_every: int = 100  # steps
    # Under torchrun: `data` (all ranks train every SAE on their share of each batch) or
    # `site` (each rank trains its own sites).
    parallel: Parallel = Parallel.data
    # Train on the committed rows of a store that is still being written.
    allow_partial_store: bool = False
    # Extra SAEs trained on the same batches: a list of SAEConfig overrides, e.g. [{k: 16}, {k: 64}].
    sweep: list = field(default_factory=list)


@dataclass
class TrainJob:
    run: RunConfig = field(default_factory=RunConfig)
    sae: SAEConfig = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class ExplainerConfig:
    # heuristic (token counts, no LLM) | local (a transformers model in this process) |
    # openai (any OpenAI-compatible chat endpoint: vLLM, SGLang, ds4-server, a hosted API)
    kind: ExplainerKind = ExplainerKind.heuristic
    # openai: the endpoint, the model it serves, and the NAME of the environment variable holding
    # the API key (the key itself never goes into a config, a log or the cache).
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = ""  # the model name the endpoint serves
    api_key_env: str = "OPENAI_API_KEY"  # the variable's name, not the key
    concurrency: int = 8  # requests in flight
    retries: int = 3  # per request, with exponential backoff
    backoff_s: float = 1.0  # first retry after this, then doubling
    timeout_s: float = 120.0  # per request
    # local: a hub id or directory; empty = the run's own model (DeepSeek-V4-Flash labels its own features).
    local_path: str = ""
    # Live features the LLM labels (a seeded random sample); the rest get heuristic labels, shown
    # as such. 0 = all.
    max_features: int = 0
    max_tokens: int = 40  # length of an explanation


@dataclass
class LabelConfig:
    sites: list = field(default_factory=list)  # empty = every site with a trained SAE
    # Label only features [start, stop) of each site (a slice of a split job); empty = all.
    features: list = field(default_factory=list)
    device: str = "cpu"  # cpu | cuda | auto
    context_tokens: int = 32  # store rows per example context
    top_examples: int = 20  # top-activating contexts kept per feature
    sampled_examples: int = 40  # uniform sample of activating contexts, split into quantiles
    quantiles: int = 4  # activation quantiles the sampled contexts are grouped into
    pool_blocks: int = 256  # random contexts checked for every feature (non-activating examples)
    random_examples: int = 10  # non-activating contexts kept per feature (negatives for detection)
    explain_top: int = 8  # top contexts shown to the explainer (the rest are for scoring)
    explain_per_quantile: int = 2  # contexts of each quantile shown to the explainer
    score_examples: int = 10  # activating and non-activating examples per scorer
    batch_tokens: int = 4096  # rows per SAE encode while mining
    max_tokens: int = 0  # mine the first rows of the store only (0 = all)
    # Rows above this multiple of the site's mean norm count as not firing (attention sinks, as in training).
    outlier_norm: float = 10.0
    logit_tokens: int = 10  # promoted and suppressed tokens of the logit lens
    neighbours: int = 8  # nearest features by decoder cosine
    seed: int = 0  # context sampling and the LLM's feature sample
    checkpoint_seconds: float = 180.0  # mining state saved this often (a killed pass resumes)
    # Score every live feature's output effect: adding its direction, how much more likely are the
    # tokens it promotes (features/output_score.py)? Needs the whole model: off for a huge one if memory is short.
    output_score: bool = True
    output_contexts: int = 2  # stretches of the stored corpus the output score is measured on
    output_context_tokens: int = 16  # tokens per stretch (after a BOS)
    output_strength: float = 0.5  # the push, in units of the site's mean row norm
    # Mixture-of-experts stores with routing (harvest.router): count each feature's experts at this many routed
    # layers from the site's on (0 = off); features.parquet and experts.parquet get the lifts (features/experts.py).
    expert_layers: int = 2
    top_experts: int = 8  # experts kept per feature, by the lift's lower confidence bound
    expert_features: int = 16  # features kept per expert in experts.parquet


@dataclass
class LabelJob:
    run: RunConfig = field(default_factory=RunConfig)
    label: LabelConfig = field(default_factory=LabelConfig)
    explainer: ExplainerConfig = MISSING


@dataclass
class ReportConfig:
    sites: list = field(default_factory=list)  # empty = every site in runs/<run>/features
    # Features per data file: opening a feature page fetches the one file that holds it.
    chunk_size: int = 128
    # Top tokens per feature in the site's index (shown in the table and searched).
    index_top_tokens: int = 5


@dataclass
class BrowseConfig:
    host: str = "127.0.0.1"  # 0.0.0.0 exposes the report to the network
    port: int = 8765  # make browse ARGS='browse.port=9000'
    # Serve the steering API beside the report (the feature pages' Steer panel) when the run's model
    # loads; false serves the static report alone.
    model: bool = True
    max_tokens: int = 128  # the Steer panel's ceiling on max tokens per continuation
    # Host names to answer to beyond 127.0.0.1, localhost, ::1 and browse.host (a reverse proxy's name);
    # any other Host is refused, against DNS rebinding.
    allowed_hosts: list = field(default_factory=list)


@dataclass
class ReportJob:
    run: RunConfig = field(default_factory=RunConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    browse: BrowseConfig = field(default_factory=BrowseConfig)


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="harvest_schema", node=HarvestJob)
    cs.store(name="train_schema", node=TrainJob)
    cs.store(name="label_schema", node=LabelJob)
    cs.store(name="report_schema", node=ReportJob)
    cs.store(name="steer_schema", node=SteerJob)
    cs.store(name="serve_schema", node=ServeJob)


def compose(stage: str, overrides: list[str], hydra: bool = False):
    """The config `python -m pipeline.<stage> <overrides>` would see, for scripts and tests (with Hydra's own
    settings under `hydra` when asked)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    register_configs()
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base=None):
        return hydra_compose(stage, overrides, return_hydra_config=hydra)


# --- steering ------------------------------------------------------------------------------


@dataclass
class SteerConfig:
    """`python -m pipeline.steer`: one prompt, unsteered and steered side by side."""

    prompt: str = "Tell me about your favourite food."  # sent as a user message when chat applies
    # Interventions, each a string "<feature ID or vector> key=value ..." or a dict with the same keys:
    # op (add | clamp | project), scale, units (max_act | norm | raw | fraction), positions (all | prompt |
    # generated), layers, when (a condition: when=L12.resid_post/88>2.5). A feature without a scale takes its
    # make steer-features setting, else add 0.25 x the site's mean norm (docs/guide.md, section 7).
    # e.g. ["L15.resid_post/1234 scale=4", "terse layers=[12] scale=2"]
    interventions: list = field(default_factory=list)
    max_new_tokens: int = 64  # tokens generated per continuation
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # nucleus sampling (when temperature > 0)
    seed: int = 0  # sampling seed; both continuations use it
    chat: Optional[bool] = None  # apply the chat template; None = when the tokenizer has one
    # Rows of the store that give each feature's max activation when there is no feature table yet.
    max_act_rows: int = 16384
    width: int = 60  # characters per column of the side-by-side print


@dataclass
class ContrastConfig:
    """`python -m pipeline.steer contrast`: a named vector from prompts with and without a suffix."""

    name: str = "terse"  # the vector is saved as runs/<run>/vectors/<name>.safetensors + .json
    # The same prompts with (positive) and without (negative) the suffix ...
    prompts: str = "contrast.txt"  # a file, or the name of a prompt set in steering/prompts/
    suffix: str = "Respond tersely."  # appended (after a space) to make the positive prompts
    # ... or two files of prompts, one a line (used when both are given).
    positive_file: str = ""
    negative_file: str = ""  # see positive_file
    site_kind: SiteKind = SiteKind.resid_post  # where the rows are read: ffn_out or attn_out for a ds4 export
    layers: list = field(default_factory=list)  # empty = every layer
    where: ContrastWhere = ContrastWhere.last  # last (the last prompt token, as ds4 does) | mean (over the prompt's tokens)
    orthogonalize: bool = False  # remove the component along the negative mean
    operation: VectorOperation = VectorOperation.add  # add (h += s*v) | project (ds4's h -= s*v(v.h); stored as unit rows)
    chat: Optional[bool] = None  # apply the chat template; None = when the tokenizer has one
    top_features: int = 10  # features of the run's SAEs listed per vector site (0 = none)


@dataclass
class ExportConfig:
    """`python -m pipeline.steer export`: a vector (or a feature's decoder row) in another format."""

    vector: str = ""  # a vector name in runs/<run>/vectors
    feature: str = ""  # or a feature ID, saved first as a vector named after it
    operation: VectorOperation = VectorOperation.add  # for a feature: add | project
    format: ExportFormat = ExportFormat.native  # native (safetensors + JSON) | ds4 (.f32 + sidecar) | gguf (llama.cpp control vector)
    out_dir: str = ""  # empty = runs/<run>/vectors/exports
    # Or expert routes (e.g. ["route L5/E37 bias=2", "route L7/E3 off"]), exported as a per-layer x expert bias
    # table (safetensors + JSON, steering/routing.py); mixture-of-experts models only.
    routes: list = field(default_factory=list)
    name: str = "routes"  # the file stem of an export of routes


@dataclass
class ProjectConfig:
    """`python -m pipeline.steer project`: the SAE features a vector or a feature points along."""

    target: str = ""  # a vector name or a feature ID
    sae_site: str = ""  # the SAE whose features to list; empty = the SAE at the target's site
    layer: Optional[int] = None  # for a vector with several layers: which one (None = each)
    top: int = 10  # features listed per direction


@dataclass
class JudgeConfig:
    # An OpenAI-compatible chat endpoint rating concept, relevance and fluency 0-2 (AxBench's scale);
    # empty base_url = measurable proxies instead.
    base_url: str = ""
    model: str = ""  # the model name the endpoint serves
    api_key_env: str = "OPENAI_API_KEY"  # the NAME of the variable holding the key
    concurrency: int = 4  # requests in flight
    max_tokens: int = 8  # of each rating reply (one digit is asked for)


@dataclass
class SteerEvalConfig:
    """`python -m pipeline.steer eval`: a steering target swept on a dev split, reported on a test split."""

    # What to evaluate: the contrast vector (built from the contrast section when missing) or a feature ID.
    target: str = "terse"
    # Held-out instructions, one a line (never used to build vectors): a file, or a name in steering/prompts/.
    prompts: str = "heldout.txt"
    dev_prompts: int = 16  # the first ones after a seeded shuffle; the rest are the test split
    # The concept: length (shorter answers = more of it), keywords (any of `keywords` present) or
    # feature (the target feature's activation on the answer, in units of its max activation).
    concept: Concept = Concept.length
    keywords: list = field(default_factory=list)  # for concept=keywords (case-insensitive)
    concept_description: str = "a terse, brief answer"  # for the judge
    layers: list = field(default_factory=lambda: [13, 15, 17])  # the sweep (ignored for a feature: its own layer)
    scales: list = field(default_factory=lambda: [1.0, 2.0, 3.0])  # the sweep's scales (the vector's units)
    positions: Positions = Positions.all  # where the steering acts: all | prompt | generated
    # The prompting baseline: each prompt with this suffix, no steering (empty = contrast.suffix).
    baseline_suffix: str = ""
    max_new_tokens: int = 200  # per answer, greedy
    batch_size: int = 16  # prompts per generate (left-padded) and per scoring forward
    bootstrap: int = 2000  # resamples for the 95% intervals
    seed: int = 0  # the dev/test shuffle, the random control direction and the bootstrap
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    write_benchmarks: bool = False  # put the report in BENCHMARKS.md (make steer-eval does)


@dataclass
class DialTuningConfig:
    """How make steer-features trains a feature's tuned dial (steering/dials.py)."""

    steps: int = 24  # optimiser steps, alternating +v and -v; 0 = decoder dials only
    lr: float = 0.05  # Adam's rate, x the starting vector's norm
    beta: float = 4.0  # the preference loss' sharpness on the mean log-likelihood margin
    nll: float = 1.0  # weight of the positives' negative log-likelihood under +v
    kl: float = 1.0  # weight of the KL divergence from the unsteered model along the negatives under +v
    max_pairs: int = 16  # preference pairs (spread over the dev prompts)
    samples: int = 4  # answers sampled per dev prompt under the decoder dial and under the prompt baseline ...
    temperature: float = 1.0  # ... at this temperature, as more candidates for positives
    # Where the dial acts, in training and after: the request's positions (prompt: the model reads the dial as
    # something it was asked and writes its answer unsteered; on the demo SAE more dials steered visibly
    # within the perplexity limit, docs/guide.md) or all of them (each generated token pushed too)
    positions: Positions = Positions.prompt
    scales: list = field(default_factory=lambda: [0.5, 1.0, 2.0])  # the trained vector's sweep on dev prompts


@dataclass
class SteerFeaturesConfig:
    """`python -m pipeline.steer features` (make steer-features): which features steer, how and how strongly."""

    site: str = ""  # the SAE's site; empty = the first labelled one
    n: int = 64  # live labelled features sampled (seeded) ...
    features: list = field(default_factory=list)  # ... plus these (feature IDs or indices at the site) ...
    top: int = 0  # ... plus the live labelled features that `predictor` ranks highest
    predictor: str = "output_score"  # a predictor column of features.parquet (make label) for `top`
    prompts: str = "neutral.txt"  # neutral prompts, one a line: a file, or a name in steering/prompts/
    dev_prompts: int = 8  # the first ones after a seeded shuffle choose the setting ...
    test_prompts: int = 32  # ... and the next ones report it
    # The sweep: add in units of the site's mean row norm, clamp in units of the feature's max activation,
    # around where the demo SAE's answers cross 2x the unsteered perplexity (add 0.25 -> 1.4x, 0.5 -> 3.8x;
    # clamp 4 -> 3.7x): the Eiffel study's best, half the norm, is past it on SmolLM2.
    add_scales: list = field(default_factory=lambda: [0.15, 0.25, 0.4])
    clamp_scales: list = field(default_factory=lambda: [2.0, 4.0])  # clamp targets, x the feature's max activation
    # add on the prompt's positions only, x mean row norm: the answer is then written unsteered, attending to a
    # steered request, so it takes a stronger push ([] leaves these settings out)
    prompt_scales: list = field(default_factory=lambda: [0.5, 1.0])
    max_new_tokens: int = 32  # per answer, greedy
    # answers generated together (every setting of the sweep shares batches) and read per scoring forward
    batch_size: int = 48
    max_ppl_ratio: float = 2.0  # a feature steers only if its perplexity is at most this times unsteered ...
    # ... and at most this share of its answers' 4-grams repeat an earlier one: a loop ("1111...") reads as
    # likely to the model, so perplexity alone lets it through (unsteered answers repeat about 0.01)
    max_repeats: float = 0.2
    # The concept is present in an answer when the feature fires on one of its tokens at this fraction of its
    # max activation (docs/guide.md, "Which features steer, and their dials") ...
    presence: float = 0.25
    # ... and a dial steers visibly when the share of test answers with it rises this much over unsteered and
    # over the random control, within max_ppl_ratio and max_repeats
    min_presence_gain: float = 0.25
    tune: DialTuningConfig = field(default_factory=DialTuningConfig)  # the tuned dial (steering/dials.py)
    bootstrap: int = 1000  # resamples for the 95% intervals
    seed: int = 0  # the feature sample, the dev/test split, the random controls and the bootstrap
    # An OpenAI-compatible endpoint that also rates the test answers (AxBench's 0-2 concept, relevance, fluency).
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    write_benchmarks: bool = False  # put the summary in BENCHMARKS.md (make steer-features does)


@dataclass
class SteerJob:
    run: RunConfig = field(default_factory=RunConfig)
    # None: the model the run was harvested with.
    model: Optional[ModelConfig] = None
    steer: SteerConfig = field(default_factory=SteerConfig)
    contrast: ContrastConfig = field(default_factory=ContrastConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    project: ProjectConfig = field(default_factory=ProjectConfig)
    eval: SteerEvalConfig = field(default_factory=SteerEvalConfig)
    steer_features: SteerFeaturesConfig = field(default_factory=SteerFeaturesConfig)


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"  # loopback only unless asked: the server runs code paths on request
    port: int = 8000  # 0 = any free port
    max_tokens: int = 256  # default and ceiling of a request's max_tokens
    # Interventions applied to every request before its own `steering` list (as llama.cpp's start-up vectors).
    steering: list = field(default_factory=list)
    max_act_rows: int = 16384  # store rows giving max activations when there is no feature table yet
    # Host names to answer to beyond 127.0.0.1, localhost, ::1 and serve.host (a reverse proxy's name);
    # any other Host is refused, against DNS rebinding.
    allowed_hosts: list = field(default_factory=list)
    limits: ServerLimits = field(default_factory=ServerLimits)  # what one request may cost (steering/limits.py)


@dataclass
class ServeJob:
    run: RunConfig = field(default_factory=RunConfig)
    model: Optional[ModelConfig] = None  # None: the model the run was harvested with
    serve: ServeConfig = field(default_factory=ServeConfig)
