"""The one skip the CPU-kernel tests share: a CPU without the kernels' instruction set (AVX2/FMA/F16C on x86-64
Linux). Where the CPU has it the kernels must build and load (the project's machines and CI have a C compiler),
so a build failure fails these tests instead of skipping them."""

from __future__ import annotations

import pytest

from model_runtime import ckernels

needs_cpu_kernels = pytest.mark.skipif(
    not ckernels.cpu_supported(), reason="the CPU kernels need an x86-64 Linux CPU with AVX2, FMA and F16C")
