"""GPU memory: how many KV cache slots fit, decided at start-up from the device's free memory.

As vLLM's --gpu_memory_utilization: the runtime may use that fraction of the GPU's total memory;
what is already in use (the weights just loaded, the CUDA context, other processes) is subtracted,
and the rest holds the KV cache (a fixed headroom is kept for activations and the logits). A cache
that cannot hold even one sequence of max_model_len fails the start-up with the numbers, not a
request later; fewer slots than --max_batch_size is a warning and a smaller batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from model_runtime.config import ModelConfig

log = logging.getLogger("model_runtime.gpu_memory")

GiB = float(1 << 30)
ACTIVATION_HEADROOM = 0.04  # of total memory: activations, logits [B, vocab], allocator slack


class GpuMemoryError(RuntimeError):
    """The model and its KV cache do not fit the GPU at this --gpu_memory_utilization."""


@dataclass(frozen=True)
class KVBudget:
    slots: int              # sequences the cache holds (the engine's max batch)
    slot_bytes: int         # one sequence of max_len, all layers, keys and values
    budget_bytes: int       # what the cache may take
    total_bytes: int
    used_bytes: int         # in use before the cache (weights, context, other processes)


def kv_slot_bytes(cfg: ModelConfig, max_len: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * max_len * elem


def size_kv_cache(cfg: ModelConfig, *, max_len: int, max_batch: int, dtype: torch.dtype, total_bytes: int,
                  free_bytes: int, utilization: float) -> KVBudget:
    """Slots that fit (<= max_batch); GpuMemoryError naming the numbers when not even one does."""
    if not 0.0 < utilization <= 1.0:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {utilization}")
    used = total_bytes - free_bytes
    budget = int(total_bytes * (utilization - ACTIVATION_HEADROOM)) - used
    slot = kv_slot_bytes(cfg, max_len, dtype)
    slots = min(max_batch, max(0, budget) // slot)
    if slots < 1:
        raise GpuMemoryError(
            f"the model does not fit: {total_bytes / GiB:.2f} GiB GPU, {used / GiB:.2f} GiB in use after loading "
            f"(weights, CUDA context, other processes), --gpu_memory_utilization {utilization} leaves "
            f"{max(budget, 0) / GiB:.2f} GiB for the KV cache, and one sequence of {max_len} tokens needs "
            f"{slot / GiB:.2f} GiB ({str(dtype).removeprefix('torch.')}). Lower --max_model_len, quantize "
            f"(--quantization int8/int4), raise --gpu_memory_utilization, or use a larger GPU.")
    if slots < max_batch:
        log.warning("KV cache: %d of %d slots fit at max_model_len %d (%.2f GiB each, %.2f GiB budget); "
                    "batch limited to %d", slots, max_batch, max_len, slot / GiB, budget / GiB, slots)
    return KVBudget(slots=int(slots), slot_bytes=slot, budget_bytes=budget, total_bytes=total_bytes,
                    used_bytes=used)


def device_memory(device: torch.device) -> tuple[int, int]:
    """(total, free) bytes of a CUDA device."""
    free, total = torch.cuda.mem_get_info(device)
    return int(total), int(free)


def used_bytes(device: torch.device) -> int:
    """GPU memory in use on the device (all processes), for /metrics; 0 off CUDA."""
    if device.type != "cuda":
        return 0
    total, free = device_memory(device)
    return total - free
