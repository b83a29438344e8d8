"""The prefix-cache benchmark's client: requests sharing a ~1,000-token prefix, one at a time, timed.

Each request is a streamed greedy completion of PREFIX + its own question; the client records the time to
the first generated text, the text, and the prompt tokens (the server's usage). The same requests go to a
server with prefix caching and to one without: with the cache the second request's time to first token
falls to a fraction of the first's (its prefix is copied, not computed), and the texts are identical.
The server's prefix-cache counters (/metrics) say how many prompt tokens were served from the cache.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx

from bench.ppl_text import PPL_TEXT
from distillery_contract import metric_names

# ~1,000 tokens of fixed prose and code (the perplexity text's start, cut at a line end)
PREFIX = PPL_TEXT[: PPL_TEXT.rindex("\n", 0, 4600) + 1]
QUESTIONS = ("\nQuestion: what is the title of the text above?\nAnswer:",
             "\nQuestion: which Python library does the code above import?\nAnswer:")


async def _stream(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    out: dict[str, Any] = {"ttft_s": None, "text": "", "prompt_tokens": None}
    async with client.stream("POST", url, json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:300]}")
        async for line in resp.aiter_lines():
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            chunk = json.loads(line[5:])
            for choice in chunk.get("choices") or []:
                if choice.get("text"):
                    if out["ttft_s"] is None:
                        out["ttft_s"] = round(time.perf_counter() - t0, 4)
                    out["text"] += choice["text"]
            if chunk.get("usage"):
                out["prompt_tokens"] = chunk["usage"].get("prompt_tokens")
    out["total_s"] = round(time.perf_counter() - t0, 4)
    return out


def _prefix_counters(metrics_text: str) -> dict[str, float]:
    wanted = {metric_names.METRIC_PREFIX_CACHE_QUERIES_TOTAL: "queried_tokens",
              metric_names.METRIC_PREFIX_CACHE_HITS_TOTAL: "hit_tokens"}
    out: dict[str, float] = {}
    for line in metrics_text.splitlines():
        name = line.split("{", 1)[0]
        if name in wanted:
            out[wanted[name]] = out.get(wanted[name], 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def run_prefix_requests(base_url: str, model: str, *, max_tokens: int) -> dict[str, Any]:
    """The requests of QUESTIONS one after the other on one server; their timings, texts and the server's
    prefix-cache counters."""

    async def main() -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=httpx.Timeout(900.0)) as client:
            url = base_url.rstrip("/") + "/v1/completions"
            requests = []
            for question in QUESTIONS:
                body = {"model": model, "prompt": PREFIX + question, "max_tokens": max_tokens, "temperature": 0.0,
                        "stream": True, "stream_options": {"include_usage": True}}
                requests.append(await _stream(client, url, body))
            metrics = await client.get(base_url.rstrip("/") + "/metrics")
            return {"requests": requests, "server_counters": _prefix_counters(metrics.text)}

    return asyncio.run(main())


def summarize(on: dict[str, Any], off: dict[str, Any]) -> dict[str, Any]:
    """The figures of the section: TTFTs with the cache and without, their ratios, identical outputs."""
    def ttfts(run: dict[str, Any]) -> list[float | None]:
        return [r.get("ttft_s") for r in run.get("requests", [])]

    on_t, off_t = ttfts(on), ttfts(off)
    ratio = round(on_t[1] / on_t[0], 4) if len(on_t) == 2 and on_t[0] and on_t[1] else None
    off_ratio = round(off_t[1] / off_t[0], 4) if len(off_t) == 2 and off_t[0] and off_t[1] else None
    texts_on = [r.get("text") for r in on.get("requests", [])]
    texts_off = [r.get("text") for r in off.get("requests", [])]
    return {
        "prompt_tokens": [r.get("prompt_tokens") for r in on.get("requests", [])],
        "ttft_first_s": on_t[0] if on_t else None, "ttft_second_s": on_t[1] if len(on_t) > 1 else None,
        "second_over_first": ratio,
        "cache_off_ttft_s": off_t, "cache_off_second_over_first": off_ratio,
        # None when a run failed (its error is in its "runs" entry): nothing was compared
        "identical_outputs": None if "error" in on or "error" in off or not texts_on else texts_on == texts_off,
    }
