"""Kernel and decode-step micro-benchmarks behind the runtime's CPU kernel choice.

- kernel_table: every linear shape of the real 0.5B and of the R1-Distill-1.5B shape, at 1/4/8
  activation rows, through our integer kernels (model_runtime.ckernels, on the best instruction set
  this CPU has: AVX-512 VNNI, AVX-VNNI or AVX2, and on the next best for comparison) and PyTorch's packed
  weight-only kernels (aten._weight_int8pack_mm, aten._weight_int4pack_mm_for_cpu, bf16 activations).
  Weights are random (speed does not depend on their values); each figure is the median of `repeats`
  timed calls after two warm-ups, with the weights cycled so a matrix is not served from cache.
- decode_steps: the loaded model's decode step (no engine, no HTTP) at batch 1/4/8 for each mode
  and backend (ours on each instruction set the CPU has, PyTorch's): what the engine and the HTTP
  layer add on top shows up against the HTTP figures. Each row carries the weight bytes a step reads
  (bench.bandwidth's count, lm_head int8 as our runtime stores it), so the report puts batch 1 against
  the memory-bandwidth bound.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

# (name, out_features N, in_features K) per model; qkv/gate_up fused as the runtime fuses them
SHAPES = {
    "qwen2.5-0.5b": [("qkv", 1152, 896), ("o", 896, 896), ("gate_up", 9728, 896), ("down", 896, 4864),
                     ("lm_head", 151936, 896)],
    "r1-1.5b-shape": [("qkv", 2048, 1536), ("o", 1536, 1536), ("gate_up", 17920, 1536), ("down", 1536, 8960),
                      ("lm_head", 151936, 1536)],
}


def _median_ms(fn: Callable[[int], Any], repeats: int) -> float:
    fn(0)
    fn(1)
    times = []
    for i in range(repeats):
        t = time.perf_counter()
        fn(i)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def _time_kernels(x: Any, q8: list[Any], sc8: list[Any], sums8: list[Any], q4: list[Any], aten4: list[Any],
                  dq4: list[Any], block: int, repeats: int, other_isa: str | None = None) -> dict[str, float]:
    """Median ms per call of each kernel on activations x [M, K], cycling through the weight copies;
    other_isa: ours on that instruction set too (dq_int8_ms_<isa>, dq_int4_ms_<isa>)."""
    import torch

    from model_runtime import ckernels

    copies = len(q8)
    xb = x.to(torch.bfloat16)
    out = {
        "aten_int8_ms": _median_ms(lambda i: torch.ops.aten._weight_int8pack_mm(xb, *q8[i % copies]), repeats),
        "aten_int4_ms": _median_ms(lambda i: torch.ops.aten._weight_int4pack_mm_for_cpu(
            xb, aten4[i % copies][0], 128, aten4[i % copies][1]), repeats),
    }
    if dq4:
        out["dq_int8_ms"] = _median_ms(
            lambda i: ckernels.linear_w8(x, q8[i % copies][0], sc8[i % copies], None, block,
                                         wsum=sums8[i % copies]), repeats)
        out["dq_int4_ms"] = _median_ms(
            lambda i: ckernels.linear_w4(x, dq4[i % copies], q4[i % copies][1], q4[i % copies][2], None, 128),
            repeats)
        if other_isa:
            with ckernels._load().using_isa(other_isa):
                out[f"dq_int8_ms_{other_isa}"] = _median_ms(
                    lambda i: ckernels.linear_w8(x, q8[i % copies][0], sc8[i % copies], None, block,
                                                 wsum=sums8[i % copies]), repeats)
                out[f"dq_int4_ms_{other_isa}"] = _median_ms(
                    lambda i: ckernels.linear_w4(x, dq4[i % copies], q4[i % copies][1], q4[i % copies][2], None,
                                                 128), repeats)
    return {key: round(v, 4) for key, v in out.items()}


def kernel_table(threads: int = 2, rows: tuple[int, ...] = (1, 4, 8), repeats: int = 20) -> dict[str, Any]:
    import torch

    from model_runtime import ckernels
    from model_runtime.kernels import quantize_int4, quantize_int8

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    have_dq = ckernels.cpu_supported()
    isas = ckernels._load().available_isas() if have_dq else []
    other_isa = isas[1] if len(isas) > 1 else None  # the next best: what the best one gains over it
    out: list[dict[str, Any]] = []
    for model, shapes in SHAPES.items():
        for name, n, k in shapes:
            # enough copies of the weight to exceed the last-level cache (16 MiB here) and cycle them
            copies = max(1, min(8, (64 << 20) // (n * k)))
            ws = [torch.randn(n, k) * 0.02 for _ in range(copies)]
            q8 = [quantize_int8(w) for w in ws]
            q4 = [quantize_int4(w, 128) for w in ws]
            del ws
            aten4 = [(torch.ops.aten._convert_weight_to_int4pack_for_cpu(c.to(torch.int32), 1),
                      torch.stack([s, z], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)) for c, s, z in q4]
            dq4 = [ckernels.pack_w4(c) for c, _, _ in q4] if have_dq else []
            sc8 = [s.float() for _, s in q8]
            block = ckernels.act_block(k)
            sums8 = [ckernels.w8_block_sums(c, block) for c, _ in q8] if have_dq else []  # as Int8Linear holds
            for m in rows:
                row: dict[str, Any] = {"model": model, "layer": name, "N": n, "K": k, "M": m}
                row.update(_time_kernels(torch.randn(m, k), q8, sc8, sums8, q4, aten4, dq4, block, repeats,
                                         other_isa))
                if "dq_int8_ms" in row:
                    row["int8_speedup"] = round(row["aten_int8_ms"] / row["dq_int8_ms"], 2)
                    row["int4_speedup"] = round(row["aten_int4_ms"] / row["dq_int4_ms"], 2)
                    row["dq_int8_gb_s"] = round(n * k / row["dq_int8_ms"] / 1e6, 1)  # weight bytes read per s
                out.append(row)
    return {"rows": out, "threads": threads, "repeats": repeats, "dq_available": have_dq,
            "dq_isa": ckernels._load().isa if have_dq else None, "dq_other_isa": other_isa}


def decode_steps(model_dir: str, modes: list[str], threads: int = 2, batches: tuple[int, ...] = (1, 4, 8),
                 steps: int = 16, bandwidth_mib: int = 128) -> dict[str, Any]:
    """Decode-step time of the model itself (no engine/HTTP) per mode and CPU kernel backend."""
    import os

    import torch

    from model_runtime import ckernels

    torch.set_num_threads(threads)
    results: list[dict[str, Any]] = []
    # ours on each instruction set this CPU has (the best one first: what the runtime picks), then PyTorch's
    try:
        lib: ckernels._Lib | None = ckernels._load()
    except ckernels.KernelUnavailable:
        lib = None
    isas = lib.available_isas() if lib else []
    for mode in modes:
        # "dq": the runtime's own choice (the best set, and the plan's one-row kernels: plan.row_isas);
        # then every set alone, then PyTorch's packed kernels
        backends = (["dq"] if lib else []) + [f"dq-{isa}" for isa in isas] + ["aten"] if mode in ("int8", "int4") \
            else ["-"]
        for backend in backends:
            if backend != "-":
                os.environ["DISTILLERY_CPU_KERNELS"] = backend.split("-")[0]
            on_isa = lib.using_isa(backend.removeprefix("dq-")) if lib and backend.startswith("dq-") else nullcontext()
            with on_isa:
                results += _time_decode_steps(model_dir, mode, backend, batches, steps, threads, bandwidth_mib)
            os.environ.pop("DISTILLERY_CPU_KERNELS", None)
    return {"rows": results, "threads": threads, "steps": steps,
            "note": "3 rounds per row of: read-only stream bandwidth (torch sum, best of 3), `steps` steps, the "
                    "bandwidth again. step_ms: the best round; read_gb_s: the highest read; paired_fraction: the "
                    "median over rounds of (weight bytes / step time) / the higher read of that round. A decode "
                    "step only reads its weights, and on a shared VM both figures drift by tens of percent within "
                    "minutes, so each step time is held to the bandwidth of its own moment. *_huge: the same with "
                    "the read on 2 MiB pages (bench.bandwidth.huge_page_stream; huge_page_kib: how much of it the "
                    "kernel gave as such; left out where that is under 90%), a stricter bound than the 4 KiB pages "
                    "the weights sit on"}


def _time_decode_steps(model_dir: str, mode: str, backend: str, batches: tuple[int, ...],
                       steps: int, threads: int, bandwidth_mib: int) -> list[dict[str, Any]]:
    """One model load, its decode step timed at each batch size (best of 3), with the read bandwidth of the moment."""
    import json
    from pathlib import Path

    import torch

    from bench.bandwidth import ModelShape, huge_page_stream, mostly_huge, read_gb_s, weight_bytes_per_token
    from model_runtime.loader import load_model

    loaded = load_model(model_dir, quantization="none" if mode == "bf16" else mode, max_model_len=512)
    model = loaded.model
    shape = ModelShape.from_hf_config(json.loads((Path(model_dir) / "config.json").read_text()))
    per_token = weight_bytes_per_token(shape, mode, lm_head_mode="int8" if mode in ("int8", "int4") else None)
    cache = model.new_cache(max(batches), 512)
    stream = torch.ones(bandwidth_mib * (1 << 20) // 8, dtype=torch.float64)  # read_gb_s's array, allocated once
    # the same read on 2 MiB pages (the weights sit on 4 KiB ones, as PyTorch allocates them): a stricter bound
    huge, huge_kib = huge_page_stream(bandwidth_mib)
    on_huge = mostly_huge(huge_kib, bandwidth_mib)  # else that read is not taken (THP off, fragmented memory)
    results: list[dict[str, Any]] = []
    with torch.inference_mode():
        for b in batches:
            ids = torch.randint(0, 1000, (b, 1))
            pos = torch.full((b, 1), 64)
            for _ in range(2):
                model(ids, pos, cache, slice(0, b))
            # 3 rounds of: read bandwidth, `steps` steps, read bandwidth; each round's fraction of the bound is
            # taken against the higher of its two reads (the bandwidth of that moment, erring high)
            times, reads, fractions, huge_reads, huge_fractions = [], [], [], [], []
            for _ in range(3):
                before = read_gb_s(stream)
                huge_before = read_gb_s(huge) if on_huge else 0.0
                t = time.perf_counter()
                for i in range(steps):
                    model(ids, pos + i, cache, slice(0, b))
                times.append((time.perf_counter() - t) / steps)
                # a step reads the weights once whatever the batch: bytes per step / time against the bandwidth
                reads += [before, read_gb_s(stream)]
                fractions.append(per_token / times[-1] / (max(reads[-2:]) * 1e9))
                if on_huge:
                    huge_reads += [huge_before, read_gb_s(huge)]
                    huge_fractions.append(per_token / times[-1] / (max(huge_reads[-2:]) * 1e9))
            ms = min(times) * 1e3
            huge_figures = {"read_gb_s_huge": max(huge_reads),
                            "paired_fraction_huge": round(statistics.median(huge_fractions), 3)} if on_huge else {}
            results.append({"mode": mode, "backend": backend, "batch": b, "step_ms": round(ms, 2),
                            "tok_s": round(b * 1e3 / ms, 1), "fused_decode": bool(model.fused_decode),
                            "bytes_per_token": per_token, "read_gb_s": max(reads),
                            "paired_fraction": round(statistics.median(fractions), 3),
                            "step_ms_rounds": [round(x * 1e3, 2) for x in times], "read_gb_s_rounds": reads,
                            "huge_page_kib": huge_kib, **huge_figures})
    return results
