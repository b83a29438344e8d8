"""guidellm (vLLM's load tool, PyPI `guidellm`) against an OpenAI-compatible server, as a client would run it.

No route configuration: guidellm finds the server through `GET /health` and `GET /v1/models` on its own,
which is the point of running it (it refused to start against a server without `/health`). One short
concurrent run of synthetic prompts; its JSON report is reduced to the figures the bench records.

guidellm lives in its own environment (its dependencies are not the runtime's): the `guidellm` executable
next to this interpreter, else $GUIDELLM, else on PATH.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any


def guidellm_executable() -> str | None:
    beside = Path(sys.executable).with_name("guidellm")
    if beside.exists():
        return str(beside)
    return os.environ.get("GUIDELLM") or shutil.which("guidellm")


# the share of a run's duration guidellm leaves out of its figures (its profile `warmup`, "to exclude initial transient
# period"): a concurrent run starts with every user's prompt at once, and the server's first request into each KV
# slot pays that slot's page faults (on this project's VMs ~0.6 s a slot on memory never touched before)
WARMUP = 0.1

# synthetic prompts guidellm's data worker keeps ready, per concurrent stream. Its default (prefetch_factor 4,096
# samples) has that worker process tokenizing prompts through the measured window, on the server's CPUs when both
# share a machine (as here): on the 2-vCPU bench VM it took ~20% of a CPU during an 8-user run (4.0 CPU-s in 20 s)
# and the server's engine threads got 1.67 CPUs; with a few samples ahead of each stream the worker is idle between
# requests and the engine got 1.83 (measured per thread from /proc). A load client on its own machine (as a platform
# team would run it) takes nothing from the server either way.
PREFETCH_PER_STREAM = 4


def guidellm_command(exe: str, base_url: str, tokenizer_dir: Path, out_json: Path, *, streams: int,
                     seconds: float, prompt_tokens: int, output_tokens: int, seed: int = 42,
                     warmup: float = WARMUP) -> list[str]:
    return [exe, "run", "--backend", f"kind=openai_http,target={base_url}",
            "--profile", f"kind=concurrent,streams={streams},warmup={warmup:g}",
            "--constraint", f"kind=max_duration,seconds={seconds:g}",
            "--data", f"kind=synthetic_text,prompt_tokens={prompt_tokens},output_tokens={output_tokens}",
            "--data-loader", f"kind=pytorch,prefetch_factor={max(16, PREFETCH_PER_STREAM * streams)}",
            "--tokenizer", f"kind=hf_auto,model={tokenizer_dir}",
            "--seed", f"kind=static,value={seed}",
            "--output", f"kind=json,path={out_json}", "--disable-progress"]


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """The figures of guidellm's JSON report (first benchmark) that the bench records. Output tokens/s is the total
    (guidellm's "total": every request's tokens streamed in the measured window, the requests still running at its
    end included; at 8 users each request lasts ~15 s, and the completed ones alone left out ~20% of a 60-s
    window's tokens); the completed requests' figure is kept beside it. Latencies are the completed requests'."""
    metrics = report["benchmarks"][0]["metrics"]

    def ok(name: str, stat: str = "mean", status: str = "successful") -> float | None:
        value = ((metrics.get(name) or {}).get(status) or {})
        if stat.startswith("p"):
            value = value.get("percentiles") or {}
        number = value.get(stat)
        return round(float(number), 2) if number is not None else None

    totals = metrics["request_totals"]
    return {
        "requests_completed": totals.get("successful"), "requests_errored": totals.get("errored"),
        "requests_incomplete": totals.get("incomplete"),
        "requests_per_s": ok("requests_per_second"),
        "output_tokens_per_s": ok("output_tokens_per_second", status="total"),
        "output_tokens_per_s_completed": ok("output_tokens_per_second"),
        "ttft_ms_median": ok("time_to_first_token_ms", "median"), "ttft_ms_p95": ok("time_to_first_token_ms", "p95"),
        "itl_ms_median": ok("inter_token_latency_ms", "median"),
        "request_latency_s_median": ok("request_latency", "median"),
    }


def run_guidellm(base_url: str, tokenizer_dir: Path, out_dir: Path, *, streams: int = 4, seconds: float = 30.0,
                 prompt_tokens: int = 64, output_tokens: int = 32, seed: int = 42) -> dict[str, Any]:
    exe = guidellm_executable()
    if exe is None:
        return {"error": "guidellm not installed (pip install guidellm, or `pip install .[bench]`; or set $GUIDELLM)"}
    out_dir.mkdir(parents=True, exist_ok=True)
    out_json = out_dir / "guidellm.json"
    cmd = guidellm_command(exe, base_url, tokenizer_dir, out_json, streams=streams, seconds=seconds,
                           prompt_tokens=prompt_tokens, output_tokens=output_tokens, seed=seed)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 300)
    (out_dir / "guidellm.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not out_json.exists():
        return {"error": f"guidellm exit {proc.returncode}: {(proc.stderr or proc.stdout)[-800:]}",
                "command": " ".join(cmd)}
    return {**summarize(json.loads(out_json.read_text())), "streams": streams, "seconds": seconds,
            "prompt_tokens": prompt_tokens, "output_tokens": output_tokens, "seed": seed, "command": " ".join(cmd),
            "report": str(out_json)}


def run_guidellm_sweep(base_url: str, tokenizer_dir: Path, out_dir: Path, *, levels: tuple[int, ...] = (1, 8),
                       rounds: int = 1, seconds: float = 30.0, prompt_tokens: int = 256,
                       output_tokens: int = 128) -> dict[str, Any]:
    """guidellm runs per number of concurrent users (one after the other, same server), `rounds` times over the
    levels: the total output tokens/s of the most users over the fewest (what batching buys under real prompt
    lengths), and each level's TTFT and ITL medians, as means over the rounds.

    Why rounds: on a shared 2-vCPU VM one 60-s run of a level moves by about +-8% from run to run (8 users:
    141-175 tok/s against one server build in one hour), and a ratio of two such runs by more. The rounds take the
    levels in turn (1, 8, 1, 8), so a slow stretch of the machine lands on both; each round's ratio is kept beside
    the ratio of the means (their spread is the run's noise).

    Each run draws its synthetic prompts from its own seed: guidellm's default seed repeats the same prompts run
    after run, and the server's prefix cache would then serve a later run's first prompts from an earlier one's.
    A failed run leaves its level's means None (so the ratio), the other rounds' ratios stay in the per-round list,
    and the error names the level."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, not {rounds}")
    if len(set(levels)) != len(levels):
        raise ValueError(f"each number of users once, not {levels}")
    runs: dict[str, list[dict[str, Any]]] = {str(n): [] for n in levels}
    for r in range(rounds):
        for n in levels:
            runs[str(n)].append(run_guidellm(base_url, tokenizer_dir, out_dir / (f"{n}u" if r == 0 else f"{n}u-r{r}"),
                                             streams=n, seconds=seconds, prompt_tokens=prompt_tokens,
                                             output_tokens=output_tokens, seed=1000 + n + 100 * r))

    def mean(n: int, key: str) -> float | None:
        values = [run.get(key) for run in runs[str(n)]]
        return round(sum(values) / len(values), 2) if values and all(v is not None for v in values) else None

    lo, hi = min(levels), max(levels)
    rate_lo, rate_hi = mean(lo, "output_tokens_per_s"), mean(hi, "output_tokens_per_s")
    per_round = [round(h["output_tokens_per_s"] / l_["output_tokens_per_s"], 2)
                 if l_.get("output_tokens_per_s") and h.get("output_tokens_per_s") else None
                 for l_, h in zip(runs[str(lo)], runs[str(hi)], strict=True)]
    errors = {n: next(run["error"] for run in rs if "error" in run) for n, rs in runs.items()
              if any("error" in run for run in rs)}
    return {
        "levels": list(levels), "rounds": rounds, "seconds": seconds, "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "output_tokens_per_s": {str(n): mean(n, "output_tokens_per_s") for n in levels},
        "ttft_ms_median": {str(n): mean(n, "ttft_ms_median") for n in levels},
        "itl_ms_median": {str(n): mean(n, "itl_ms_median") for n in levels},
        f"output_tokens_per_s_{hi}u_over_{lo}u": round(rate_hi / rate_lo, 2) if rate_lo and rate_hi else None,
        f"output_tokens_per_s_{hi}u_over_{lo}u_per_round": per_round,
        "runs": runs,
        **({"error": "; ".join(f"{n} users: {e}" for n, e in errors.items())} if errors else {}),
    }
