"""Render a DistilledModel into a KServe InferenceService (serving.kserve.io/v1beta1).

Pure: a validated DistilledModel and RenderSettings in, a plain dict out. No API calls, no globals, no
clock: the same input always renders the same object, which is what makes drift detection and GitOps
dry-runs (`distillery render`) agree with the operator. ownerReferences are the reconciler's business.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from distillery_contract import flags, metric_names
from distillery_contract.values import QuantMethod

from . import constants
from .api import (
    DEFAULT_TARGETS,
    HPA_METRICS,
    KEDA_METRICS,
    KNATIVE_KPA_METRICS,
    DeploymentMode,
    DistilledModel,
    DistilledModelSpec,
    ResolvedResources,
    ScaleMetric,
    effective_deployment_mode,
    effective_metric,
    resolve_resources,
)
from .settings import RenderSettings

STARTUP_PROBE_PERIOD_S = 10


def runtime_args(spec: DistilledModelSpec) -> list[str]:
    """Flags for `python -m model_runtime`, appended by KServe to the ServingRuntime's own args."""
    serving = spec.serving
    quant = spec.quantization
    args = [
        f"{flags.FLAG_MODEL_FORMAT}={spec.model.format.value}",
        f"{flags.FLAG_QUANTIZATION}={quant.method.value}",
    ]
    if quant.method == QuantMethod.INT4:
        args.append(f"{flags.FLAG_GROUP_SIZE}={quant.group_size}")
    if quant.prequantized:
        args.append(flags.FLAG_PREQUANTIZED)
    args += [
        f"{flags.FLAG_DTYPE}={serving.dtype}",
        f"{flags.FLAG_MAX_MODEL_LEN}={serving.max_model_len}",
        f"{flags.FLAG_MAX_BATCH_SIZE}={serving.max_batch_size}",
        f"{flags.FLAG_MAX_QUEUE}={serving.max_queue}",
        f"{flags.FLAG_DEFAULT_TEMPERATURE}={serving.sampling.temperature:g}",
        f"{flags.FLAG_DEFAULT_TOP_P}={serving.sampling.top_p:g}",
        f"{flags.FLAG_DEFAULT_MAX_TOKENS}={serving.sampling.max_tokens}",
    ]
    if serving.reasoning.think_prefix:
        args.append(flags.FLAG_THINK_PREFIX)
    if serving.reasoning.separate_reasoning:
        args.append(flags.FLAG_SEPARATE_REASONING)
    if serving.response_cache.enabled:
        args += [
            f"{flags.FLAG_RESPONSE_CACHE_MAX_ENTRIES}={serving.response_cache.max_entries}",
            f"{flags.FLAG_RESPONSE_CACHE_TTL_S}={serving.response_cache.ttl_seconds}",
        ]
    return args + list(serving.args)


def storage_uri(spec: DistilledModelSpec) -> str:
    """The storageUri; KServe's storage initializer takes an hf:// revision as a `:REVISION` suffix."""
    uri = spec.model.uri
    if spec.model.revision and uri.startswith("hf://"):
        return f"{uri}:{spec.model.revision}"
    return uri


def keda_query(metric: ScaleMetric, name: str, namespace: str) -> str:
    """The Prometheus query KEDA evaluates for a KEDA-scaled metric (names from the runtime contract)."""
    if metric == ScaleMetric.QUEUE_DEPTH:
        return (
            f'sum({metric_names.METRIC_QUEUE_DEPTH}{{namespace="{namespace}",'
            f'{metric_names.METRIC_LABEL_MODEL}="{name}"}})'
        )
    if metric == ScaleMetric.GPU_UTILIZATION:
        return f'avg({metric_names.METRIC_DCGM_GPU_UTIL}{{namespace="{namespace}",pod=~"{name}-predictor-.*"}})'
    raise ValueError(f"{metric} is not a KEDA metric")


def _labels(dm: DistilledModel) -> dict[str, str]:
    name = dm.metadata.name
    labels = {
        key: value
        for key, value in dm.metadata.labels.items()
        if not key.startswith("app.kubernetes.io/") and key != constants.LABEL_MODEL
    }
    labels.update(
        {
            constants.LABEL_NAME: "distilled-model",
            constants.LABEL_INSTANCE: name,
            constants.LABEL_COMPONENT: "model-server",
            constants.LABEL_PART_OF: constants.PART_OF,
            constants.LABEL_MANAGED_BY: constants.MANAGED_BY,
            constants.LABEL_MODEL: name,
        }
    )
    return labels


