"""Metric names and labels are the contract's; the engine's step stats land in the gauges."""

from __future__ import annotations

from types import SimpleNamespace

from prometheus_client import CollectorRegistry, generate_latest

from distillery_contract import metric_names
from model_runtime.metrics import EngineMetrics, RuntimeMetrics


def test_engine_step_stats_set_the_gauges():
    registry = CollectorRegistry()
    EngineMetrics("m", registry).observe_step(
        SimpleNamespace(queue_depth=3, running=5, kv_cache_usage=0.25, tokens_per_s=42.0))
    value = lambda name: registry.get_sample_value(name, {metric_names.METRIC_LABEL_MODEL: "m"})  # noqa: E731
    assert value(metric_names.METRIC_QUEUE_DEPTH) == 3
    assert value(metric_names.METRIC_RUNNING_SEQUENCES) == 5
    assert value(metric_names.METRIC_KV_CACHE_USAGE) == 0.25
    assert value(metric_names.METRIC_TOKENS_PER_SECOND) == 42.0


def test_every_contract_metric_is_exported_with_the_model_label():
    registry = CollectorRegistry()
    metrics = RuntimeMetrics("m", registry)
    metrics.request_started()
    metrics.first_token(0.2)
    metrics.tokens(prompt=7, generated=11)
    metrics.rejected()
    metrics.error("queue_full")
    metrics.request_finished("chat", 200, 1.5)
    metrics.observe_step(SimpleNamespace(queue_depth=0, running=0, kv_cache_usage=0.0, tokens_per_s=0.0))
    text = generate_latest(registry).decode()
    names = [v for k, v in vars(metric_names).items() if k.startswith("METRIC_") and v.startswith("distillery_")]
    for name in names:
        suffix = "_bucket" if name in (metric_names.METRIC_TIME_TO_FIRST_TOKEN, metric_names.METRIC_REQUEST_LATENCY) else ""
        lines = [line for line in text.splitlines() if line.startswith(f"{name}{suffix}{{")]
        assert lines and all(f'{metric_names.METRIC_LABEL_MODEL}="m"' in line for line in lines), name
    assert registry.get_sample_value(metric_names.METRIC_GENERATED_TOKENS_TOTAL, {"model_name": "m"}) == 11
    assert registry.get_sample_value(metric_names.METRIC_REQUESTS_IN_FLIGHT, {"model_name": "m"}) == 0


def test_metrics_are_created_once_per_registry():
    registry = CollectorRegistry()
    RuntimeMetrics("a", registry)
    RuntimeMetrics("b", registry)  # a second model (or a re-created server) must not raise "duplicated"


def test_a_new_registry_never_inherits_a_collected_ones_collectors():
    """Python reuses the id() of a collected object: collectors cached by id would hand a new registry
    the dead one's series, and nothing recorded would show up in it (a flaky failure of the 429 test).
    So no cache entry may outlive its registry, and every fresh registry sees what is recorded."""
    import gc

    from model_runtime import metrics

    gc.collect()
    # What the suite has loaded so far (torch, models, earlier tests' objects) sits out the collections below: each
    # full pass over it took ~0.5 s, 60 of them half a minute. Everything this test creates is still collected.
    gc.freeze()
    try:
        cached = len(metrics._collectors)
        for i in range(30):
            registry = CollectorRegistry()
            RuntimeMetrics("m", registry)
            del registry
            gc.collect()
            assert len(metrics._collectors) == cached, "a collected registry's collectors are still cached"
            fresh = CollectorRegistry()  # often gets the collected one's id
            RuntimeMetrics("m", fresh).rejected()
            assert fresh.get_sample_value(metric_names.METRIC_QUEUE_REJECTED_TOTAL, {"model_name": "m"}) == 1, i
            del fresh
            gc.collect()
    finally:
        gc.unfreeze()


def test_prefix_cache_totals_advance_the_counters_and_set_the_gauges():
    registry = CollectorRegistry()
    metrics = EngineMetrics("m", registry)
    value = lambda name: registry.get_sample_value(name, {metric_names.METRIC_LABEL_MODEL: "m"})  # noqa: E731
    assert value(metric_names.METRIC_PREFIX_CACHE_QUERIES_TOTAL) == 0  # exported before the first request
    for queries, hits in ((100, 0), (250, 64), (250, 64)):  # the engine's running totals, step by step
        metrics.observe_step(SimpleNamespace(prefix_cache_query_tokens=queries, prefix_cache_hit_tokens=hits,
                                             prefix_cache_blocks=7, prefix_cache_capacity_blocks=512))
    assert value(metric_names.METRIC_PREFIX_CACHE_QUERIES_TOTAL) == 250
    assert value(metric_names.METRIC_PREFIX_CACHE_HITS_TOTAL) == 64
    assert value(metric_names.METRIC_PREFIX_CACHE_BLOCKS) == 7
    assert value(metric_names.METRIC_PREFIX_CACHE_CAPACITY_BLOCKS) == 512
    # a restarted engine reports totals from 0 again: counters never go back, they count its new tokens
    metrics.observe_step(SimpleNamespace(prefix_cache_query_tokens=30, prefix_cache_hit_tokens=16))
    assert value(metric_names.METRIC_PREFIX_CACHE_QUERIES_TOTAL) == 280
    assert value(metric_names.METRIC_PREFIX_CACHE_HITS_TOTAL) == 80
