"""GPU decode benchmark: `python -m bench.gpu --out bench/results/gpu.json [--real_0p5b DIR] [--budget_s 300]`.

Rows (model x mode x batch): our runtime's decode step at bf16 / int8 (both CUDA int8 kernels: torch's
_weight_int8pack_mm and the dequantize compiled into the matmul) / int4 (tinygemm, or the plan's
fallback), batch 1 and 8, on the R1-Distill-1.5B shape (random weights, written here) and the real
Qwen2.5-0.5B when its safetensors directory is present; transformers `generate` bf16 on the same GPU;
and the memory-bandwidth bound from the GPU's measured device-to-device copy bandwidth (tokens/s <=
bandwidth / weight bytes read per token, bench.bandwidth's arithmetic). Each row is written to the
JSON as soon as it is measured, so a run stopped by its time budget keeps what it measured.
scripts/gpu_check.sh runs it; the pure pieces (rows, bound, timing loop on the CPU) are unit-tested.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from bench.bandwidth import ModelShape, bound_tok_s, weight_bytes_per_token

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = REPO / "third_party" / "reference" / "deepseek-r1-distill-qwen-tokenizer"
PROMPT_LEN = 64
BATCHES = (1, 8)
# (label, quantization, int8 CUDA kernel): int8 twice, to choose the kernel by measurement
MODES = (("bf16", "none", None), ("int8-int8pack_mm", "int8", "int8pack_mm"), ("int8-dequant", "int8", "dequant"),
         ("int4", "int4", None))
# measured after every other row of every batch: the plan's compiled default is "dequant", so under a time
# budget (a lent GPU's minutes, each row a compile) the default's rows and the reference come first
LAST = "int8-int8pack_mm"
HF = ("hf", "", None)


def measure_copy_bandwidth(device: str, mib: int = 1024, repeats: int = 10) -> float:
    """Device copy bandwidth in bytes/s (read + write counted), best of `repeats`."""
    import torch

    n = mib << 20
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats + 1):  # the first copy warms up
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n / best


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bound_row(shape: ModelShape, mode: str, bandwidth: float, group_size: int = 128) -> dict[str, float]:
    """The bandwidth bound for one mode: decoder at `mode`, lm_head int8 when quantized (our plan's auto)."""
    quant = {"bf16": "bf16", "int8": "int8", "int4": "int4"}[mode.split("-")[0]]
    head = "bf16" if quant == "bf16" else "int8"
    per_token = weight_bytes_per_token(shape, quant, group_size=group_size, lm_head_mode=head)
    return {"bytes_per_token": per_token, "bound_tok_s": bound_tok_s(bandwidth, per_token)}


def kernel_table(averages: Any, steps: int, top: int = 12) -> dict[str, Any]:
    """torch.profiler's key averages (GPU activity only) -> the kernels' time per step, the largest first:
    their sum against a step's wall time says how much of a step is kernels and how much gaps."""
    rows = []
    for a in averages:
        us = getattr(a, "device_time_total", None)
        us = getattr(a, "cuda_time_total", 0.0) if us is None else us
        if us > 0:
            rows.append({"kernel": str(a.key)[:160], "us_per_step": us / steps, "calls_per_step": a.count / steps})
    rows.sort(key=lambda r: -r["us_per_step"])
    return {"kernel_us_per_step": sum(r["us_per_step"] for r in rows), "kernels_per_step":
            sum(r["calls_per_step"] for r in rows), "top_kernels": rows[:top]}


def time_decode(model_dir: str, quantization: str, batch: int, *, device: str, steps: int = 32,
                compile: bool | None = None, int8_kernel: str | None = None,
                profile: bool = False) -> dict[str, Any]:
    """Our decode step as the engine runs it (the plan's compile setting, CUDA graphs per KV bucket):
    `batch` sequences after a PROMPT_LEN prefill, `steps` timed greedy steps; tokens/s over all rows.
    `profile` (CUDA): then 4 more steps under torch.profiler, their kernels in the row (kernel_table)."""
    import torch
    from torch._dynamo.utils import counters

    from model_runtime.compiled_step import compile_decode_step
    from model_runtime.engine import kv_bucket
    from model_runtime.loader import load_model

    counters.clear()
    if int8_kernel:
        os.environ["DISTILLERY_CUDA_INT8"] = int8_kernel
    try:
        t0 = time.perf_counter()
        loaded = load_model(model_dir, quantization=quantization, device=device, compile=compile)
        load_s = time.perf_counter() - t0
    finally:
        os.environ.pop("DISTILLERY_CUDA_INT8", None)
    model, plan = loaded.model, loaded.plan
    assert plan is not None
    dev = model.device
    max_len = PROMPT_LEN + steps + 8
    cache = model.new_cache(batch, kv_bucket(max_len, model.rope_len))
    graphs = plan.compile and dev.type == "cuda"
    fn = model.forward
    if plan.compile:
        fn = compile_decode_step(model.forward, dev, batch)
    slots = torch.arange(batch, device=dev)
    with torch.inference_mode():
        gen = torch.Generator().manual_seed(0)
        for b in range(batch):
            ids = torch.randint(0, loaded.config.vocab_size, (1, PROMPT_LEN), generator=gen).to(dev)
            model(ids, torch.arange(PROMPT_LEN, device=dev)[None], cache, slice(b, b + 1), logits="none")
        tok = torch.zeros((batch, 1), dtype=torch.long, device=dev)

        def step(pos: int) -> torch.Tensor:
            positions = torch.full((batch, 1), pos, dtype=torch.long, device=dev)
            kv_len = kv_bucket(pos + 1, cache.max_len) if graphs else pos + 1
            out: torch.Tensor = fn(tok, positions, cache, slots if graphs else slice(0, batch), kv_len=kv_len,
                                   logits="last")
            return out.argmax(-1, keepdim=True)

        c0 = time.perf_counter()
        for i in range(3):  # compile / record / replay before timing
            tok = step(PROMPT_LEN + i)
        _sync(str(dev))
        compile_s = time.perf_counter() - c0
        t0 = time.perf_counter()
        for i in range(steps):
            tok = step(PROMPT_LEN + 3 + i)
        _sync(str(dev))
        elapsed = time.perf_counter() - t0
        kernels: dict[str, Any] = {}
        if profile and dev.type == "cuda":
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as profiler

            with profiler(activities=[ProfilerActivity.CUDA]) as prof:
                for i in range(4):  # within the cache: max_len leaves 8 positions past the timed steps
                    tok = step(PROMPT_LEN + 3 + steps + i)
                _sync(str(dev))
            kernels = kernel_table(prof.key_averages(), 4)
    return {"tok_s": batch * steps / elapsed, "ms_per_step": 1e3 * elapsed / steps, "load_s": round(load_s, 1),
            "warmup_s": round(compile_s, 1), "cudagraph_skips": counters["inductor"]["cudagraph_skips"],
            **kernels, "plan": plan.describe()}


def time_hf_generate(model_dir: str, batch: int, *, device: str, new_tokens: int = 32) -> dict[str, Any]:
    """transformers `generate` (bf16, greedy, eager) on the same device: the reference row."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(device).eval()
    ids = torch.randint(0, model.config.vocab_size, (batch, PROMPT_LEN), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    kw = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False,
          "attention_mask": torch.ones_like(ids), "pad_token_id": 0}
    with torch.inference_mode():
        model.generate(ids, **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        model.generate(ids, **kw)
        _sync(device)
        total = time.perf_counter() - t0
    return {"tok_s": batch * new_tokens / total, "ms_per_step": 1e3 * total / new_tokens}


class Results:
    """The JSON file, rewritten after every row."""

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path = path
        self.data: dict[str, Any] = {"meta": meta, "rows": [], "errors": []}
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=2))

    def add(self, row: dict[str, Any]) -> None:
        self.data["rows"].append(row)
        self.save()
        print(json.dumps({k: v for k, v in row.items() if k not in ("plan", "top_kernels")}), flush=True)

    def error(self, what: str, exc: BaseException) -> None:
        self.data["errors"].append({"what": what, "error": f"{type(exc).__name__}: {exc}"[:2000]})
        self.save()
        print(f"error in {what}: {exc}", flush=True)


def run(out: Path, models: dict[str, Path], *, device: str = "cuda", budget_s: float = 300.0,
        steps: int = 32, batches: tuple[int, ...] = BATCHES) -> dict[str, Any]:
    started = time.monotonic()
    import torch

    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    bandwidth = measure_copy_bandwidth(device, mib=1024 if device.startswith("cuda") else 256)
    res = Results(out, {"device": name, "torch": torch.__version__, "copy_bandwidth_gb_s": bandwidth / 1e9,
                        "prompt_len": PROMPT_LEN, "steps": steps})
    for model_name, path in models.items():
        shape = ModelShape.from_hf_config(json.loads((path / "config.json").read_text()))
        first = [(b, m) for b in batches for m in (*(m for m in MODES if m[0] != LAST), HF)]
        for batch, (label, quantization, kernel) in first + [(b, m) for b in batches for m in MODES if m[0] == LAST]:
            what = f"{model_name}/{label}/b{batch}"
            if time.monotonic() - started > budget_s:
                res.error(what, TimeoutError(f"over the {budget_s:.0f} s budget"))
                continue
            try:
                if label == "hf":
                    row = time_hf_generate(str(path), batch, device=device, new_tokens=steps)
                    label, engine = "bf16", "transformers-generate"
                else:
                    row = time_decode(str(path), quantization, batch, device=device, steps=steps,
                                      int8_kernel=kernel, profile=batch == 1)
                    engine = "ours"
            except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
                res.error(what, exc)
                continue
            bound = bound_row(shape, label, bandwidth)
            row.update(model=model_name, mode=label, batch=batch, engine=engine, **bound,
                       fraction_of_bound=row["tok_s"] / batch / bound["bound_tok_s"])
            res.add(row)
            torch.cuda.empty_cache() if device.startswith("cuda") else None
    res.data["meta"]["seconds"] = round(time.monotonic() - started, 1)
    res.save()
    return res.data


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "gpu.json"))
    p.add_argument("--work", default=str(REPO / "models"), help="where the 1.5B-shape model is written")
    p.add_argument("--real_0p5b", default=str(REPO / "models" / "qwen2.5-0.5b-st"),
                   help="the real Qwen2.5-0.5B safetensors directory (skipped when absent)")
    p.add_argument("--budget_s", type=float, default=300.0)
    p.add_argument("--steps", type=int, default=32)
    args = p.parse_args(argv)
    from bench.models import make_r1_shaped_model

    shaped = Path(args.work) / "r1-distill-qwen-1.5b-shape-random"
    make_r1_shaped_model(shaped, TOKENIZER_DIR)
    models = {"r1-1.5b-shape": shaped}
    if (Path(args.real_0p5b) / "config.json").is_file():
        models["qwen2.5-0.5b"] = Path(args.real_0p5b)
    else:
        print(f"real 0.5B not found at {args.real_0p5b}: its rows are skipped", flush=True)
    run(Path(args.out), models, budget_s=args.budget_s, steps=args.steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
