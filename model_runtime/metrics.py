"""Prometheus metrics of the runtime, named once in distillery_contract.metric_names.

KServe's ModelServer already serves prometheus_client's default REGISTRY on /metrics, so the
collectors are registered there (tests pass a private CollectorRegistry). Every series carries the
`model_name` label the chart's KEDA query selects on.

Two faces:
- EngineMetrics.observe_step(stats): called by the engine after each step with its EngineStats
  (queue_depth, running, kv_cache_usage, tokens_per_s, the prefix cache's totals); gauges, and the
  prefix cache's token counters advanced by the engine's running totals.
- RuntimeMetrics: adds the per-request series the HTTP layer records (requests, errors, TTFT,
  latency, tokens, in-flight, 429s) and the response cache's (lookups, stores, evictions, size).
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from distillery_contract import metric_names

LABEL = metric_names.METRIC_LABEL_MODEL
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

_lock = threading.Lock()
# keyed by the registry itself, weakly: an id() key outlives its registry and Python reuses ids, so a new
# registry could be handed a dead one's collectors (registered nowhere it can see)
_collectors: weakref.WeakKeyDictionary[CollectorRegistry, dict[str, Any]] = weakref.WeakKeyDictionary()


def _build(registry: CollectorRegistry) -> dict[str, Any]:
    def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
        # prometheus_client appends "_total" to counters itself; give it the bare name.
        return Counter(name.removesuffix("_total"), doc, (LABEL, *labels), registry=registry)

    def gauge(name: str, doc: str) -> Gauge:
        return Gauge(name, doc, (LABEL,), registry=registry)

    return {
        "requests": counter(metric_names.METRIC_REQUESTS_TOTAL, "HTTP requests served", ("endpoint", "status")),
        "errors": counter(metric_names.METRIC_REQUEST_ERRORS_TOTAL, "Failed requests by error type", ("type",)),
        "ttft": Histogram(
            metric_names.METRIC_TIME_TO_FIRST_TOKEN, "Time from request arrival to its first generated token",
            (LABEL,), buckets=TTFT_BUCKETS, registry=registry,
        ),
        "latency": Histogram(
            metric_names.METRIC_REQUEST_LATENCY, "Time from request arrival to its last token",
            (LABEL,), buckets=LATENCY_BUCKETS, registry=registry,
        ),
        "generated": counter(metric_names.METRIC_GENERATED_TOKENS_TOTAL, "Generated (completion) tokens"),
        "prompt": counter(metric_names.METRIC_PROMPT_TOKENS_TOTAL, "Prompt tokens processed"),
        "in_flight": gauge(metric_names.METRIC_REQUESTS_IN_FLIGHT, "Generation requests being served"),
        "queue_depth": gauge(metric_names.METRIC_QUEUE_DEPTH, "Requests waiting for a batch slot"),
        "running": gauge(metric_names.METRIC_RUNNING_SEQUENCES, "Sequences in the running batch"),
        "kv_usage": gauge(metric_names.METRIC_KV_CACHE_USAGE, "KV cache use, 0..1"),
        "kv_bytes": gauge(metric_names.METRIC_KV_CACHE_BYTES, "KV cache bytes holding live tokens"),
        "gpu_memory": gauge(metric_names.METRIC_GPU_MEMORY_BYTES, "GPU memory held by the runtime (0 on CPU)"),
        "tokens_per_s": gauge(metric_names.METRIC_TOKENS_PER_SECOND, "Decode rate over the last window"),
        "rejected": counter(metric_names.METRIC_QUEUE_REJECTED_TOTAL, "Requests rejected with 429 (queue full)"),
        # prefix cache (prefix_cache.py, the engine's)
        "prefix_queries": counter(metric_names.METRIC_PREFIX_CACHE_QUERIES_TOTAL,
                                  "Prompt tokens looked up in the prefix cache"),
        "prefix_hits": counter(metric_names.METRIC_PREFIX_CACHE_HITS_TOTAL,
                               "Prompt tokens served from the prefix cache (not computed)"),
        "prefix_blocks": gauge(metric_names.METRIC_PREFIX_CACHE_BLOCKS, "KV blocks in the prefix cache"),
        "prefix_capacity": gauge(metric_names.METRIC_PREFIX_CACHE_CAPACITY_BLOCKS,
                                 "KV blocks the prefix cache's pool holds (0: prefix caching is off)"),
        # response cache (response_cache.py)
        "cache_lookups": counter(metric_names.METRIC_RESPONSE_CACHE_LOOKUPS_TOTAL,
                                 "OpenAI requests by response-cache result (hit, miss, bypass)", ("result",)),
        "cache_stores": counter(metric_names.METRIC_RESPONSE_CACHE_STORES_TOTAL, "Responses cached"),
        "cache_evictions": counter(metric_names.METRIC_RESPONSE_CACHE_EVICTIONS_TOTAL,
                                   "Cached responses dropped (expired, entries, bytes)", ("reason",)),
        "cache_entries": gauge(metric_names.METRIC_RESPONSE_CACHE_ENTRIES, "Responses in the cache"),
        "cache_bytes": gauge(metric_names.METRIC_RESPONSE_CACHE_BYTES, "Bytes of cached responses and keys"),
    }


def collectors(registry: CollectorRegistry | None = None) -> dict[str, Any]:
    """The runtime's collectors in `registry`, created once per registry."""
    registry = REGISTRY if registry is None else registry
    with _lock:
        if registry not in _collectors:
            _collectors[registry] = _build(registry)
        return _collectors[registry]


