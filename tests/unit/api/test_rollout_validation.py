"""spec.rollout.steps / analysis and the checks that depend on what the cluster has (Prometheus, KEDA)."""

from __future__ import annotations

import pytest

from distillery_operator.api import Capabilities, InvalidSpec, duration_seconds, parse_distilled_model

KNATIVE = {"deploymentMode": "Knative"}
SLO = {"interval": "30s", "slo": {"p99LatencySeconds": 2.0}}
EVAL = {"dataset": {"uri": "pvc://evals/gsm8k.jsonl"}, "scorer": "boxed", "minScore": 0.6}


def problems_of(obj, capabilities=None) -> dict[str, str]:
    with pytest.raises(InvalidSpec) as info:
        parse_distilled_model(obj, capabilities)
    return {p.field: p.message for p in info.value.problems}


@pytest.mark.parametrize(("spec", "field", "fragment"), [
    ({**KNATIVE, "rollout": {"steps": [50, 10]}}, "spec.rollout.steps", "strictly increasing"),
    ({**KNATIVE, "rollout": {"steps": [10, 10]}}, "spec.rollout.steps", "strictly increasing"),
    ({**KNATIVE, "rollout": {"steps": [0, 10]}}, "spec.rollout.steps[0]", "greater than or equal to 1"),
    ({**KNATIVE, "rollout": {"steps": [10, 100]}}, "spec.rollout.steps[1]", "less than or equal to 99"),
    ({**KNATIVE, "rollout": {"steps": [10], "canaryTrafficPercent": 5}}, "spec.rollout.steps", "not both"),
    ({"deploymentMode": "Standard", "rollout": {"steps": [10]}}, "spec.rollout.steps", "Knative mode"),
    ({**KNATIVE, "rollout": {"analysis": SLO}}, "spec.rollout.analysis", "set spec.rollout.steps"),
    ({**KNATIVE, "rollout": {"steps": [10], "analysis": {"interval": "2 minutes"}}},
     "spec.rollout.analysis.interval", "pattern"),
    ({**KNATIVE, "rollout": {"steps": [10], "analysis": {"evaluation": {**EVAL, "minScore": None}}}},
     "spec.rollout.analysis.evaluation", "minScore and/or maxRegression"),
    ({**KNATIVE, "rollout": {"steps": [10], "analysis": {"evaluation": {**EVAL, "dataset": {"uri": "s3://b/x"}}}}},
     "spec.rollout.analysis.evaluation.dataset.uri", "pvc://CLAIM/PATH"),
    ({**KNATIVE, "rollout": {"steps": [10], "analysis": {"evaluation": {**EVAL, "scorer": "regex"}}}},
     "spec.rollout.analysis.evaluation.scorer", "boxed"),
])
def test_rollout_spec_problems(make_dm, spec, field, fragment):
    problems = problems_of(make_dm(**spec))
    assert field in problems, problems
    assert fragment in problems[field]


def test_valid_rollout_parses(make_dm):
    dm = parse_distilled_model(make_dm(**KNATIVE, rollout={"steps": [10, 50], "analysis": {**SLO, "evaluation": EVAL}}),
                               Capabilities(prometheus=True))
    assert dm.spec.rollout.steps == [10, 50]
    assert dm.spec.rollout.analysis.slo.p99_latency_seconds == 2.0
    assert dm.spec.rollout.analysis.evaluation.repeats == 3


def test_slo_analysis_needs_prometheus(make_dm):
    obj = make_dm(**KNATIVE, rollout={"steps": [10, 50], "analysis": SLO})
    parse_distilled_model(obj)  # offline (CLI) validation knows nothing about the cluster
    problems = problems_of(obj, Capabilities(prometheus=False))
    assert "no Prometheus" in problems["spec.rollout.analysis.slo"]
    # An interval and an evaluation gate alone query no Prometheus.
    parse_distilled_model(make_dm(**KNATIVE, rollout={"steps": [10], "analysis": {"interval": "5s", "evaluation": EVAL}}),
                          Capabilities(prometheus=False))


@pytest.mark.parametrize("metric", ["queueDepth", "gpuUtilization"])
def test_keda_metrics_need_keda(make_dm, metric):
    obj = make_dm(deploymentMode="Standard", autoscaling={"maxReplicas": 3, "metric": metric})
    parse_distilled_model(obj, Capabilities(keda=True))
    problems = problems_of(obj, Capabilities(keda=False))
    assert "does not have" in problems["spec.autoscaling.metric"] and "KEDA" in problems["spec.autoscaling.metric"]
    parse_distilled_model(make_dm(deploymentMode="Standard", autoscaling={"maxReplicas": 3, "metric": "cpu"}),
                          Capabilities(keda=False))


def test_durations():
    assert duration_seconds("120s") == 120 and duration_seconds("1m30s") == 90 and duration_seconds("500ms") == 0.5
