"""The CUDA path (marked `cuda`: skipped without a GPU, the reason printed; scripts/gpu_check.sh runs
them): the plan on the real GPU, every tensor on it, the CUDA kernels against the generic math, the
tiny model's greedy tokens through each backend, and the compiled decode step."""

from __future__ import annotations

import pytest
import torch

from model_runtime import build, kernels
from model_runtime.loader import load_model
from model_runtime.plan import Machine
from tests.unit.runtime.test_quant import PROMPT

pytestmark = pytest.mark.cuda


def _greedy(model, n: int) -> tuple[list[int], torch.Tensor]:
    device = model.device
    cache = model.new_cache(1, len(PROMPT) + n + 1)
    with torch.inference_mode():
        logits = model(torch.tensor([PROMPT], device=device), torch.arange(len(PROMPT), device=device)[None],
                       cache, slice(0, 1))
        first = logits[0].float().cpu()
        out = []
        for i in range(n):
            tok = int(logits[0].argmax())
            out.append(tok)
            logits = model(torch.tensor([[tok]], device=device), torch.tensor([[len(PROMPT) + i]], device=device),
                           cache, slice(0, 1))
    return out, first


def test_the_machine_probe_reads_the_gpu():
    m = Machine.probe(torch.device("cuda"))
    assert m.is_cuda and m.cuda_capability is not None and m.cuda_name
    assert m.bf16 == (m.cuda_capability >= (8, 0))


@pytest.mark.parametrize("method", ["none", "int8", "int4"])
def test_every_tensor_is_on_the_gpu_with_the_planned_dtype(tiny_qwen2_dir, method):
    loaded = load_model(tiny_qwen2_dir, quantization=method, group_size=32, device="cuda", compile=False)
    plan = loaded.plan
    assert plan is not None and plan.device.startswith("cuda")
    assert build.placement_problems(loaded.model, plan) == []
    assert all(t.is_cuda for t in [*loaded.model.parameters(), *loaded.model.buffers()])


def test_cuda_int8_kernels_match_the_generic_math():
    torch.manual_seed(0)
    w, x = torch.randn(256, 512, device="cuda"), torch.randn(4, 512, device="cuda", dtype=torch.bfloat16)
    codes, scales = kernels.quantize_int8(w)
    assert codes.is_cuda and scales.is_cuda
    ref = kernels.int8_matmul_generic(x.float(), codes, scales)
    for k in ("int8pack_mm", "dequant"):
        lin = kernels.Int8Linear(codes, scales, None, torch.bfloat16, backend="cuda-int8", int8_kernel=k)
        got = lin(x).float()
        assert (got - ref).norm() / ref.norm() < 0.02, k


def test_tinygemm_matches_the_generic_int4_math():
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("tinygemm needs sm80+ (the plan falls back to the generic path here)")
    torch.manual_seed(0)
    w, x = torch.randn(256, 512, device="cuda"), torch.randn(4, 512, device="cuda", dtype=torch.bfloat16)
    q, s, z = kernels.quantize_int4_packed(w, 128)
    ref = kernels.int4_matmul_generic(x.float(), q, s, z)
    lin = kernels.Int4Linear(q, s, z, None, torch.bfloat16, backend="cuda-int4-tinygemm")
    got = lin(x).float()
    assert lin.qweight is None and (got - ref).norm() / ref.norm() < 0.02


def test_the_compiled_one_row_int8_matmul_reads_the_int8_codes_in_one_fused_kernel():
    # the decode step's compile settings (compiled_step.py): the int8 -> bf16 conversion and the output scale
    # fused into the one-row product, not a bf16 copy of the weight written and handed to cuBLAS
    from torch._inductor.utils import run_and_get_code

    from model_runtime.compiled_step import compile_decode_step

    torch.manual_seed(0)
    w, x = torch.randn(1024, 512, device="cuda"), torch.randn(1, 512, device="cuda", dtype=torch.bfloat16)
    codes, scales = kernels.quantize_int8(w)
    lin = kernels.Int8Linear(codes, scales, None, torch.bfloat16, backend="cuda-int8", int8_kernel="dequant")
    torch._dynamo.reset()
    got, code = run_and_get_code(compile_decode_step(lin.forward, torch.device("cuda"), 1), x)
    ref = kernels.int8_matmul_generic(x.float(), codes, scales)
    assert (got.float() - ref).norm() / ref.norm() < 0.02
    assert code and "extern_kernels.mm" not in "\n".join(code)  # inductor's code, without a cuBLAS matmul


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_cuda_greedy_tokens_agree_with_the_generic_path(tiny_qwen2_dir, method):
    fast = load_model(tiny_qwen2_dir, quantization=method, group_size=32, device="cuda", compile=False)
    generic = load_model(tiny_qwen2_dir, quantization=method, group_size=32, device="cuda", compile=False,
                         kernels="generic")
    a, la = _greedy(fast.model, 8)
    b, lb = _greedy(generic.model, 8)
    assert (la - lb).norm() / lb.norm() < 0.03
    assert a[:4] == b[:4]


def test_the_compiled_decode_step_gives_the_eager_tokens(tiny_qwen2_dir):
    from model_runtime.engine import Engine, EngineConfig, SamplingParams

    loaded = load_model(tiny_qwen2_dir, quantization="int8", device="cuda", max_model_len=256)
    assert loaded.plan is not None and loaded.plan.compile
    eager, _ = _greedy(loaded.model, 8)
    from torch._dynamo.utils import counters

    counters.clear()
    engine = Engine(loaded, EngineConfig(max_batch_size=2, max_model_len=256))
    assert engine.compiled
    engine.start()
    try:
        import asyncio

        async def run() -> list[int]:
            out = []
            async for ev in engine.generate(PROMPT, SamplingParams(max_tokens=8, temperature=0.0), "r1"):
                if ev.token_id is not None:
                    out.append(ev.token_id)
            return out

        tokens = asyncio.run(run())
    finally:
        engine.stop()
    assert tokens == eager
    # the steps replayed CUDA graphs: inductor counts each graph it declined to record (mutated inputs, CPU
    # tensors, ...), and a declined graph runs op by op, several times slower at batch 1
    assert counters["inductor"]["cudagraph_skips"] == 0


def test_a_cache_that_does_not_fit_fails_at_start_up(tiny_qwen2_dir):
    from model_runtime.engine import Engine, EngineConfig
    from model_runtime.gpu_memory import GpuMemoryError

    loaded = load_model(tiny_qwen2_dir, device="cuda", compile=False)
    free, total = torch.cuda.mem_get_info()
    util = (total - free) / total + 0.001  # nothing left for the cache
    with pytest.raises(GpuMemoryError, match="does not fit"):
        Engine(loaded, EngineConfig(max_batch_size=2, max_model_len=512, gpu_memory_utilization=util))
