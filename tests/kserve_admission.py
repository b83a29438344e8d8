"""KServe v0.20's admission rules for InferenceServices that the CRD schema does not carry.

A faithful transcription of the checks in KServe's validating webhook
(pkg/apis/serving/v1beta1/inference_service_validation.go) that apply to what Distillery renders: the
name format, the allowed autoscaler classes, which autoscaler accepts which scaleMetric (KPA:
concurrency/rps; HPA: cpu/memory with utilization targets in 1-100; KEDA: no scaleMetric, External metrics
need a query and a target value), and Knative-only features (canary, no deploymentStrategy).
"""

from __future__ import annotations

import re
from typing import Any

ISVC_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
ALLOWED_AUTOSCALER_CLASSES = {"hpa", "external", "none", "keda"}
KPA_METRICS = {"concurrency", "rps"}
HPA_METRICS = {"cpu", "memory"}


def admission_errors(isvc: dict[str, Any]) -> list[str]:
    """Every reason KServe's webhook (and its reconciler) would refuse this InferenceService."""
    errors: list[str] = []
    name = isvc["metadata"]["name"]
    annotations = isvc["metadata"].get("annotations", {})
    predictor = isvc["spec"]["predictor"]
    mode = annotations.get("serving.kserve.io/deploymentMode")
    autoscaler_class = annotations.get("serving.kserve.io/autoscalerClass")
    knative_class = annotations.get("autoscaling.knative.dev/class")

    if not ISVC_NAME.match(name):
        errors.append(f"name {name!r} does not match {ISVC_NAME.pattern}")
    if mode not in ("Knative", "Standard"):
        errors.append(f"deploymentMode {mode!r} must be stated explicitly as Knative or Standard")
    if autoscaler_class is not None and autoscaler_class not in ALLOWED_AUTOSCALER_CLASSES:
        errors.append(f"[{autoscaler_class}] is not a supported autoscaler class type")

    metric = predictor.get("scaleMetric")
    target = predictor.get("scaleTarget")
    metrics = (predictor.get("autoScaling") or {}).get("metrics", [])
    if mode == "Standard":
        if autoscaler_class == "hpa":
            metric = metric or "cpu"
            if metric not in HPA_METRICS:
                errors.append(f"[{metric}] is not a supported metric (HPA)")
            if target is not None and ((metric == "cpu" and target < 1) or target > 100):
                errors.append("the target utilization percentage should be a [1-100] integer")
            for spec in metrics:
                if spec.get("type") != "Resource":
                    errors.append(f"invalid HPA metric source type {spec.get('type')}")
        elif autoscaler_class == "keda":
            if metric is not None:
                errors.append("ScaleMetric is not supported for KEDA")
            for spec in metrics:
                if spec.get("type") == "External":
                    ext = spec.get("external") or {}
                    if not (ext.get("metric") or {}).get("query"):
                        errors.append("the query should not be empty")
                    if (ext.get("target") or {}).get("value") is None:
                        errors.append("the target threshold value should not be empty")
                elif spec.get("type") != "Resource":
                    errors.append(f"unsupported KEDA metric type {spec.get('type')}")
        elif autoscaler_class == "none":
            if metric is not None or metrics:
                errors.append("autoscalerClass none takes no scaling metric")
        else:
            errors.append(f"Standard mode needs an explicit autoscalerClass, got {autoscaler_class!r}")
        if predictor.get("canaryTrafficPercent") is not None:
            errors.append("canary rollouts are only supported in Knative mode")
        if predictor.get("minReplicas") == 0 and autoscaler_class != "keda":
            errors.append("minReplicas 0 in Standard mode needs KEDA")
    elif mode == "Knative":
        if predictor.get("deploymentStrategy") is not None:
            errors.append("customizing deploymentStrategy is only supported for raw deployment mode")
        if knative_class == "hpa.autoscaling.knative.dev":
            metric = metric or "cpu"
            if metric not in HPA_METRICS:
                errors.append(f"[{metric}] is not a supported metric (Knative HPA)")
            if predictor.get("minReplicas") == 0:
                errors.append("Knative's HPA class cannot scale to zero")
        else:
            metric = metric or "concurrency"
            if metric not in KPA_METRICS:
                errors.append(f"[{metric}] is not a supported metric (KPA)")
            if metric == "rps" and target is not None and target < 1:
                errors.append("the target for rps should be greater than 1")
        if autoscaler_class == "keda":
            errors.append("KEDA autoscaling is only supported in Standard mode")
    min_r, max_r = predictor.get("minReplicas"), predictor.get("maxReplicas")
    if min_r is not None and max_r is not None and max_r and min_r > max_r:
        errors.append(f"minReplicas {min_r} > maxReplicas {max_r}")
    return errors
