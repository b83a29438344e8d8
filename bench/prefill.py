"""Time to first token on a long prompt: ours (the engine in-process) vs llama.cpp (in-process).

Both read the first PROMPT_TOKENS tokens of the fixed perplexity text (bench/ppl_text.py, tokenized by
each engine's own tokenizer of the same Qwen2 vocabulary) and produce one greedy token; TTFT is the
time from submitting the prompt to that token, so it is the prompt's prefill plus one head. Ours runs
the runtime's Engine (its chunked prefill, the KernelPlan's prefill kernel) without HTTP, as llama.cpp
runs without a server (bench/peers.py measures its decode the same way). Each timed run changes the
prompt's first token, so neither engine's prefix reuse can serve it; one warm-up run first.
Each function runs inside a bench.steps subprocess.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from typing import Any

PROMPT_TOKENS = 1000


def _summary(times: list[float], n_tokens: int) -> dict[str, Any]:
    med = statistics.median(times)
    return {"prompt_tokens": n_tokens, "ttft_s": round(med, 4), "ttft_s_runs": [round(t, 4) for t in times],
            "prefill_tok_s": round(n_tokens / med, 1)}


def _variant(ids: list[int], run: int) -> list[int]:
    """The prompt with its first token changed per run (no prefix cache hit; same length and cost)."""
    return [ids[0] + run + 1, *ids[1:]]


def ours_ttft(model_dir: str, quantization: str, *, prefill_kernel: str | None = None,
              prompt_tokens: int = PROMPT_TOKENS, repeats: int = 3, threads: int = 2) -> dict[str, Any]:
    """prefill_kernel: DISTILLERY_PREFILL for this load ("none": every prompt row on the decode kernels,
    the path of before); None: the plan's choice for this CPU."""

    from bench.ppl_text import PPL_TEXT
    from model_runtime.engine import Engine, EngineConfig, SamplingParams, TokenEvent
    from model_runtime.loader import load_model

    if prefill_kernel is not None:
        os.environ["DISTILLERY_PREFILL"] = prefill_kernel
    # no torch.set_num_threads here: it would start an OpenMP pool on this thread beside the engine's and slow
    # every forward as in no server (model_runtime/omp_pool.py); the step's OMP_NUM_THREADS pins `threads`
    del threads
    loaded = load_model(model_dir, quantization=quantization, device="cpu", max_model_len=prompt_tokens + 64)
    ids = loaded.tokenizer(PPL_TEXT)["input_ids"][:prompt_tokens]
    engine = Engine(loaded, EngineConfig(max_batch_size=1, max_model_len=prompt_tokens + 64))
    engine.start()
    try:
        def once(run: int) -> float:
            done = threading.Event()
            first: list[float] = []

            def deliver(event: TokenEvent) -> None:
                if not first:
                    first.append(time.perf_counter())
                if event.finish_reason is not None:
                    done.set()

            start = time.perf_counter()
            engine.submit(_variant(ids, run), SamplingParams(max_tokens=1, temperature=0.0), f"ttft-{run}", deliver)
            if not done.wait(600):
                raise TimeoutError("no first token in 600 s")
            return first[0] - start

        once(0)  # warm-up
        times = [once(r + 1) for r in range(repeats)]
    finally:
        engine.stop()
    plan = loaded.plan.describe() if loaded.plan is not None else {}
    return {"engine": "ours", "mode": quantization, **_summary(times, len(ids)),
            "kernel_plan": {k: plan.get(k) for k in ("backend", "lm_head_backend", "prefill_kernel",
                                                     "prefill_min_rows", "act_dtype")}}


def llamacpp_ttft(gguf: str, *, prompt_tokens: int = PROMPT_TOKENS, repeats: int = 3,
                  threads: int = 2) -> dict[str, Any]:
    import llama_cpp

    from bench.ppl_text import PPL_TEXT

    llm = llama_cpp.Llama(model_path=gguf, n_threads=threads, n_threads_batch=threads,
                          n_ctx=prompt_tokens + 64, verbose=False)
    ids = llm.tokenize(PPL_TEXT.encode(), add_bos=False, special=False)[:prompt_tokens]

    def once(run: int) -> float:
        llm.reset()  # as bench/peers.py: the KV of an earlier run is discarded, the prompt re-evaluated
        start = time.perf_counter()
        for _tok in llm.generate(_variant(ids, run), temp=0.0, top_k=1, reset=True):
            return time.perf_counter() - start
        raise RuntimeError("llama.cpp generated nothing")

    once(0)
    times = [once(r + 1) for r in range(repeats)]
    return {"engine": "llama.cpp", "version": getattr(llama_cpp, "__version__", "?"), **_summary(times, len(ids)),
            "n_batch": llm.n_batch}


