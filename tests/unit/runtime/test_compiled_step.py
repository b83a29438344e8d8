"""compiled_step.py off a GPU: the CPU's compile leaves inductor's global tuning alone (coordinate-descent tuning
autotunes every generated kernel: minutes of start-up a CPU decode step would pay for nothing); the CUDA settings
are checked on a GPU (test_cuda.py: graphs recorded, the one-row int8 product fused)."""

from __future__ import annotations

import torch
import torch._inductor.config as inductor

from model_runtime.compiled_step import compile_decode_step


def test_the_cpu_decode_step_is_compiled_with_dynamic_shapes_and_no_kernel_tuning():
    before = inductor.coordinate_descent_tuning
    fn = compile_decode_step(lambda x: x * 2, torch.device("cpu"), 4)
    assert callable(fn) and inductor.coordinate_descent_tuning == before
