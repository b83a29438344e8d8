"""Inter-token latency of decoding streams while a long prompt is prefilled beside them (the engine's token
budget per step, max_num_batched_tokens, is what keeps it flat).

A few streamed greedy completions decode steadily; then one long prompt (token ids, ~2,000) is submitted.
Each stream's token arrival times give its inter-token latencies (ITL). The window is centred on the long
prompt's prefill: from its submission minus D to its first token plus D, D being its time to first token, so
the prefill is the middle third of the window and p99 <= 2x median needs the steps that carry prompt chunks
to stay within twice a plain decode step. The ITLs inside the prefill alone are reported too (median, p99, max),
and those before it (plain decoding), so a reader sees what the budget cost the streams and what it bought.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from typing import Any

import httpx

from bench.stats import percentile


def itl_figures(arrivals: list[list[float]], start: float, end: float) -> dict[str, Any]:
    """ITLs (ms) of every stream's consecutive tokens that arrived within [start, end]: count, median, p99, max."""
    itls = [(b - a) * 1e3 for times in arrivals for a, b in zip(times, times[1:], strict=False) if start <= a and b <= end]
    med, p99 = (statistics.median(itls) if itls else None), percentile(itls, 99)
    return {"samples": len(itls), "median_ms": _r(med), "p99_ms": _r(p99), "max_ms": _r(max(itls) if itls else None),
            "p99_over_median": _r(p99 / med if med and p99 is not None else None)}


def _r(x: float | None) -> float | None:
    return round(x, 2) if x is not None else None


async def _stream(client: httpx.AsyncClient, url: str, body: dict[str, Any], arrivals: list[float],
                  done: asyncio.Event | None = None) -> None:
    async with client.stream("POST", url, json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:300]}")
        async for line in resp.aiter_lines():
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            chunk = json.loads(line[5:])
            if any(c.get("text") for c in chunk.get("choices") or []):
                arrivals.append(time.perf_counter())
                if done is not None:
                    done.set()
                    return


def run_itl_long_prefill(base_url: str, model: str, *, decode_prompt: str, long_prompt_ids: list[int],
                         streams: int = 4, settle_s: float = 5.0, max_tokens: int = 2048) -> dict[str, Any]:
    """`streams` streamed completions of decode_prompt decode for settle_s, then long_prompt_ids is submitted;
    the streams run until D after its first token (D: its time to first token), then are cancelled."""

    async def main() -> dict[str, Any]:
        url = base_url.rstrip("/") + "/v1/completions"
        async with httpx.AsyncClient(timeout=httpx.Timeout(900.0)) as client:
            arrivals: list[list[float]] = [[] for _ in range(streams)]
            tasks = [asyncio.create_task(_stream(client, url, {
                "model": model, "prompt": decode_prompt + f"\n# stream {i}\n", "max_tokens": max_tokens,
                "temperature": 0.0, "stream": True}, arrivals[i])) for i in range(streams)]
            deadline = time.perf_counter() + 600
            while not all(arrivals) and time.perf_counter() < deadline:  # every stream is decoding
                await asyncio.sleep(0.05)
                for t in tasks:
                    if t.done() and t.exception() is not None:
                        raise RuntimeError(f"a decoding stream failed: {t.exception()}")
            await asyncio.sleep(settle_s)
            first: list[float] = []
            submitted = time.perf_counter()
            await _stream(client, url, {"model": model, "prompt": long_prompt_ids, "max_tokens": 1,
                                        "temperature": 0.0, "stream": True}, first, asyncio.Event())
            ttft = first[0] - submitted
            await asyncio.sleep(ttft)
            ended = time.perf_counter()
            finished_early = sum(t.done() for t in tasks)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        window = itl_figures(arrivals, submitted - ttft, ended)
        return {
            "streams": streams, "long_prompt_tokens": len(long_prompt_ids), "long_ttft_s": round(ttft, 3),
            "itl_ms_median": window["median_ms"], "itl_ms_p99": window["p99_ms"],
            "itl_p99_over_median": window["p99_over_median"], "window": window,
            "during_prefill": itl_figures(arrivals, submitted, first[0]),
            "before_prefill": itl_figures(arrivals, submitted - ttft, submitted),
            "streams_finished_early": finished_early,
        }

    return asyncio.run(main())