def _autoscaling(
    spec: DistilledModelSpec, name: str, namespace: str, settings: RenderSettings
) -> tuple[dict[str, str], dict[str, Any]]:
    """Annotations and predictor fields for replicas and autoscaling."""
    mode = effective_deployment_mode(spec)
    metric = effective_metric(spec)
    annotations: dict[str, str] = {}
    predictor: dict[str, Any] = {}
    auto = spec.autoscaling

    if auto is None or metric is None:
        replicas = spec.replicas or 1
        predictor.update(minReplicas=replicas, maxReplicas=replicas)
        if mode == DeploymentMode.STANDARD:
            annotations[constants.ANN_AUTOSCALER_CLASS] = "none"
        return annotations, predictor

    target = auto.target if auto.target is not None else DEFAULT_TARGETS[metric]
    predictor.update(minReplicas=auto.min_replicas, maxReplicas=auto.max_replicas)
    if metric in KNATIVE_KPA_METRICS:  # Knative KPA
        annotations[constants.ANN_KNATIVE_CLASS] = constants.KNATIVE_CLASS_KPA
        predictor.update(scaleMetric=metric.value, scaleTarget=target)
        if auto.scale_down_delay_seconds is not None:
            annotations[constants.ANN_KNATIVE_SCALE_DOWN_DELAY] = f"{auto.scale_down_delay_seconds}s"
    elif metric in HPA_METRICS:
        predictor.update(scaleMetric=metric.value, scaleMetricType="Utilization", scaleTarget=target)
        if mode == DeploymentMode.KNATIVE:
            annotations[constants.ANN_KNATIVE_CLASS] = constants.KNATIVE_CLASS_HPA
        else:
            annotations[constants.ANN_AUTOSCALER_CLASS] = "hpa"
            if auto.scale_down_delay_seconds is not None:
                predictor["autoScaling"] = {
                    "behavior": {"scaleDown": {"stabilizationWindowSeconds": auto.scale_down_delay_seconds}}
                }
    elif metric in KEDA_METRICS:
        annotations[constants.ANN_AUTOSCALER_CLASS] = "keda"
        autoscaling: dict[str, Any] = {
            "metrics": [
                {
                    "type": "External",
                    "external": {
                        "metric": {
                            "backend": "prometheus",
                            "serverAddress": settings.prometheus_url,
                            "query": keda_query(metric, name, namespace),
                        },
                        "target": {"type": "Value", "value": str(target)},
                    },
                }
            ]
        }
        if auto.scale_down_delay_seconds is not None:
            autoscaling["behavior"] = {"scaleDown": {"stabilizationWindowSeconds": auto.scale_down_delay_seconds}}
        predictor["autoScaling"] = autoscaling
    return annotations, predictor


def _resources_and_placement(
    spec: DistilledModelSpec, res: ResolvedResources, settings: RenderSettings
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The container's resources, and the pod's node selector / tolerations / priority class."""
    quantities: dict[str, Any] = {}
    if res.cpu:
        quantities["cpu"] = res.cpu
    if res.memory:
        quantities["memory"] = res.memory
    requests = dict(quantities)
    limits = dict(quantities)
    if res.gpu_count > 0:
        # Extended resources: the limit is what counts; request == limit.
        requests[res.gpu_resource_name] = str(res.gpu_count)
        limits[res.gpu_resource_name] = str(res.gpu_count)
    resources = {k: v for k, v in (("requests", requests), ("limits", limits)) if v}

    pod: dict[str, Any] = {}
    node_selector = dict(spec.resources.node_selector)
    if res.gpu_type:
        node_selector.setdefault(settings.gpu_node_label, res.gpu_type)
    if node_selector:
        pod["nodeSelector"] = node_selector
    tolerations = [t.model_dump(by_alias=True, exclude_none=True) for t in spec.resources.tolerations]
    if res.gpu_count > 0 and not any(t.get("key") == constants.GPU_TAINT_KEY for t in tolerations):
        tolerations.append({"key": constants.GPU_TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"})
    if tolerations:
        pod["tolerations"] = tolerations
    if spec.resources.priority_class_name:
        pod["priorityClassName"] = spec.resources.priority_class_name
    return resources, pod


def spec_hash(obj: dict[str, Any]) -> str:
    """A stable hash of what the operator owns in the child (spec, labels, annotations)."""
    payload = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(payload).hexdigest()[:16]


def render_inference_service(dm: DistilledModel, settings: RenderSettings) -> dict[str, Any]:
    """The InferenceService for a validated DistilledModel."""
    spec = dm.spec
    name = dm.metadata.name
    namespace = dm.metadata.namespace or "default"
    mode = effective_deployment_mode(spec)
    resolved = resolve_resources(spec)
    resources, pod = _resources_and_placement(spec, resolved, settings)
    scale_annotations, scale_fields = _autoscaling(spec, name, namespace, settings)
    gpu = resolved.gpu_count > 0

    model: dict[str, Any] = {
        "modelFormat": {"name": constants.MODEL_FORMAT_NAME},
        "runtime": settings.runtime_name_gpu if gpu else settings.runtime_name_cpu,
        "storageUri": storage_uri(spec),
        "args": runtime_args(spec),
        "startupProbe": {
            "httpGet": {
                "path": flags.HEALTH_READY_PATH_TEMPLATE.format(model_name=name),
                "port": flags.RUNTIME_HTTP_PORT,
            },
            "periodSeconds": STARTUP_PROBE_PERIOD_S,
            "failureThreshold": max(1, math.ceil(spec.startup_timeout_seconds / STARTUP_PROBE_PERIOD_S)),
        },
    }
    if settings.runtime_image:
        model["image"] = settings.runtime_image
    env = [e.model_dump(by_alias=True) for e in spec.serving.env]
    if env:
        model["env"] = env
    if resources:
        model["resources"] = resources

    predictor: dict[str, Any] = {**scale_fields, **pod, "model": model}
    if spec.service_account_name:
        predictor["serviceAccountName"] = spec.service_account_name
    if spec.rollout.canary_traffic_percent is not None:
        predictor["canaryTrafficPercent"] = spec.rollout.canary_traffic_percent

    annotations = {
        constants.ANN_DEPLOYMENT_MODE: mode.value,
        constants.ANN_PROMETHEUS_SCRAPE: "true",
        **scale_annotations,
    }
    if spec.rollout.steps:
        # Stepped rollouts: the canary (tag `latest`) and the stable revision (`prev`) get URLs of their own,
        # which the evaluation gate scores them through.
        annotations[constants.ANN_TAG_ROUTING] = "true"
    owned = {"labels": _labels(dm), "annotations": annotations, "spec": {"predictor": predictor}}
    annotations[constants.ANN_SPEC_HASH] = spec_hash(owned)
    return {
        "apiVersion": constants.KSERVE_API_VERSION,
        "kind": constants.ISVC_KIND,
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": owned["labels"],
            "annotations": annotations,
        },
        "spec": owned["spec"],
    }
