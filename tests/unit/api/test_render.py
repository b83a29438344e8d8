"""The renderer: every sample and a property-based sweep of valid specs become InferenceServices that pass
KServe v0.20's CRD schema (unknown fields rejected) and its admission rules; field-by-field mapping checks."""

from __future__ import annotations

import copy

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distillery_contract import metric_names
from distillery_operator import constants
from distillery_operator.api import InvalidSpec, parse_distilled_model
from distillery_operator.render import keda_query, render_inference_service
from tests.kserve_admission import admission_errors
from tests.kserve_schema import assert_valid

from .conftest import minimal_dm


def render(obj, settings):
    return render_inference_service(parse_distilled_model(obj), settings)


def check_valid(isvc, validator):
    assert_valid(validator, isvc)
    assert admission_errors(isvc) == []


def test_samples_render_valid_inference_services(sample_objects, render_settings, isvc_validator):
    for name, obj in sample_objects.items():
        isvc = render(obj, render_settings)
        check_valid(isvc, isvc_validator)
        assert isvc["metadata"]["name"] == obj["metadata"]["name"], name


def test_t4_scale_to_zero_sample(sample_objects, render_settings):
    isvc = render(sample_objects["r1-distill-qwen-1.5b-int8-t4.yaml"], render_settings)
    ann = isvc["metadata"]["annotations"]
    predictor = isvc["spec"]["predictor"]
    assert ann[constants.ANN_DEPLOYMENT_MODE] == "Knative"
    assert ann[constants.ANN_KNATIVE_CLASS] == constants.KNATIVE_CLASS_KPA
    assert ann[constants.ANN_KNATIVE_SCALE_DOWN_DELAY] == "300s"
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (0, 4)
    assert (predictor["scaleMetric"], predictor["scaleTarget"]) == ("concurrency", 16)
    model = predictor["model"]
    assert model["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert predictor["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-tesla-t4"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in predictor["tolerations"]
    assert model["runtime"] == constants.RUNTIME_NAME_GPU
    assert "--quantization=int8" in model["args"] and "--dtype=float16" in model["args"]
    assert "--think_prefix" in model["args"] and "--separate_reasoning" in model["args"]
    # startup probe sized by startupTimeoutSeconds (900 s at 10 s a probe)
    assert model["startupProbe"]["failureThreshold"] * model["startupProbe"]["periodSeconds"] == 900


def test_keda_queue_depth_sample_queries_the_runtime_metric(sample_objects, render_settings):
    isvc = render(sample_objects["r1-distill-qwen-7b-int4-a100-keda.yaml"], render_settings)
    predictor = isvc["spec"]["predictor"]
    assert isvc["metadata"]["annotations"][constants.ANN_AUTOSCALER_CLASS] == "keda"
    assert "scaleMetric" not in predictor  # KServe refuses scaleMetric with KEDA
    external = predictor["autoScaling"]["metrics"][0]["external"]
    assert external["metric"]["serverAddress"] == render_settings.prometheus_url
    assert metric_names.METRIC_QUEUE_DEPTH in external["metric"]["query"]
    assert 'model_name="r1-qwen-7b"' in external["metric"]["query"]
    assert external["target"] == {"type": "Value", "value": "8"}
    assert "--prequantized" in predictor["model"]["args"] and "--group_size=128" in predictor["model"]["args"]


def test_cpu_sample_has_fixed_replicas_and_no_gpu(sample_objects, render_settings):
    isvc = render(sample_objects["r1-distill-qwen-1.5b-int4-cpu.yaml"], render_settings)
    predictor = isvc["spec"]["predictor"]
    assert isvc["metadata"]["annotations"][constants.ANN_AUTOSCALER_CLASS] == "none"
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (2, 2)
    assert "tolerations" not in predictor and "nodeSelector" not in predictor
    assert predictor["model"]["resources"]["limits"] == {"cpu": "4", "memory": "6Gi"}
    assert predictor["model"]["runtime"] == constants.RUNTIME_NAME_CPU


def test_hpa_cpu_and_gpu_utilization(render_settings, isvc_validator):
    cpu = render(minimal_dm(deploymentMode="Standard",
                            autoscaling={"minReplicas": 1, "maxReplicas": 3, "metric": "cpu", "target": 70,
                                         "scaleDownDelaySeconds": 120}), render_settings)
    check_valid(cpu, isvc_validator)
    p = cpu["spec"]["predictor"]
    assert (p["scaleMetric"], p["scaleMetricType"], p["scaleTarget"]) == ("cpu", "Utilization", 70)
    assert p["autoScaling"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 120
    gpu = render(minimal_dm(hardwareProfile="l4",
                            autoscaling={"minReplicas": 1, "maxReplicas": 3, "metric": "gpuUtilization"}),
                 render_settings)
    check_valid(gpu, isvc_validator)
    query = gpu["spec"]["predictor"]["autoScaling"]["metrics"][0]["external"]["metric"]["query"]
    assert query == keda_query(__import__("distillery_operator.api").api.ScaleMetric.GPU_UTILIZATION, "r1", "models")
    assert metric_names.METRIC_DCGM_GPU_UTIL in query and 'pod=~"r1-predictor-.*"' in query


def test_render_is_deterministic_and_hash_tracks_changes(render_settings):
    a = render(minimal_dm(), render_settings)
    assert render(minimal_dm(), render_settings) == a
    b = render(minimal_dm(serving={"maxBatchSize": 4}), render_settings)
    assert a["metadata"]["annotations"][constants.ANN_SPEC_HASH] != b["metadata"]["annotations"][constants.ANN_SPEC_HASH]


def test_labels_settings_and_passthrough(render_settings):
    from distillery_operator.settings import RenderSettings

    obj = minimal_dm(serving={"args": ["--log_level=DEBUG"], "env": [{"name": "HF_HUB_OFFLINE", "value": "1"}]},
                     serviceAccountName="reader", resources={"priorityClassName": "llm-high"},
                     model={"uri": "hf://deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "revision": "main"})
    obj["metadata"]["labels"] = {"team": "search", "app.kubernetes.io/name": "spoofed"}
    settings = RenderSettings(runtime_image="registry.example/distillery-runtime:1.2.3")
    isvc = render(obj, settings)
    labels = isvc["metadata"]["labels"]
    assert labels["team"] == "search" and labels[constants.LABEL_NAME] == "distilled-model"
    assert labels[constants.LABEL_MODEL] == "r1" and labels[constants.LABEL_MANAGED_BY] == constants.MANAGED_BY
    model = isvc["spec"]["predictor"]["model"]
    assert model["image"] == "registry.example/distillery-runtime:1.2.3"
    assert model["args"][-1] == "--log_level=DEBUG"
    assert model["env"] == [{"name": "HF_HUB_OFFLINE", "value": "1"}]
    assert model["storageUri"].endswith(":main")
    assert isvc["spec"]["predictor"]["serviceAccountName"] == "reader"
    assert isvc["spec"]["predictor"]["priorityClassName"] == "llm-high"


# ------------------------------------------------------------------------------ property-based sweep
def _VALIDATOR():  # noqa: N802 - not a fixture argument: that would bloat hypothesis' reprs (cached in kserve_schema)
    from tests.conftest import KSERVE_REFERENCE
    from tests.kserve_schema import kserve_validator

    return kserve_validator(KSERVE_REFERENCE / "serving.kserve.io_inferenceservices.yaml")


MODES_AND_METRICS = [
    (None, "concurrency", True), (None, "rps", True), ("Knative", "concurrency", True), ("Knative", "rps", True),
    ("Knative", "cpu", False), ("Knative", "memory", False), (None, "cpu", False), ("Standard", "memory", False),
    (None, "queueDepth", True), ("Standard", "gpuUtilization", True), (None, None, True), ("Standard", None, False),
]

names = st.from_regex(r"[a-z][a-z0-9]{0,20}(-[a-z0-9]{1,8}){0,2}", fullmatch=True)
quantities_cpu = st.one_of(st.integers(1, 64), st.sampled_from(["500m", "2", "3500m"]))
quantities_mem = st.sampled_from(["512Mi", "8Gi", "64Gi", "1Ti"])
uris = st.sampled_from([
    "hf://deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "hf://deepseek-ai/DeepSeek-R1-Distill-Llama-8B",
    "s3://bucket/r1-7b", "gs://bucket/models/r1", "pvc://models-pvc/r1-14b", "oci://registry.example/r1:1",
    "https://models.example.com/r1.gguf",
])


@st.composite
def valid_specs(draw):
    spec: dict = {"model": {"uri": draw(uris), "format": draw(st.sampled_from(["safetensors", "gguf"]))}}
    method = draw(st.sampled_from(["none", "int8", "int4"]))
    spec["quantization"] = {"method": method, "groupSize": draw(st.sampled_from([32, 64, 128]))}
    if method != "none" and spec["model"]["format"] == "safetensors":
        spec["quantization"]["prequantized"] = draw(st.booleans())
    max_len = draw(st.integers(512, 32768))
    spec["serving"] = {
        "maxModelLen": max_len, "maxBatchSize": draw(st.integers(1, 64)), "maxQueue": draw(st.integers(1, 256)),
        "dtype": draw(st.sampled_from(["auto", "float16", "float32"])),
        "sampling": {"temperature": draw(st.floats(0, 2)), "topP": draw(st.floats(0.01, 1)),
                     "maxTokens": draw(st.integers(1, max_len))},
        "reasoning": {"thinkPrefix": draw(st.booleans()), "separateReasoning": draw(st.booleans())},
    }
    if draw(st.booleans()):
        spec["serving"]["responseCache"] = {"enabled": draw(st.booleans()), "maxEntries": draw(st.integers(1, 10**6)),
                                            "ttlSeconds": draw(st.integers(1, 86_400))}
    profile = draw(st.sampled_from([None, "cpu", "t4", "l4", "a10g", "rtx4090", "a100-40gb", "a100-80gb", "h100"]))
    if profile:
        spec["hardwareProfile"] = profile
    resources: dict = {}
    if draw(st.booleans()):
        resources["cpu"] = draw(quantities_cpu)
        resources["memory"] = draw(quantities_mem)
    if profile != "cpu" and draw(st.booleans()):
        resources["gpu"] = {"count": draw(st.integers(1, 8)),
                            "type": draw(st.sampled_from(["nvidia-l4", "nvidia-h100-80gb", "nvidia-tesla-t4"]))}
    if draw(st.booleans()):
        resources["tolerations"] = [{"key": "dedicated", "operator": "Equal", "value": "llm", "effect": "NoSchedule"}]
        resources["nodeSelector"] = {"pool": "llm"}
    spec["resources"] = resources
    mode, metric, can_zero = draw(st.sampled_from(MODES_AND_METRICS))
    if draw(st.booleans()) or metric is not None:
        max_r = draw(st.integers(1, 20))
        low = 0 if can_zero and (mode == "Knative" or metric in (None, "concurrency", "rps", "queueDepth", "gpuUtilization")) else 1
        auto = {"minReplicas": draw(st.integers(low, max_r)), "maxReplicas": max_r}
        if metric:
            auto["metric"] = metric
        if draw(st.booleans()):
            percent = metric in ("cpu", "memory", "gpuUtilization") or (metric is None and mode == "Standard")
            auto["target"] = draw(st.integers(1, 100 if percent else 1000))
        if draw(st.booleans()) and not (metric in ("cpu", "memory") and mode == "Knative"):
            auto["scaleDownDelaySeconds"] = draw(st.integers(0, 3600))
        spec["autoscaling"] = auto
        if mode:
            spec["deploymentMode"] = mode
        if draw(st.booleans()) and (mode == "Knative" or (mode is None and metric in (None, "concurrency", "rps"))):
            spec["rollout"] = {"canaryTrafficPercent": draw(st.integers(0, 100))}
    else:
        spec["replicas"] = draw(st.integers(1, 10))
    if draw(st.booleans()):
        spec["serviceAccountName"] = "storage-reader"
    spec["startupTimeoutSeconds"] = draw(st.integers(30, 14400))
    return spec


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=names, spec=valid_specs())
def test_property_valid_specs_render_valid_inference_services(name, spec, render_settings):
    isvc_validator = _VALIDATOR()
    obj = minimal_dm(name=name)
    obj["spec"] = copy.deepcopy(spec)
    try:
        dm = parse_distilled_model(obj)
    except InvalidSpec as error:  # the strategy only draws valid specs: say which rule disagreed
        raise AssertionError(f"strategy drew an invalid spec: {error}") from None
    isvc = render_inference_service(dm, render_settings)
    check_valid(isvc, isvc_validator)
    assert isvc["metadata"]["annotations"][constants.ANN_DEPLOYMENT_MODE] in ("Knative", "Standard")