def _shape_row(name: str, n: int, k: int, m: int, kernel: str, kernel4: str, repeats: int) -> dict[str, Any]:
    """kernel / kernel4: the plan's choice for int8 / int4 weights on this CPU"""
    import torch

    from bench.kernels import _median_ms
    from model_runtime import ckernels, prefill
    from model_runtime.kernels import Int4Linear, quantize_int4_packed, quantize_int8

    w = torch.randn(n, k) * 0.02
    x = torch.randn(m, k)
    codes, scales = quantize_int8(w)
    s32 = scales.float()
    lin4 = Int4Linear(*quantize_int4_packed(w, 128), None, torch.float32, backend="dq")
    packed, s4, z4 = lin4._packed, lin4._dq_scales, lin4._dq_zeros
    assert packed is not None
    block = ckernels.act_block(k)
    sums = ckernels.w8_block_sums(codes, block)  # as Int8Linear holds them
    row: dict[str, Any] = {
        "layer": name, "N": n, "K": k, "M": m, "kernel": kernel, "kernel_int4": kernel4,
        "dq_int8_ms": _median_ms(lambda i: ckernels.linear_w8(x, codes, s32, None, block, wsum=sums), repeats),
        "dq_int4_ms": _median_ms(lambda i: ckernels.linear_w4(x, packed, s4, z4, None, 128), repeats)}
    # our GEMMs only where their own code runs (elsewhere they multiply on _int_mm: the int8mm column again); int8mm
    # only with VNNI (on AVX2 alone oneDNN's _int_mm ran at 1-2 GOP/s: seconds a call)
    flags = prefill.cpu_flags()
    vnni = "avx512_vnni" in flags or "amx_int8" in flags
    for kern in [k for k in ("int8mm", "int8vnni", "int8avx2", "bf16")
                 if (k != "int8mm" or vnni) and flags >= prefill.OWN_GEMM_FLAGS.get(k, frozenset())]:
        row[f"{kern}_int8_ms"] = _median_ms(lambda i, kk=kern: prefill.linear_w8(kk, x, codes, s32, None), repeats)
        row[f"{kern}_int4_ms"] = _median_ms(lambda i, kk=kern: prefill.linear_w4(kk, x, packed, s4, z4, 128, None),
                                            repeats)
    flop = 2 * m * n * k
    for key in [key for key in row if key.endswith("_ms")]:
        row[key] = round(row[key], 3)
        row[key.replace("_ms", "_gflop_s")] = round(flop / row[key] / 1e6, 1)
    if kernel != "none":
        row["int8_speedup"] = round(row["dq_int8_ms"] / row[f"{kernel}_int8_ms"], 2)
    if kernel4 != "none":
        row["int4_speedup"] = round(row["dq_int4_ms"] / row[f"{kernel4}_int4_ms"], 2)
    return row


def prefill_kernel_rows(threads: int = 2, m: int = 256, repeats: int = 10) -> dict[str, Any]:
    """Per linear shape of the real 0.5B at M prompt rows: the prefill kernels (the one the plan picks for
    this CPU, and the other) vs our dq kernels (what prompt rows ran on before), int8 and int4 (group 128),
    median ms per call."""
    import torch

    from bench.kernels import SHAPES
    from model_runtime import ckernels, prefill

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    flags = prefill.cpu_flags()
    kernel, why = prefill.choose_kernel(flags)
    kernel4, why4 = prefill.choose_kernel(flags, quantization="int4")
    ckernels.load()
    # a prompt chunk needs the head for its last row only: no lm_head row
    rows = [_shape_row(name, n, k, m, kernel, kernel4, repeats)
            for name, n, k in SHAPES["qwen2.5-0.5b"] if name != "lm_head"]
    isa = sorted(flags & {"avx2", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16"})
    return {"rows": rows, "threads": threads, "chosen": kernel, "why": why, "chosen_int4": kernel4, "why_int4": why4,
            "cpu_isa": isa}
