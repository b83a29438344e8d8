"""The Grafana dashboard the chart ships (a ConfigMap with the Grafana sidecar's label,
`monitoring.dashboard.enabled`), built from `promql`: QPS, P99 and time to first token, tokens/s, queue
depth, running sequences, KV use, 429s, GPU use, replicas, the response cache's hit ratio and the prefix
cache's, per model (a `model` variable)."""

from __future__ import annotations

from typing import Any

from . import promql as q

UID = "distillery-models"
TITLE = "Distillery: models"
MODEL_VAR = q.Selector(extra=('namespace=~"$namespace"', 'model_name=~"$model"'))
BY = ("model_name",)


def _panel(pid: int, title: str, expr: str, unit: str, x: int, y: int, legend: str = "{{model_name}}") -> dict[str, Any]:
    return {
        "id": pid, "type": "timeseries", "title": title, "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": 12, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [{"refId": "A", "expr": expr, "legendFormat": legend}],
    }


def panels() -> list[tuple[str, str, str, str]]:
    """(title, PromQL, unit, legend) of every panel, in order."""
    w = "$__rate_interval"
    return [
        ("Requests per second", q.request_rate(MODEL_VAR, w, BY), "reqps", "{{model_name}}"),
        ("P99 latency", q.p99_latency(MODEL_VAR, w, BY), "s", "{{model_name}}"),
        ("Time to first token p50 / p99", q.ttft(0.5, MODEL_VAR, w, BY), "s", "{{model_name}} p50"),
        ("Time to first token p99", q.ttft(0.99, MODEL_VAR, w, BY), "s", "{{model_name}} p99"),
        ("Generated tokens per second", q.tokens_per_second(MODEL_VAR, w, BY), "short", "{{model_name}}"),
        ("Queue depth", q.queue_depth(MODEL_VAR, BY), "short", "{{model_name}}"),
        ("Running sequences", q.running_sequences(MODEL_VAR, BY), "short", "{{model_name}}"),
        ("KV cache use (fullest replica)", q.kv_cache_usage(MODEL_VAR, BY), "percentunit", "{{model_name}}"),
        ("429s per second", q.rejected_rate(MODEL_VAR, w, BY), "reqps", "{{model_name}}"),
        ("Error rate (5xx)", q.error_rate(MODEL_VAR, w, BY), "percentunit", "{{model_name}}"),
        ("GPU utilisation", q.gpu_utilization("$model-predictor-.*"), "percent", "{{pod}}"),
        ("Replicas", q.replicas(MODEL_VAR, BY), "short", "{{model_name}}"),
        ("Response cache hit ratio", q.response_cache_hit_ratio(MODEL_VAR, w, BY), "percentunit", "{{model_name}}"),
        ("Prefix cache hit rate (prompt tokens)", q.prefix_cache_hit_ratio(MODEL_VAR, w, BY), "percentunit",
         "{{model_name}}"),
    ]


def _variable(name: str, query: str, label: str) -> dict[str, Any]:
    return {
        "name": name, "label": label, "type": "query", "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "query": {"query": query, "refId": name}, "definition": query,
        "includeAll": True, "multi": True, "refresh": 2, "current": {},
    }


def dashboard() -> dict[str, Any]:
    built = [_panel(i + 1, title, expr, unit, (i % 2) * 12, (i // 2) * 8, legend)
             for i, (title, expr, unit, legend) in enumerate(panels())]
    return {
        "uid": UID, "title": TITLE, "tags": ["distillery", "llm"], "schemaVersion": 39, "version": 1,
        "time": {"from": "now-3h", "to": "now"}, "refresh": "30s", "editable": True,
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus", "current": {}, "label": "Prometheus"},
            _variable("namespace", "label_values(distillery_requests_total, namespace)", "Namespace"),
            _variable("model", 'label_values(distillery_requests_total{namespace=~"$namespace"}, model_name)', "Model"),
        ]},
        "panels": built,
    }
