"""HTTP load generator: streamed OpenAI completions at a fixed concurrency, timed from the client.

Each request is `POST {base}/v1/completions` with stream=true and greedy decoding; the client records
the time to the first generated text (TTFT), the time of the last byte, the completion tokens (the
server's `usage` when it sends one, else the number of text chunks) and the HTTP status, so that 429s
(backpressure) are told apart from errors.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass
from typing import Any

import httpx

from bench.stats import StreamTiming, percentile, summarize_streams


@dataclass
class RequestResult:
    status: int  # HTTP status; 0 when the connection itself failed
    ttft_s: float | None = None
    total_s: float = 0.0
    completion_tokens: int = 0
    chunks: int = 0
    error: str | None = None
    retry_after: str | None = None
    text: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None

    def timing(self) -> StreamTiming:
        return StreamTiming(self.ttft_s, self.total_s, self.completion_tokens)


def completion_body(model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def stream_completion(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> RequestResult:
    t0 = time.perf_counter()
    res = RequestResult(status=0)
    usage_tokens: int | None = None
    try:
        async with client.stream("POST", url, json=body) as resp:
            res.status = resp.status_code
            if resp.status_code != 200:
                res.retry_after = resp.headers.get("retry-after")
                raw = await resp.aread()
                res.error = raw.decode(errors="replace")[:300]
                res.total_s = time.perf_counter() - t0
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                try:
                    chunk = json.loads(data)
                except json.JSONDecodeError:
                    continue
                if "error" in chunk:
                    res.error = str(chunk["error"])[:300]
                    break
                for choice in chunk.get("choices") or []:
                    text = choice.get("text")
                    if text is None:
                        text = (choice.get("delta") or {}).get("content")
                    if text:
                        if res.ttft_s is None:
                            res.ttft_s = time.perf_counter() - t0
                        res.chunks += 1
                        res.text += text
                if chunk.get("usage"):
                    usage_tokens = int(chunk["usage"].get("completion_tokens") or 0)
    except (httpx.HTTPError, OSError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"[:300]
    res.total_s = time.perf_counter() - t0
    res.completion_tokens = usage_tokens if usage_tokens is not None else res.chunks
    return res


async def run_concurrent(base_url: str, model: str, prompt: str, max_tokens: int, streams: int,
                         timeout_s: float = 1800.0) -> tuple[list[RequestResult], float]:
    """Fire `streams` identical requests at once; returns their results and the wall time of the lot."""
    limits = httpx.Limits(max_connections=streams + 4, max_keepalive_connections=streams + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), limits=limits) as client:
        url = base_url.rstrip("/") + "/v1/completions"
        body = completion_body(model, prompt, max_tokens)
        t0 = time.perf_counter()
        results = await asyncio.gather(*(stream_completion(client, url, body) for _ in range(streams)))
        return list(results), time.perf_counter() - t0


def concurrency_summary(results: list[RequestResult], wall_s: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    summary = summarize_streams([r.timing() for r in ok], wall_s)
    summary["ok"] = len(ok)
    summary["http_429"] = sum(1 for r in results if r.status == 429)
    summary["errors"] = sum(1 for r in results if not r.ok and r.status != 429)
    # client-side timeouts (a server that makes a queued request wait that long) are counted apart too
    summary["client_timeouts"] = sum(1 for r in results if (r.error or "").startswith(("ReadTimeout", "ConnectTimeout")))
    first_error = next((r.error for r in results if not r.ok and r.status != 429), None)
    if first_error:
        summary["first_error"] = first_error
    return summary


def run_http_benchmark(base_url: str, model: str, prompt: str, *, single_tokens: int, repeats: int,
                       conc_tokens: int, levels: list[int], warmup_tokens: int = 4) -> dict[str, Any]:
    """Single-stream decode rate (median of `repeats`) and aggregate throughput at each concurrency."""
    out: dict[str, Any] = {}
    warm, _ = asyncio.run(run_concurrent(base_url, model, prompt, warmup_tokens, 1))
    if not warm[0].ok:
        raise RuntimeError(f"warm-up request failed: HTTP {warm[0].status} {warm[0].error}")
    singles = []
    for _ in range(repeats):
        res, _wall = asyncio.run(run_concurrent(base_url, model, prompt, single_tokens, 1))
        if not res[0].ok:
            raise RuntimeError(f"single-stream request failed: HTTP {res[0].status} {res[0].error}")
        singles.append(res[0])
    rates = [r for s in singles if (r := s.timing().decode_tok_s) is not None]
    ttfts = [s.ttft_s for s in singles if s.ttft_s is not None]
    out["single_stream"] = {
        "decode_tok_s": round(percentile(rates, 50), 3) if rates else None,
        "decode_tok_s_runs": [round(r, 3) for r in rates],
        "ttft_s": round(percentile(ttfts, 50), 4) if ttfts else None,
        "completion_tokens": [s.completion_tokens for s in singles],
        "text_head": singles[0].text[:120] if singles else "",
    }
    conc: dict[str, Any] = {}
    for level in levels:
        results, wall = asyncio.run(run_concurrent(base_url, model, prompt, conc_tokens, level))
        conc[str(level)] = concurrency_summary(results, wall)
    out["concurrency"] = conc
    return out


def run_overload(base_url: str, model: str, prompt: str, *, streams: int, max_tokens: int) -> dict[str, Any]:
    """Fire more streams than the server admits; count 429s (with Retry-After) against other errors,
    then check that the server still answers a normal request."""
    results, wall = asyncio.run(run_concurrent(base_url, model, prompt, max_tokens, streams))
    summary = concurrency_summary(results, wall)
    summary["retry_after_headers"] = sorted({r.retry_after for r in results if r.status == 429 and r.retry_after})
    after, _ = asyncio.run(run_concurrent(base_url, model, prompt, 4, 1))
    summary["healthy_after"] = after[0].ok
    return summary


def as_dicts(results: list[RequestResult]) -> list[dict[str, Any]]:
    return [asdict(r) for r in results]
