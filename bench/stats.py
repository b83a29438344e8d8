"""Small statistics used by the harness: percentiles and per-stream timing summaries (pure, no I/O)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between closest ranks (numpy's default).

    None for an empty sequence, so a report can show "-" instead of inventing a number.
    """
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    if not values:
        return None
    ordered = sorted(values)
    if len(ordered) == 1:
        return float(ordered[0])
    rank = (len(ordered) - 1) * q / 100.0
    lo = math.floor(rank)
    hi = math.ceil(rank)
    return float(ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo))


def mean(values: Sequence[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None


@dataclass
class StreamTiming:
    """What one streamed generation looked like from the client's side (seconds from the request)."""

    ttft_s: float | None  # first generated token
    total_s: float  # last byte of the response
    completion_tokens: int

    @property
    def decode_tok_s(self) -> float | None:
        """Decode rate after the first token: (n - 1) / (last - first); prefill is excluded."""
        if self.ttft_s is None or self.completion_tokens < 2:
            return None
        span = self.total_s - self.ttft_s
        return (self.completion_tokens - 1) / span if span > 0 else None


def decode_rate(token_times: Sequence[float]) -> float | None:
    """Tokens/s between the first and the last token of a stream of per-token timestamps."""
    if len(token_times) < 2:
        return None
    span = token_times[-1] - token_times[0]
    return (len(token_times) - 1) / span if span > 0 else None


def summarize_streams(timings: Sequence[StreamTiming], wall_s: float) -> dict[str, float | int | None]:
    """Aggregate figures for a batch of concurrent streams that together took wall_s seconds."""
    ttfts = [t.ttft_s for t in timings if t.ttft_s is not None]
    rates = [r for t in timings if (r := t.decode_tok_s) is not None]
    tokens = sum(t.completion_tokens for t in timings)
    return {
        "streams": len(timings),
        "completion_tokens": tokens,
        "wall_s": round(wall_s, 3),
        "aggregate_tok_s": round(tokens / wall_s, 3) if wall_s > 0 else None,
        "per_stream_decode_tok_s_mean": _round(mean(rates)),
        "ttft_p50_s": _round(percentile(ttfts, 50)),
        "ttft_p99_s": _round(percentile(ttfts, 99)),
    }


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)
