"""One benchmark step per process: `python -m bench.steps STEP --args JSON --out FILE`.

bench.run starts each step here in a fresh interpreter so that its peak RSS is its own and a crash
(or an OOM kill) is recorded instead of stopping the run. A step writes {"result": {...}} or
{"error": "..."} to --out. Heavy imports (torch, transformers, llama_cpp) happen only in here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

STEPS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {}


def step(fn: Callable[[dict[str, Any]], dict[str, Any]]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    STEPS[fn.__name__] = fn
    return fn


def _threads() -> int:
    return int(os.environ.get("OMP_NUM_THREADS", "2"))


@step
def bandwidth(args: dict[str, Any]) -> dict[str, Any]:
    from bench.bandwidth import measure_copy_bandwidth

    return measure_copy_bandwidth(args.get("array_mib", 512), args.get("repeats", 5), _threads()).as_dict()


@step
def gguf_bytes(args: dict[str, Any]) -> dict[str, Any]:
    from bench.bandwidth import gguf_bytes_per_token

    return gguf_bytes_per_token(args["path"])


@step
def prepare_st(args: dict[str, Any]) -> dict[str, Any]:
    from bench.models import dequantize_gguf_to_safetensors

    return dequantize_gguf_to_safetensors(Path(args["gguf"]), Path(args["dest"]))


@step
def prepare_r1(args: dict[str, Any]) -> dict[str, Any]:
    from bench.models import make_r1_shaped_model

    return make_r1_shaped_model(Path(args["dest"]), Path(args["tokenizer_dir"]), layers=args.get("layers"))


@step
def prepare_q8(args: dict[str, Any]) -> dict[str, Any]:
    from bench.models import quantize_gguf_q8_0

    return quantize_gguf_q8_0(Path(args["src"]), Path(args["dest"]), threads=_threads())


@step
def hf_generate(args: dict[str, Any]) -> dict[str, Any]:
    from bench.peers import hf_generate as run

    return run(args["model_dir"], args["dtype"], args["prompt"], args["new_tokens"], args["repeats"], _threads())


@step
def llamacpp(args: dict[str, Any]) -> dict[str, Any]:
    from bench.peers import llamacpp_generate as run

    return run(args["gguf"], args["prompt"], args["new_tokens"], args["repeats"], _threads())


@step
def prefill_ours(args: dict[str, Any]) -> dict[str, Any]:
    from bench.prefill import ours_ttft

    return ours_ttft(args["model_dir"], args["quantization"], prefill_kernel=args.get("prefill_kernel"),
                     prompt_tokens=args["prompt_tokens"], repeats=args["repeats"], threads=_threads())


@step
def prefill_llamacpp(args: dict[str, Any]) -> dict[str, Any]:
    from bench.prefill import llamacpp_ttft

    return llamacpp_ttft(args["gguf"], prompt_tokens=args["prompt_tokens"], repeats=args["repeats"],
                         threads=_threads())


@step
def prefill_kernels(args: dict[str, Any]) -> dict[str, Any]:
    from bench.prefill import prefill_kernel_rows

    return prefill_kernel_rows(_threads(), m=args.get("m", 256))


@step
def perplexity(args: dict[str, Any]) -> dict[str, Any]:
    from bench.perplexity import runtime_perplexity

    return runtime_perplexity(args["model_dir"], args["quantization"], max_tokens=args.get("max_tokens"),
                              window=args.get("window", 512), threads=_threads())


@step
def kernels(args: dict[str, Any]) -> dict[str, Any]:
    from bench.kernels import kernel_table

    return kernel_table(_threads(), repeats=args.get("repeats", 20))


@step
def decode_steps(args: dict[str, Any]) -> dict[str, Any]:
    from bench.kernels import decode_steps as run

    return run(args["model_dir"], args["modes"], _threads())


@step
def operator_bench(args: dict[str, Any]) -> dict[str, Any]:
    from bench.operator_bench import run_operator_bench  # written by the operator helper

    return run_operator_bench()


@step
def distill(args: dict[str, Any]) -> dict[str, Any]:
    from bench.distill import run_distill_bench

    return run_distill_bench(args["teacher"], args["student"], args.get("layers", 4), args.get("max_steps"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=sorted(STEPS))
    parser.add_argument("--args", default="{}", help="JSON object of step arguments")
    parser.add_argument("--out", required=True, type=Path)
    ns = parser.parse_args(argv)
    t0 = time.monotonic()
    try:
        result = STEPS[ns.step](json.loads(ns.args))
        payload: dict[str, Any] = {"result": result}
    except BaseException as exc:  # noqa: BLE001 - any failure is the step's result, not the harness's
        traceback.print_exc()
        payload = {"error": f"{type(exc).__name__}: {exc}"[:1000]}
    payload.setdefault("result", {})["step_inner_s"] = round(time.monotonic() - t0, 2)
    ns.out.write_text(json.dumps(payload))
    return 0 if "error" not in payload else 1


if __name__ == "__main__":
    sys.exit(main())
