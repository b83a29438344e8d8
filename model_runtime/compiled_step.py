"""The decode step under torch.compile: one place that says how it is compiled, for the engine and the GPU bench.

CUDA: static shapes per (batch size, KV-length bucket), each recorded as a CUDA graph (mode
"reduce-overhead"), so a step has no per-op launch overhead, and inductor's coordinate-descent tuning
on: with it, a matmul of one activation row is decomposed into a multiply-and-sum that inductor fuses
with what feeds it, so an int8 weight's conversion to the activation dtype happens in registers
(gpt-fast's setting). Without it the one-row matmul stays cuBLAS's and the conversion writes a float
copy of every int8 weight each step: on an H200 the int8 step (1.5B shape, batch 1) took 3.08 ms,
slower than bf16's 1.87 ms (bench/RESULTS.md, session 18). Elsewhere: dynamic shapes, no graphs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def compile_decode_step(forward: Callable[..., Any], device: torch.device, max_batch_size: int) -> Callable[..., Any]:
    """`forward` compiled as the decode step runs on `device` (see the module docstring)."""
    if device.type != "cuda":
        return torch.compile(forward, dynamic=True)
    import torch._dynamo as dynamo
    import torch._inductor.config as inductor

    # one graph per (batch size, kv bucket): allow them all
    dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 4 * max_batch_size * 16)
    inductor.coordinate_descent_tuning = True
    return torch.compile(forward, mode="reduce-overhead", dynamic=False)
