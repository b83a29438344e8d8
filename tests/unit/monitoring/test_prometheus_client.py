"""The Prometheus query client against a stub of Prometheus' HTTP API (aiohttp on loopback): values, no
data and NaN as None (never 0), errors as PrometheusError with whether a retry can help."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web

from distillery_operator.monitoring import promql as q
from distillery_operator.monitoring.prometheus import PrometheusClient, PrometheusError, measure

Answer = Callable[[str], tuple[int, dict[str, Any]]]


def vector(*values: float) -> dict[str, Any]:
    result = [{"metric": {"model_name": f"m{i}"}, "value": [1700000000, str(v)]} for i, v in enumerate(values)]
    return {"status": "success", "data": {"resultType": "vector", "result": result}}


@pytest.fixture
async def stub() -> AsyncIterator[tuple[PrometheusClient, list[str], dict[str, Answer]]]:
    asked: list[str] = []
    answer: dict[str, Answer] = {"fn": lambda query: (200, vector(1.5))}

    async def handle(request: web.Request) -> web.Response:
        asked.append(request.query["query"])
        status, body = answer["fn"](request.query["query"])
        return web.json_response(body, status=status)

    app = web.Application()
    app.router.add_get("/api/v1/query", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield PrometheusClient(f"http://127.0.0.1:{port}/", timeout_s=5), asked, answer
    await runner.cleanup()


async def test_a_single_sample_is_its_value(stub):
    client, asked, _ = stub
    assert await client.query("up") == 1.5
    assert asked == ["up"]


@pytest.mark.parametrize("body", [vector(), vector(math.nan)], ids=["no-sample", "nan"])
async def test_no_data_is_none_not_zero(stub, body):
    client, _, answer = stub
    answer["fn"] = lambda query: (200, body)
    assert await client.query("x") is None


async def test_a_bad_query_is_not_transient_and_an_outage_is(stub):
    client, _, answer = stub
    answer["fn"] = lambda query: (400, {"status": "error", "errorType": "bad_data", "error": "parse error"})
    with pytest.raises(PrometheusError, match="parse error") as refused:
        await client.query("sum(")
    assert refused.value.transient is False
    answer["fn"] = lambda query: (503, {"status": "error", "error": "overloaded"})
    with pytest.raises(PrometheusError) as busy:
        await client.query("up")
    assert busy.value.transient is True
    answer["fn"] = lambda query: (200, vector(1, 2))
    with pytest.raises(PrometheusError, match="2 series"):
        await client.query("up")


async def test_unreachable_prometheus_is_a_transient_error():
    client = PrometheusClient("http://127.0.0.1:9", timeout_s=2)  # discard port: nothing listens
    with pytest.raises(PrometheusError) as exc:
        await client.query("up")
    assert exc.value.transient


async def test_measure_asks_the_revision_s_own_series(stub):
    client, asked, answer = stub
    values = {"duration": 0.8, "status=~": 0.002, "generated": 55.0}

    def fn(query: str) -> tuple[int, dict[str, Any]]:
        for key, value in values.items():
            if key in query:
                return 200, vector(value)
        return 200, vector(3.0)  # requests per second

    answer["fn"] = fn
    sel = q.Selector(model="m", namespace="ns", pod_regex=q.revision_pods("m", "00002"))
    got = await measure(client, sel, "2m")
    assert (got.p99_latency_seconds, got.error_rate, got.tokens_per_second, got.requests_per_second) == (
        0.8, 0.002, 55.0, 3.0)
    assert all('pod=~"m-predictor-00002-.*"' in query and "[2m]" in query for query in asked)
