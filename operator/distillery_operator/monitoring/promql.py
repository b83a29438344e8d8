"""The PromQL behind every serving figure, written once.

The rollout controller's SLO gates, the chart's PrometheusRule and its Grafana dashboard all build their
queries here, from the metric names in `distillery_contract.metric_names`, so an alert, a panel and a
promotion decision can never measure three different things.

A `Selector` narrows a query to one model, one namespace, or the pods of one revision (a canary's own
pods: `pod=~"NAME-predictor-00002-.*"`), and `by` chooses the grouping (alerts group by namespace and
model; gates reduce to one number). Label values are escaped; regexes are passed through as given.
"""

from __future__ import annotations

from dataclasses import dataclass

from distillery_contract import metric_names as m

# Status codes that count as failures of the server (not the client's 4xx, not 429 back-pressure).
SERVER_ERROR_STATUS = "5.."
REJECTED_STATUS = "429"


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True)
class Selector:
    """Which series a query reads: a model, a namespace, a pod regex (a revision's pods), raw matchers."""

    model: str | None = None
    namespace: str | None = None
    pod_regex: str | None = None
    extra: tuple[str, ...] = ()  # raw matchers, e.g. ('model_name=~"$model"',) for dashboard variables

    def matchers(self, *more: str) -> str:
        parts = []
        if self.model is not None:
            parts.append(f"{m.METRIC_LABEL_MODEL}={_quote(self.model)}")
        if self.namespace is not None:
            parts.append(f"namespace={_quote(self.namespace)}")
        if self.pod_regex is not None:
            parts.append(f"pod=~{_quote(self.pod_regex)}")
        parts += [*self.extra, *more]
        return "{" + ",".join(parts) + "}" if parts else ""


ALL = Selector()
BY_MODEL = ("namespace", m.METRIC_LABEL_MODEL)  # how alerts and panels group


def _by(labels: tuple[str, ...]) -> str:
    return f" by ({', '.join(labels)})" if labels else ""


def _rate(metric: str, sel: Selector, window: str, *more: str) -> str:
    return f"rate({metric}{sel.matchers(*more)}[{window}])"


def quantile(q: float, histogram: str, sel: Selector = ALL, window: str = "5m", by: tuple[str, ...] = ()) -> str:
    """The q-quantile of a runtime histogram over `window` (seconds)."""
    return f"histogram_quantile({q}, sum{_by((*by, 'le'))} ({_rate(histogram + '_bucket', sel, window)}))"


def p99_latency(sel: Selector = ALL, window: str = "5m", by: tuple[str, ...] = ()) -> str:
    """P99 of request duration (arrival to last token), seconds."""
    return quantile(0.99, m.METRIC_REQUEST_LATENCY, sel, window, by)


def ttft(q: float, sel: Selector = ALL, window: str = "5m", by: tuple[str, ...] = ()) -> str:
    """A quantile of the time to first token, seconds."""
    return quantile(q, m.METRIC_TIME_TO_FIRST_TOKEN, sel, window, by)


def request_rate(sel: Selector = ALL, window: str = "5m", by: tuple[str, ...] = ()) -> str:
    """Requests per second (every status)."""
    return f"sum{_by(by)} ({_rate(m.METRIC_REQUESTS_TOTAL, sel, window)})"


def error_rate(sel: Selector = ALL, window: str = "5m", by: tuple[str, ...] = ()) -> str:
    """Share of requests that ended in a server error (5xx), 0..1; no traffic gives no sample, not 0."""
    errors = f"sum{_by(by)} ({_rate(m.METRIC_REQUESTS_TOTAL, sel, window, f'status=~{_quote(SERVER_ERROR_STATUS)}')})"
    return f"({errors} / {request_rate(sel, window, by)})"


def rejected_rate(sel: Selector = ALL, window: str = "5m", by: tuple[str, ...] = ()) -> str:
    """Requests per second refused with 429 because batch and queue were full."""
    return f"sum{_by(by)} ({_rate(m.METRIC_QUEUE_REJECTED_TOTAL, sel, window)})"


def tokens_per_second(sel: Selector = ALL, window: str = "5m", by: tuple[str, ...] = ()) -> str:
    """Generated tokens per second, summed over the selected pods."""
    return f"sum{_by(by)} ({_rate(m.METRIC_GENERATED_TOKENS_TOTAL, sel, window)})"


def gauge(metric: str, sel: Selector = ALL, by: tuple[str, ...] = (), agg: str = "sum") -> str:
    return f"{agg}{_by(by)} ({metric}{sel.matchers()})"


def queue_depth(sel: Selector = ALL, by: tuple[str, ...] = ()) -> str:
    return gauge(m.METRIC_QUEUE_DEPTH, sel, by)


def running_sequences(sel: Selector = ALL, by: tuple[str, ...] = ()) -> str:
    return gauge(m.METRIC_RUNNING_SEQUENCES, sel, by)


def kv_cache_usage(sel: Selector = ALL, by: tuple[str, ...] = ()) -> str:
    """The fullest replica's KV cache, 0..1 (one full replica already refuses work)."""
    return gauge(m.METRIC_KV_CACHE_USAGE, sel, by, agg="max")


def response_cache_hit_ratio(sel: Selector = ALL, window: str = "5m", by: tuple[str, ...] = ()) -> str:
    """Hits over the requests that looked the response cache up (hit + miss; bypasses never could hit)."""
    hits = _rate(m.METRIC_RESPONSE_CACHE_LOOKUPS_TOTAL, sel, window, f"result={_quote('hit')}")
    looked = _rate(m.METRIC_RESPONSE_CACHE_LOOKUPS_TOTAL, sel, window, f"result=~{_quote('hit|miss')}")
    return f"sum{_by(by)} ({hits}) / sum{_by(by)} ({looked})"


def prefix_cache_hit_ratio(sel: Selector = ALL, window: str = "5m", by: tuple[str, ...] = ()) -> str:
    """Prompt tokens served from the engine's prefix cache over prompt tokens looked up (vLLM's hit rate)."""
    hits = _rate(m.METRIC_PREFIX_CACHE_HITS_TOTAL, sel, window)
    queried = _rate(m.METRIC_PREFIX_CACHE_QUERIES_TOTAL, sel, window)
    return f"sum{_by(by)} ({hits}) / sum{_by(by)} ({queried})"


def replicas(sel: Selector = ALL, by: tuple[str, ...] = ()) -> str:
    """Runtime pods reporting metrics (each exports one running-sequences gauge per model)."""
    return gauge(m.METRIC_RUNNING_SEQUENCES, sel, by, agg="count")


def gpu_utilization(pod_regex: str = ".*", by: tuple[str, ...] = ("namespace", "pod")) -> str:
    """DCGM's GPU utilisation (%), averaged per pod; DCGM labels pods, not models, so select by pod name."""
    return f"avg{_by(by)} ({m.METRIC_DCGM_GPU_UTIL}{{pod=~{_quote(pod_regex)}}})"


def revision_pods(isvc_name: str, revision: str | None = None) -> str:
    """Regex for the predictor pods of an InferenceService, or of one Knative revision of it
    (pods are named NAME-predictor-0000N-deployment-..., Standard mode NAME-predictor-...)."""
    return f"{isvc_name}-predictor-{revision + '-' if revision else ''}.*"


# The operator's own series (operator/distillery_operator/metrics.py).
OPERATOR_MODELS = "distillery_operator_models"
OPERATOR_RECONCILE_ERRORS = "distillery_operator_reconcile_errors_total"
OPERATOR_ROLLOUTS = "distillery_operator_rollouts_total"  # labels namespace, model, outcome