class EngineMetrics:
    """What the engine sees: one call per scheduler step."""

    def __init__(self, model_name: str, registry: CollectorRegistry | None = None) -> None:
        self.model_name = model_name
        c = collectors(registry)
        self._queue_depth = c["queue_depth"].labels(model_name)
        self._running = c["running"].labels(model_name)
        self._kv_usage = c["kv_usage"].labels(model_name)
        self._kv_bytes = c["kv_bytes"].labels(model_name)
        self._gpu_memory = c["gpu_memory"].labels(model_name)
        self._tokens_per_s = c["tokens_per_s"].labels(model_name)
        self._prefix_queries = c["prefix_queries"].labels(model_name)
        self._prefix_hits = c["prefix_hits"].labels(model_name)
        self._prefix_blocks = c["prefix_blocks"].labels(model_name)
        self._prefix_capacity = c["prefix_capacity"].labels(model_name)
        self._prefix_seen = (0, 0)  # the engine's cumulative (query, hit) tokens already counted

    def observe_step(self, stats: Any) -> None:
        """Copy an EngineStats (queue_depth, running, kv_cache_usage, tokens_per_s) into the gauges."""
        self._queue_depth.set(getattr(stats, "queue_depth", 0) or 0)
        self._running.set(getattr(stats, "running", 0) or 0)
        self._kv_usage.set(getattr(stats, "kv_cache_usage", 0.0) or 0.0)
        self._kv_bytes.set(getattr(stats, "kv_cache_bytes", 0) or 0)
        self._gpu_memory.set(getattr(stats, "gpu_memory_bytes", 0) or 0)
        self._tokens_per_s.set(getattr(stats, "tokens_per_s", 0.0) or 0.0)
        # the engine keeps running totals: the counters advance by what is new since the last step
        queries = getattr(stats, "prefix_cache_query_tokens", 0) or 0
        hits = getattr(stats, "prefix_cache_hit_tokens", 0) or 0
        seen_queries, seen_hits = self._prefix_seen
        if queries < seen_queries:  # a new engine behind the same metrics: its totals start at 0
            seen_queries = seen_hits = 0
        self._prefix_queries.inc(queries - seen_queries)
        self._prefix_hits.inc(max(0, hits - seen_hits))
        self._prefix_seen = (queries, hits)
        self._prefix_blocks.set(getattr(stats, "prefix_cache_blocks", 0) or 0)
        self._prefix_capacity.set(getattr(stats, "prefix_cache_capacity_blocks", 0) or 0)


class RuntimeMetrics(EngineMetrics):
    """Engine gauges plus the per-request series recorded by the serving layer."""

    def __init__(self, model_name: str, registry: CollectorRegistry | None = None) -> None:
        super().__init__(model_name, registry)
        self._c = collectors(registry)
        self._in_flight = self._c["in_flight"].labels(model_name)
        self._ttft = self._c["ttft"].labels(model_name)
        self._latency = self._c["latency"].labels(model_name)
        self._generated = self._c["generated"].labels(model_name)
        self._prompt = self._c["prompt"].labels(model_name)
        self._rejected = self._c["rejected"].labels(model_name)
        # every label value exported from the start (at 0), so rate() and ratios work before the first hit
        self._cache_lookups = {r: self._c["cache_lookups"].labels(model_name, r)
                               for r in ("hit", "miss", "bypass")}
        self._cache_evictions = {r: self._c["cache_evictions"].labels(model_name, r)
                                 for r in ("expired", "entries", "bytes")}
        self._cache_stores = self._c["cache_stores"].labels(model_name)
        self._cache_entries = self._c["cache_entries"].labels(model_name)
        self._cache_bytes = self._c["cache_bytes"].labels(model_name)

    def request_started(self) -> None:
        self._in_flight.inc()

    def request_finished(self, endpoint: str, status: int, latency_s: float | None = None) -> None:
        self._in_flight.dec()
        self._c["requests"].labels(self.model_name, endpoint, str(status)).inc()
        if latency_s is not None and status < 400:
            self._latency.observe(latency_s)

    def error(self, error_type: str) -> None:
        self._c["errors"].labels(self.model_name, error_type).inc()

    def rejected(self) -> None:
        self._rejected.inc()

    def first_token(self, seconds: float) -> None:
        self._ttft.observe(seconds)

    def tokens(self, prompt: int, generated: int) -> None:
        self._prompt.inc(prompt)
        self._generated.inc(generated)

    # ---- response cache (response_cache.ResponseCache calls these)
    def response_cache_lookup(self, result: str) -> None:
        self._cache_lookups[result].inc()

    def response_cache_stored(self) -> None:
        self._cache_stores.inc()

    def response_cache_evicted(self, reason: str) -> None:
        self._cache_evictions[reason].inc()

    def response_cache_size(self, entries: int, nbytes: int) -> None:
        self._cache_entries.set(entries)
        self._cache_bytes.set(nbytes)
