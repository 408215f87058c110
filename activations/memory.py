"""Will the model fit? A start-up check of the memory a load needs against what this machine has.

The weights are counted exactly: the model, truncated to the blocks the stage needs, is built on
the meta device (shapes and dtypes, no storage) and its parameters and buffers summed at their own
dtypes (modules transformers keeps in float32 count 4 bytes). To that comes a headroom for the
activations of the running block, the allocator's fragmentation and a CUDA context per GPU. The
budget is the free memory of the devices the weights go to: every visible GPU for a device_map,
one GPU for model.device=cuda, the RAM otherwise. Loading DeepSeek-V4-Flash takes many minutes;
this says in a second, with the numbers, when it cannot succeed.

`DIALBOX_MEMORY_CHECK=0` skips the check (e.g. to let accelerate offload to the CPU on purpose).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import psutil
import torch
from accelerate import init_empty_weights
from transformers import AutoModelForCausalLM
from activations.errors import DialboxError

HEADROOM = 0.10  # of the weights: activations of one block at a time, allocator fragmentation
PER_GPU = 2**30  # CUDA context and cuBLAS workspaces
GB = 1e9


class MemoryShortError(DialboxError, ValueError):
    """The model cannot fit in the memory of this machine."""


@dataclass
class Need:
    params: int
    weight_bytes: int
    devices: int  # GPUs the weights are spread over (0: RAM)

    @property
    def total(self) -> int:
        return int(self.weight_bytes * (1 + HEADROOM)) + self.devices * PER_GPU


def count_weights(config, dtype: torch.dtype, trust_remote_code: bool = False) -> tuple[int, int]:
    """(parameters, bytes) of the model `from_config(config)` builds in `dtype`, without allocating it."""
    with init_empty_weights(include_buffers=True):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    return model_size(model)


def model_size(model) -> tuple[int, int]:
    """(parameters, bytes) of a model's parameters and buffers, each at its own dtype."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() for t in tensors), sum(t.numel() * t.element_size() for t in tensors)


def free_memory(device_map: str, device: torch.device) -> tuple[list[int], bool]:
    """Free bytes of each device the weights will go to, and whether they are GPUs (else the RAM)."""
    if device_map and torch.cuda.is_available():
        return [torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())], True
    if device.type == "cuda":
        return [torch.cuda.mem_get_info(device)[0]], True
    return [psutil.virtual_memory().available], False


def check_memory(name: str, config, dtype: torch.dtype, device_map: str, device: torch.device,
                 trust_remote_code: bool = False) -> Need:
    """Raise MemoryShortError (one line, with the numbers) when the model built from `config` cannot fit."""
    free, gpus = free_memory(device_map, device)
    params, weight_bytes = count_weights(config, dtype, trust_remote_code)
    need = Need(params, weight_bytes, len(free) if gpus else 0)
    if os.environ.get("DIALBOX_MEMORY_CHECK") == "0" or need.total <= sum(free):
        return need
    blocks, total = config.num_hidden_layers, getattr(config, "dialbox_total_layers", config.num_hidden_layers)
    what = f"{name} up to layer {blocks - 1} ({blocks} of {total} blocks, " if blocks < total else f"{name} ("
    where = "this machine's RAM has"
    if gpus:
        where = f"the {len(free)} GPUs here have" if len(free) > 1 else "the 1 GPU here has"
    raise MemoryShortError(
        f"{what}{params / 1e9:.3g}B parameters) needs about {need.total / GB:.0f} GB in "
        f"{str(dtype).removeprefix('torch.')} ({weight_bytes / GB:.0f} GB of weights, "
        f"{(need.total - weight_bytes) / GB:.0f} GB of headroom) but {where} {sum(free) / GB:.0f} GB free: "
        "use more GPUs, harvest shallower sites, or set DIALBOX_MEMORY_CHECK=0 to try anyway"
    )
