"""The operator's SLO queries against a real Prometheus (Debian's `prometheus` binary) scraping a live
runtime that served a known mix of requests: `measure()` must return the P99 and the error rate those
requests produced.

The mix: short requests that succeed (200) and long ones the runtime's engine cuts off at
--request_timeout_s (504, a server error: the error rate's numerator). Every series exists before
Prometheus' first scrape (a warm-up of each kind), so rate() over the window sees the whole mix and none
of it hides in a series' first sample. The warm-up is the mix scaled by 1/3: rate() extrapolates a
counter towards the window's start by at most the time it would take to reach zero, which depends on
first value / increase; equal for both status series, their ratio (the error rate) comes out exact.
The expected P99 is histogram_quantile computed here, from the runtime's own /metrics, over the mix's
observations; the buckets' first values differ (below the warm-up's latencies they are 0), so their
extrapolations differ slightly and the P99 is checked to its bucket and a fraction of the bucket's width.
It must also agree with what the client measured: no higher than the bucket of the slowest answer the
client saw.
"""

from __future__ import annotations

import asyncio
import math
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from distillery_contract import flags, metric_names
from distillery_operator.monitoring import promql
from distillery_operator.monitoring.prometheus import PrometheusClient, measure
from tests.live_runtime import free_port, live_runtime
from tests.runtime_fixtures import build_tiny_qwen2_dir

PROMETHEUS = shutil.which("prometheus") or shutil.which("prometheus", path="/usr/bin")
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(PROMETHEUS is None, reason="the `prometheus` binary is not installed (Debian "
                       "package `prometheus`; `make promtool` installs it as root with apt)"),
]

MODEL = "tiny-r1"
ENGINE_TIMEOUT_S = 1.0  # the runtime's --request_timeout_s: a long generation ends in 504
SHORT = {"max_tokens": 1, "temperature": 0}  # well within the timeout
LONG = {"max_tokens": 480, "temperature": 0}  # hundreds of decode steps: far beyond it
N_OK, N_FAIL = 12, 3
WARM_OK, WARM_FAIL = 4, 1  # the mix / 3: see the module docstring
LATENCY = metric_names.METRIC_REQUEST_LATENCY


@pytest.fixture(scope="module")
def runtime(tmp_path_factory, r1_tokenizer_dir):
    model_dir = build_tiny_qwen2_dir(tmp_path_factory.mktemp("tiny-qwen2"), r1_tokenizer_dir)
    extra = [f"{flags.FLAG_MAX_MODEL_LEN}=512", f"{flags.FLAG_MAX_BATCH_SIZE}=4", f"{flags.FLAG_MAX_QUEUE}=8",
             f"--request_timeout_s={ENGINE_TIMEOUT_S}"]
    with live_runtime(model_dir, MODEL, tmp_path_factory.mktemp("runtime") / "server.log", extra) as base:
        yield base


@contextmanager
def running_prometheus(target: str, workdir: Path) -> Iterator[str]:
    """Prometheus on a free loopback port scraping `target` (host:port) every second; always stopped."""
    assert PROMETHEUS is not None
    config = workdir / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: runtime\n    scrape_timeout: 1s\n    metrics_path: {flags.METRICS_PATH}\n"
        f"    static_configs: [{{targets: ['{target}']}}]\n"
    )
    port = free_port()
    log = (workdir / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT, cwd=workdir,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                log_text = (workdir / "prometheus.log").read_text()
                raise RuntimeError(f"prometheus not ready (exit {proc.poll()}):\n{log_text}")
            try:
                if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def scrape(base: str) -> tuple[Counter[str], dict[float, float]]:
    """The runtime's request counts by status and its latency histogram (upper bound -> cumulative count)."""
    statuses: Counter[str] = Counter()
    buckets: dict[float, float] = {}
    text = httpx.get(base + flags.METRICS_PATH, timeout=5).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get(metric_names.METRIC_LABEL_MODEL) != MODEL:
                continue
            if s.name == metric_names.METRIC_REQUESTS_TOTAL:
                statuses[s.labels["status"]] += int(s.value)
            elif s.name == LATENCY + "_bucket":
                buckets[float(s.labels["le"])] = s.value
    return statuses, buckets


def histogram_quantile(q: float, buckets: dict[float, float]) -> float:
    """Prometheus' histogram_quantile over cumulative buckets (promql/quantile.go, bucketQuantile)."""
    bounds = sorted(buckets)
    assert bounds[-1] == math.inf
    rank = q * buckets[math.inf]
    b = next(i for i, le in enumerate(bounds) if buckets[le] >= rank)
    if b == len(bounds) - 1:
        return bounds[-2]
    start, below = (bounds[b - 1], buckets[bounds[b - 1]]) if b else (0.0, 0.0)
    return start + (bounds[b] - start) * (rank - below) / (buckets[bounds[b]] - below)


def bucket_of(value: float, bounds: list[float]) -> tuple[float, float]:
    """(lower, upper]: the histogram bucket `value` falls in."""
    upper = next(le for le in sorted(bounds) if value <= le)
    lower = max([le for le in bounds if le < upper], default=0.0)
    return lower, upper


def chat(base: str, params: dict) -> tuple[int, float]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "What is 2+2?"}], **params}
    start = time.monotonic()
    status = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60).status_code
    return status, time.monotonic() - start


