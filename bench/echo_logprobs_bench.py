"""What lm-evaluation-harness's log-likelihood requests cost: `echo: true, logprobs: 1, max_tokens: 1` on token-id
prompts, against the same request without echo/logprobs, on the tiny test model (2 layers, R1 vocab 152k).

Two measurements, the best of a few interleaved repeats (the machine is shared):
- engine: one prompt through Engine.submit, with params.prompt_logprobs=1 + logprobs=1 and without;
- http: a live `python -m model_runtime` (CPU, float32), POST /v1/completions with `prompts` token-id prompts
  of `prompt_len` tokens each (lm-eval's shape, one request holding them all), with and without echo+logprobs.
With prompt logprobs the engine scores every prompt position over the whole vocabulary and the server shapes
one OpenAI logprobs entry (token string, text offset, top-1 dict) per prompt token: that must stay a small
multiple of the plain request, not dominate it.

    .venv/bin/python -m bench.echo_logprobs_bench [--prompts 8] [--prompt-len 128] [--no-http]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

LM_EVAL_BODY = {"temperature": 0, "max_tokens": 1, "seed": 1234}


def _prompts(count: int, length: int) -> list[list[int]]:
    return [[151646] + [(1000 + 37 * i + 11 * j) % 150000 for j in range(length - 1)] for i in range(count)]


def engine_ms(model_dir: Path, prompt_len: int, repeats: int) -> dict[str, float]:
    from model_runtime.engine import Engine, EngineConfig
    from model_runtime.loader import load_model
    from model_runtime.sampling import SamplingParams

    loaded = load_model(model_dir, device="cpu", dtype="float32", max_model_len=512)
    engine = Engine(loaded, EngineConfig(max_batch_size=4, max_model_len=512, enable_prefix_caching=False))
    engine.start()
    try:
        def once(params: SamplingParams, i: int) -> tuple[float, float]:
            done = threading.Event()
            prompt = _prompts(1, prompt_len)[0]
            prompt[1] = 2000 + i  # no two runs alike

            def deliver(event: Any) -> None:
                if event.finish_reason is not None:
                    done.set()

            c0, t0 = time.process_time(), time.perf_counter()
            engine.submit(prompt, params, f"r{i}", deliver)
            done.wait(60)
            return (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3

        plain = SamplingParams(1, temperature=0.0)
        echo = SamplingParams(1, temperature=0.0, logprobs=1, prompt_logprobs=1)
        return _best(lambda echoed, i: once(echo if echoed else plain, i), repeats, "engine", "ms")
    finally:
        engine.stop()


def http_s(model_dir: Path, prompts: int, prompt_len: int, repeats: int) -> dict[str, float]:
    import httpx
    import psutil

    from tests.live_runtime import live_runtime

    with tempfile.TemporaryDirectory() as tmp, \
            live_runtime(model_dir, "tiny", Path(tmp) / "server.log",
                         extra=["--max_model_len=512", f"--max_batch_size={prompts}",
                                f"--max_queue={prompts}", "--enable_prefix_caching=false"]) as base:
        port = int(base.rsplit(":", 1)[1])
        server = next(c.pid for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == port
                      and c.status == psutil.CONN_LISTEN)
        proc = psutil.Process(server)

        def cpu() -> float:
            t = proc.cpu_times()
            return float(t.user + t.system)

        def once(echo: bool, i: int) -> tuple[float, float]:
            ps = _prompts(prompts, prompt_len)
            for p in ps:
                p[1] = 3000 + i
            body = {"model": "tiny", "prompt": ps, **LM_EVAL_BODY, **({"echo": True, "logprobs": 1} if echo else {})}
            c0, t0 = cpu(), time.perf_counter()
            r = httpx.post(f"{base}/v1/completions", json=body, timeout=120)
            wall, used = time.perf_counter() - t0, cpu() - c0
            assert r.status_code == 200, r.text
            if echo:
                assert all(len(c["logprobs"]["token_logprobs"]) == prompt_len + 1 for c in r.json()["choices"])
            return wall, used

        once(True, -1)  # warm
        return _best(once, repeats, "http", "s")


def _best(once: Callable[[bool, int], tuple[float, float]], repeats: int, what: str, unit: str
          ) -> dict[str, float]:
    """The best wall and CPU time (the server's process: steadier on a shared machine) of plain and echoed
    requests, interleaved, and their ratios."""
    best = {k: [float("inf"), float("inf")] for k in ("plain", "echo")}
    for i in range(repeats):
        for kind in ("plain", "echo"):
            got = once(kind == "echo", 2 * i + (kind == "echo"))
            best[kind] = [min(a, b) for a, b in zip(best[kind], got, strict=True)]
    digits = 1 if unit == "ms" else 3
    out = {f"{what} {k} {unit}": round(v[0], digits) for k, v in best.items()}
    out |= {f"{what} {k} cpu {unit}": round(v[1], digits) for k, v in best.items()}
    out[f"{what} echo/plain"] = round(best["echo"][0] / best["plain"][0], 1)
    out[f"{what} echo/plain cpu"] = round(best["echo"][1] / max(best["plain"][1], 1e-9), 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-http", action="store_true")
    args = ap.parse_args()

    from tests.reference import R1_TOKENIZER_DIR
    from tests.runtime_fixtures import build_tiny_qwen2_dir

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_qwen2_dir(Path(tmp) / "tiny", R1_TOKENIZER_DIR)
        out: dict[str, Any] = {"prompts": args.prompts, "prompt_len": args.prompt_len}
        out.update(engine_ms(model_dir, args.prompt_len, args.repeats * 2))
        if not args.no_http:
            out.update(http_s(model_dir, args.prompts, args.prompt_len, args.repeats))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
