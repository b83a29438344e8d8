"""Reading numbers back from Prometheus: its HTTP query API (instant queries), and the SLO figures the
rollout gates judge a revision by, measured with the PromQL in `promql`.

Async on aiohttp (kopf's own HTTP stack, already in the operator image). An answer with no sample — no
traffic yet, a NaN from 0/0 — is `None`, never 0: a gate must not pass a revision on missing data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import aiohttp

from . import promql as q


class PrometheusError(Exception):
    """Prometheus could not be asked or refused the query; `transient` says whether retrying may help."""

    def __init__(self, message: str, transient: bool = True) -> None:
        super().__init__(message)
        self.transient = transient


class PrometheusClient:
    """Instant queries against Prometheus' HTTP API (GET /api/v1/query)."""

    def __init__(self, url: str, timeout_s: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def query_vector(self, promql: str) -> list[tuple[dict[str, str], float]]:
        """Every sample of an instant query, as (labels, value)."""
        try:
            async with aiohttp.ClientSession(timeout=self.timeout) as session, session.get(
                f"{self.url}/api/v1/query", params={"query": promql}
            ) as response:
                body: dict[str, Any] = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise PrometheusError(f"Prometheus at {self.url} did not answer: {exc!r}") from exc
        if body.get("status") != "success":
            # 400/422: the query itself is wrong (a bug here, not a passing outage)
            raise PrometheusError(f"Prometheus refused {promql!r}: {body.get('error', body)}",
                                  transient=response.status >= 500)
        data = body.get("data", {})
        if data.get("resultType") == "scalar":
            return [({}, float(data["result"][1]))]
        return [(sample.get("metric", {}), float(sample["value"][1])) for sample in data.get("result", [])]

    async def query(self, promql: str) -> float | None:
        """The single value of an instant query; None when it has no sample or the value is NaN."""
        samples = await self.query_vector(promql)
        if not samples:
            return None
        if len(samples) > 1:
            raise PrometheusError(f"{promql!r} returned {len(samples)} series where one was expected",
                                  transient=False)
        value = samples[0][1]
        return None if math.isnan(value) else value


@dataclass(frozen=True)
class SloMeasurement:
    """What a rollout step is judged on, over one window; None: no data."""

    p99_latency_seconds: float | None
    error_rate: float | None
    tokens_per_second: float | None
    requests_per_second: float | None


async def measure(client: PrometheusClient, sel: q.Selector, window: str) -> SloMeasurement:
    """The SLO figures of the series `sel` selects (e.g. one revision's pods) over `window` (e.g. "2m")."""
    return SloMeasurement(
        p99_latency_seconds=await client.query(q.p99_latency(sel, window)),
        error_rate=await client.query(q.error_rate(sel, window)),
        tokens_per_second=await client.query(q.tokens_per_second(sel, window)),
        requests_per_second=await client.query(q.request_rate(sel, window)),
    )
