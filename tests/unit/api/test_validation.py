"""Invalid DistilledModels are refused with a message naming the field; valid ones get their defaults."""

from __future__ import annotations

import pytest

from distillery_operator.api import (
    DeploymentMode,
    InvalidSpec,
    ScaleMetric,
    effective_deployment_mode,
    effective_metric,
    parse_distilled_model,
    resolve_resources,
)


def problems_of(obj) -> dict[str, str]:
    with pytest.raises(InvalidSpec) as info:
        parse_distilled_model(obj)
    return {p.field: p.message for p in info.value.problems}


def test_minimal_spec_gets_r1_defaults(make_dm):
    dm = parse_distilled_model(make_dm())
    assert dm.spec.serving.sampling.temperature == 0.6
    assert dm.spec.serving.sampling.top_p == 0.95
    assert dm.spec.serving.reasoning.think_prefix is True
    assert dm.spec.quantization.method == "none"
    assert effective_deployment_mode(dm.spec) == DeploymentMode.STANDARD  # no autoscaling: fixed replicas


@pytest.mark.parametrize(
    ("spec", "field", "fragment"),
    [
        ({"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}, "spec.autoscaling.minReplicas", "greater than maxReplicas"),
        ({"deploymentMode": "Standard", "autoscaling": {"minReplicas": 0, "maxReplicas": 2, "metric": "cpu"}},
         "spec.autoscaling.minReplicas", "scale to zero is impossible with the HPA"),
        ({"deploymentMode": "Standard", "autoscaling": {"maxReplicas": 2, "metric": "concurrency"}},
         "spec.autoscaling.metric", "needs Knative"),
        ({"deploymentMode": "Knative", "autoscaling": {"maxReplicas": 2, "metric": "queueDepth"}},
         "spec.autoscaling.metric", "only in Standard mode"),
        ({"quantization": {"method": "int4", "groupSize": 48}}, "spec.quantization.groupSize", "32, 64 or 128"),
        ({"resources": {"gpu": {"count": 0, "type": "nvidia-tesla-t4"}}}, "spec.resources.gpu.count", "count >= 1"),
        ({"model": {"uri": "ftp://models/r1"}}, "spec.model.uri", "unknown URI scheme"),
        ({"model": {"uri": "s3://"}}, "spec.model.uri", "names no bucket"),
        ({"rollout": {"canaryTrafficPercent": 10}}, "spec.rollout.canaryTrafficPercent", "only in Knative mode"),
        ({"replicas": 2, "autoscaling": {"maxReplicas": 3}}, "spec.replicas", "not both"),
        ({"quantization": {"method": "none", "prequantized": True}}, "spec.quantization.prequantized", "int8 or int4"),
        ({"serving": {"maxModelLen": 1024, "sampling": {"maxTokens": 4096}}}, "spec.serving.sampling.maxTokens",
         "exceeds the context length"),
        ({"hardwareProfile": "t4", "serving": {"dtype": "bfloat16"}}, "spec.serving.dtype", "no bfloat16"),
        ({"hardwareProfile": "cpu", "resources": {"gpu": {"count": 1}}}, "spec.resources.gpu", "asks for no GPU"),
        ({"deploymentMode": "Standard", "autoscaling": {"maxReplicas": 2, "metric": "cpu", "target": 150}},
         "spec.autoscaling.target", "1-100"),
        ({"serving": {"maxBatchSize": 0}}, "spec.serving.maxBatchSize", "greater than or equal to 1"),
        ({"serving": {"sampling": {"temperature": 3}}}, "spec.serving.sampling.temperature", "less than or equal to 2"),
        ({"autoscaling": {"metric": "latency"}}, "spec.autoscaling.metric", "concurrency"),
        ({"quantisation": {"method": "int8"}}, "spec.quantisation", "unknown field"),
    ],
)
def test_invalid_spec_names_the_field(make_dm, spec, field, fragment):
    problems = problems_of(make_dm(**spec))
    assert field in problems, problems
    assert fragment in problems[field]


def test_int4_group_size_must_divide_known_shapes(make_dm):
    # Every published R1-Distill shape is a multiple of 128, so the refusal is shown on a patched shape.
    from distillery_operator import api

    dm = make_dm(model={"uri": "hf://deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"},
                 quantization={"method": "int4", "groupSize": 128})
    parse_distilled_model(dm)  # 1536 and 8960 are multiples of 128
    original = api.KNOWN_SHAPES["qwen-1.5b"]
    try:
        api.KNOWN_SHAPES["qwen-1.5b"] = (1536, 8960 + 64)
        problems = problems_of(dm)
        assert "does not divide the model's intermediate size 9024" in problems["spec.quantization.groupSize"]
    finally:
        api.KNOWN_SHAPES["qwen-1.5b"] = original


def test_every_problem_is_listed_at_once(make_dm):
    problems = problems_of(make_dm(model={"uri": "ftp://x"}, deploymentMode="Standard",
                                   autoscaling={"minReplicas": 3, "maxReplicas": 2, "metric": "rps"},
                                   rollout={"canaryTrafficPercent": 5}))
    assert {"spec.model.uri", "spec.autoscaling.minReplicas", "spec.autoscaling.metric",
            "spec.rollout.canaryTrafficPercent"} <= set(problems)


@pytest.mark.parametrize(
    ("name", "mode_spec", "ok"),
    [
        ("a" * 47, {"autoscaling": {"minReplicas": 0, "maxReplicas": 2}}, True),  # Knative: 47 max
        ("a" * 48, {"autoscaling": {"minReplicas": 0, "maxReplicas": 2}}, False),
        ("a" * 53, {}, True),  # Standard: NAME-predictor <= 63
        ("a" * 54, {}, False),
        ("R1-Upper", {}, False),
        ("1-starts-with-digit", {}, False),
    ],
)
def test_names_kserve_can_serve(make_dm, name, mode_spec, ok):
    obj = make_dm(name=name, **mode_spec)
    obj["metadata"]["namespace"] = "ns"
    if ok:
        parse_distilled_model(obj)
    else:
        assert "metadata.name" in problems_of(obj)


def test_knative_host_label_counts_the_namespace(make_dm):
    obj = make_dm(name="a" * 40, autoscaling={"minReplicas": 0, "maxReplicas": 2})
    obj["metadata"]["namespace"] = "a-rather-long-namespace"
    assert "Knative host label" in problems_of(obj)["metadata.name"]


@pytest.mark.parametrize(("name", "namespace", "ok"), [
    ("a" * 46, None, True),  # latest-NAME-predictor: 63
    ("a" * 47, None, False),  # a name KNATIVE_NAME_MAX allows: a 64-character tag Service
    ("a" * 35, "namespace1", True),  # latest-NAME-predictor-NS: 63
    ("a" * 36, "namespace1", False),
])
def test_stepped_rollout_names_fit_the_latest_tag_routes(make_dm, name, namespace, ok):
    obj = make_dm(name=name, deploymentMode="Knative", rollout={"steps": [10, 50]})
    obj["metadata"]["namespace"] = namespace
    if ok:
        parse_distilled_model(obj)
    else:
        assert "latest-" in problems_of(obj)["metadata.name"]


def test_wrong_kind_and_missing_spec(make_dm):
    problems = problems_of({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}})
    assert set(problems) == {"apiVersion", "kind", "spec"}


@pytest.mark.parametrize(
    ("autoscaling", "mode", "expected_mode", "expected_metric"),
    [
        ({"minReplicas": 1, "maxReplicas": 3}, None, DeploymentMode.KNATIVE, ScaleMetric.CONCURRENCY),
        ({"minReplicas": 1, "maxReplicas": 3, "metric": "rps"}, None, DeploymentMode.KNATIVE, ScaleMetric.RPS),
        ({"minReplicas": 1, "maxReplicas": 3, "metric": "cpu"}, None, DeploymentMode.STANDARD, ScaleMetric.CPU),
        ({"minReplicas": 0, "maxReplicas": 3, "metric": "queueDepth"}, None, DeploymentMode.STANDARD,
         ScaleMetric.QUEUE_DEPTH),
        ({"minReplicas": 1, "maxReplicas": 3}, "Standard", DeploymentMode.STANDARD, ScaleMetric.CPU),
        ({"minReplicas": 1, "maxReplicas": 3, "metric": "memory"}, "Knative", DeploymentMode.KNATIVE,
         ScaleMetric.MEMORY),
    ],
)
def test_deployment_mode_is_chosen_from_the_autoscaling(make_dm, autoscaling, mode, expected_mode, expected_metric):
    extra = {"deploymentMode": mode} if mode else {}
    dm = parse_distilled_model(make_dm(autoscaling=autoscaling, **extra))
    assert effective_deployment_mode(dm.spec) == expected_mode
    assert effective_metric(dm.spec) == expected_metric


def test_hardware_profile_fills_in_and_explicit_values_win(make_dm):
    dm = parse_distilled_model(make_dm(hardwareProfile="a100-80gb", resources={"memory": "100Gi", "cpu": 6}))
    res = resolve_resources(dm.spec)
    assert (res.gpu_count, res.gpu_type, res.cpu, res.memory) == (1, "nvidia-a100-80gb", "6", "100Gi")
    dm = parse_distilled_model(make_dm(hardwareProfile="h100", resources={"gpu": {"count": 2}}))
    res = resolve_resources(dm.spec)
    assert (res.gpu_count, res.gpu_type) == (2, "nvidia-h100-80gb")
