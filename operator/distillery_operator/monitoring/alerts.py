"""The alert rules the chart ships (a PrometheusRule, `monitoring.alerts.enabled`), built from `promql`.

Each alert groups by namespace and model so one page names the model. The thresholds are the platform's
defaults in `Thresholds`, written into the expressions when `make manifests` generates the chart's file
(a team that wants others adds its own PrometheusRule).
`promtool check rules` and a `promtool test rules` case per alert (fires / stays quiet) run in the tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import promql as q

GROUP_NAME = "distillery.rules"


@dataclass(frozen=True)
class Thresholds:
    p99_latency_seconds: float = 2.0  # the platform's latency SLO: P99 over 2 s for 5 minutes
    error_rate: float = 0.01  # 1% of requests answered 5xx
    kv_cache_usage: float = 0.95
    gpu_utilization_percent: float = 95.0
    window: str = "5m"


def _alert(name: str, expr: str, duration: str, severity: str, summary: str, description: str) -> dict[str, Any]:
    return {
        "alert": name,
        "expr": expr,
        "for": duration,
        "labels": {"severity": severity, "part_of": "distillery"},
        "annotations": {"summary": summary, "description": description},
    }


def alert_rules(t: Thresholds = Thresholds()) -> list[dict[str, Any]]:
    by = q.BY_MODEL
    w = t.window
    return [
        _alert("DistilleryHighP99Latency", f"{q.p99_latency(window=w, by=by)} > {t.p99_latency_seconds}", "5m",
               "warning", "Model {{ $labels.model_name }} P99 latency above " + f"{t.p99_latency_seconds}s",
               "P99 request latency of {{ $labels.namespace }}/{{ $labels.model_name }} is {{ $value | humanizeDuration }}."),
        _alert("DistilleryHighErrorRate", f"{q.error_rate(window=w, by=by)} > {t.error_rate}", "5m", "critical",
               "Model {{ $labels.model_name }} answers 5xx",
               "{{ $value | humanizePercentage }} of requests to {{ $labels.namespace }}/{{ $labels.model_name }} "
               "ended in a server error."),
        _alert("DistilleryQueueSaturated", f"{q.rejected_rate(window=w, by=by)} > 0", "5m", "warning",
               "Model {{ $labels.model_name }} refuses requests (429)",
               "Batch and queue of {{ $labels.namespace }}/{{ $labels.model_name }} are full: "
               "{{ $value | humanize }} requests/s answered 429. Raise maxReplicas or maxQueue."),
        _alert("DistilleryKVCacheFull", f"{q.kv_cache_usage(by=by)} > {t.kv_cache_usage}", "10m", "warning",
               "Model {{ $labels.model_name }} KV cache nearly full",
               "A replica of {{ $labels.namespace }}/{{ $labels.model_name }} uses {{ $value | humanizePercentage }} "
               "of its KV cache."),
        _alert("DistilleryGPUSaturated", f"{q.gpu_utilization()} > {t.gpu_utilization_percent}", "15m", "info",
               "GPU of {{ $labels.pod }} saturated",
               "{{ $labels.namespace }}/{{ $labels.pod }} has used its GPU above "
               f"{t.gpu_utilization_percent:g}% for 15 minutes; more replicas would cut latency."),
        _alert("DistilleryModelFailed", f'sum({q.OPERATOR_MODELS}{{phase="Failed"}}) > 0', "5m", "critical",
               "A DistilledModel is Failed",
               "{{ $value }} DistilledModel(s) in phase Failed: kubectl get dm -A shows which and why."),
        _alert("DistilleryOperatorReconcileErrors",
               f'sum(increase({q.OPERATOR_RECONCILE_ERRORS}{{kind="error"}}[15m])) > 0', "5m", "warning",
               "The Distillery operator fails to reconcile",
               "{{ $value | humanize }} reconciles ended in an unexpected error in 15 minutes; see the operator's log."),
        _alert("DistilleryRolloutRolledBack",
               f'sum by (namespace, model) (increase({q.OPERATOR_ROLLOUTS}{{outcome="rolled_back"}}[1h])) > 0', "0m",
               "warning", "Rollout of {{ $labels.namespace }}/{{ $labels.model }} rolled back",
               "A new model server for {{ $labels.namespace }}/{{ $labels.model }} failed its rollout gate and the "
               "stable revision serves again: kubectl get dm {{ $labels.model }} -n {{ $labels.namespace }} "
               "-o jsonpath='{.status.rollout}' says which gate and the measured numbers."),
    ]


def rule_groups(t: Thresholds = Thresholds()) -> list[dict[str, Any]]:
    """The PrometheusRule's spec.groups (also a valid `promtool check rules` file as {"groups": ...})."""
    return [{"name": GROUP_NAME, "rules": alert_rules(t)}]
