"""The operator's own Prometheus metrics: reconciles, their duration, API errors, models by phase, rollouts.

Served on DISTILLERY_METRICS_PORT by `serve()` (prometheus_client's HTTP server runs in its own
thread, so scrapes never touch the event loop).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RECONCILES = Counter(
    "distillery_operator_reconciles_total",
    "Reconciles of DistilledModels, by what triggered them and how they ended",
    ["trigger", "result"],
)
RECONCILE_ERRORS = Counter(
    "distillery_operator_reconcile_errors_total",
    "Reconciles that ended in an error (retry: transient, invalid: the spec was refused, error: a bug)",
    ["trigger", "kind"],
)
RECONCILE_DURATION = Histogram(
    "distillery_operator_reconcile_duration_seconds",
    "Wall time of one reconcile, API calls included",
    ["trigger"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
API_ERRORS = Counter(
    "distillery_operator_api_errors_total",
    "Failed Kubernetes API calls by HTTP status (0: no answer)",
    ["status"],
)
MODELS_BY_PHASE = Gauge(
    "distillery_operator_models",
    "DistilledModels known to this operator, by phase",
    ["phase"],
)

ROLLOUTS = Counter(
    "distillery_operator_rollouts_total",
    "Stepped rollouts of a new model server, by how they went (started, promoted, rolled_back)",
    ["namespace", "model", "outcome"],
)

ERROR_RESULTS = frozenset({"retry", "invalid", "error"})


def observe_reconcile(trigger: str, result: str, seconds: float) -> None:
    RECONCILES.labels(trigger, result).inc()
    RECONCILE_DURATION.labels(trigger).observe(seconds)
    if result in ERROR_RESULTS:
        RECONCILE_ERRORS.labels(trigger, result).inc()


_phases: dict[tuple[str, str], str] = {}


def set_phase(namespace: str, name: str, phase: str | None) -> None:
    """Remember a model's phase; the gauge counts models per phase."""
    old = _phases.get((namespace, name))
    if phase == old:
        return
    if old is not None:
        MODELS_BY_PHASE.labels(old).dec()
    if phase is None:
        _phases.pop((namespace, name), None)
        return
    _phases[(namespace, name)] = phase
    MODELS_BY_PHASE.labels(phase).inc()


def forget_model(namespace: str, name: str) -> None:
    set_phase(namespace, name, None)


def serve(port: int) -> None:
    """Start the metrics endpoint (0: off)."""
    if port:
        start_http_server(port)