def query(url: str, promql_text: str) -> float | None:
    return asyncio.run(PrometheusClient(url, timeout_s=5).query(promql_text))


def wait_for(url: str, promql_text: str, value: float, timeout_s: float = 15.0) -> None:
    """Block until Prometheus has scraped the state in which `promql_text` is `value`."""
    deadline = time.monotonic() + timeout_s
    while (got := query(url, promql_text)) != value:
        if time.monotonic() > deadline:
            pytest.fail(f"Prometheus never saw {promql_text} == {value} (last: {got})")
        time.sleep(0.25)


def test_measure_returns_the_p99_and_error_rate_the_requests_produced(runtime, tmp_path):
    # warm-up: the 200 and 504 series exist before the first scrape
    warm_up = Counter(str(chat(runtime, p)[0]) for p in [SHORT] * WARM_OK + [LONG] * WARM_FAIL)
    assert warm_up == {"200": WARM_OK, "504": WARM_FAIL}, f"the warm-up did not go as planned: {warm_up}"
    before_status, before_buckets = scrape(runtime)
    total_requests = f'sum({metric_names.METRIC_REQUESTS_TOTAL}{{model_name="{MODEL}"}})'

    target = runtime.removeprefix("http://")
    with running_prometheus(target, tmp_path) as url:
        wait_for(url, total_requests, float(sum(before_status.values())))  # scraped before any of the mix
        time.sleep(1.1)  # and once more: the window's first samples are the warm-up's counts
        # the mix: the long requests together (they share the batch and all run out of time), then the short
        with ThreadPoolExecutor(N_FAIL) as pool:
            failed = list(pool.map(lambda _: chat(runtime, LONG), range(N_FAIL)))
        succeeded = [chat(runtime, SHORT) for _ in range(N_OK)]
        client = Counter(str(status) for status, _ in failed + succeeded)
        assert client == {"504": N_FAIL, "200": N_OK}, f"the mix did not come out as planned: {client}"
        after_status, after_buckets = scrape(runtime)
        assert after_status - before_status == client  # the runtime counted exactly what was sent
        wait_for(url, total_requests, float(sum(after_status.values())))
        time.sleep(1.1)

        client_of_prometheus = PrometheusClient(url, timeout_s=5)
        measured = asyncio.run(measure(client_of_prometheus, promql.Selector(model=MODEL), "5m"))

    mix = {le: after_buckets[le] - before_buckets.get(le, 0.0) for le in after_buckets}
    expected_p99 = histogram_quantile(0.99, mix)
    print(f"measured {measured}; expected P99 {expected_p99:.4f} from the mix's buckets {mix}")  # on failure
    # error rate: the 504s over every request of the mix (the warm-up precedes the window's first sample)
    assert measured.error_rate == pytest.approx(N_FAIL / (N_OK + N_FAIL))
    # P99: Prometheus' answer matches histogram_quantile over the mix's own observations (only the 200s:
    # the runtime observes the latency of answered requests) ...
    assert mix[math.inf] == N_OK
    bounds = [le for le in mix if le != math.inf]
    lower, upper = bucket_of(expected_p99, bounds)
    assert measured.p99_latency_seconds is not None and lower < measured.p99_latency_seconds <= upper
    assert measured.p99_latency_seconds == pytest.approx(expected_p99, abs=0.2 * (upper - lower))
    # ... and agrees with the client's stopwatch: a server-side duration is never longer than the client's,
    # so the P99 is at most the upper bound of the slowest client-measured answer's bucket, and the bucket
    # the P99 falls in starts below that slowest answer
    slowest = max(seconds for _, seconds in succeeded)
    assert measured.p99_latency_seconds <= bucket_of(slowest, bounds)[1]
    assert lower < slowest
    assert measured.requests_per_second is not None and measured.requests_per_second > 0
    assert measured.tokens_per_second is not None and measured.tokens_per_second > 0
