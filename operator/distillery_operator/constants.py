"""Names that identify Distillery's objects and KServe's, in one place (group, version, labels, annotations)."""

from __future__ import annotations

from typing import Final

GROUP: Final = "distillery.dev"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"
KIND: Final = "DistilledModel"
PLURAL: Final = "distilledmodels"
SINGULAR: Final = "distilledmodel"
SHORT_NAMES: Final = ("dm",)
CATEGORIES: Final = ("all", "distillery")

KSERVE_GROUP: Final = "serving.kserve.io"
KSERVE_VERSION: Final = "v1beta1"
KSERVE_API_VERSION: Final = f"{KSERVE_GROUP}/{KSERVE_VERSION}"
ISVC_KIND: Final = "InferenceService"
ISVC_PLURAL: Final = "inferenceservices"

# Recommended Kubernetes labels plus our own selector label (the operator watches children by it).
LABEL_NAME: Final = "app.kubernetes.io/name"
LABEL_INSTANCE: Final = "app.kubernetes.io/instance"
LABEL_COMPONENT: Final = "app.kubernetes.io/component"
LABEL_PART_OF: Final = "app.kubernetes.io/part-of"
LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
LABEL_VERSION: Final = "app.kubernetes.io/version"
LABEL_MODEL: Final = f"{GROUP}/model"  # value: the DistilledModel's name
PART_OF: Final = "distillery"
MANAGED_BY: Final = "distillery-operator"

# KServe annotations (KServe v0.20: deployment modes "Knative" and "Standard").
ANN_DEPLOYMENT_MODE: Final = "serving.kserve.io/deploymentMode"
ANN_AUTOSCALER_CLASS: Final = "serving.kserve.io/autoscalerClass"
ANN_PROMETHEUS_SCRAPE: Final = "serving.kserve.io/enable-prometheus-scraping"
ANN_KNATIVE_CLASS: Final = "autoscaling.knative.dev/class"
ANN_KNATIVE_SCALE_DOWN_DELAY: Final = "autoscaling.knative.dev/scale-down-delay"
KNATIVE_CLASS_KPA: Final = "kpa.autoscaling.knative.dev"
KNATIVE_CLASS_HPA: Final = "hpa.autoscaling.knative.dev"
# Our own annotation: hash of the rendered spec, so drift and no-op reconciles are cheap to detect.
ANN_SPEC_HASH: Final = f"{GROUP}/spec-hash"

# The model format our ClusterServingRuntime declares and the runtimes' default names.
MODEL_FORMAT_NAME: Final = "distilled-llm"
RUNTIME_NAME_CPU: Final = "distillery-runtime"
RUNTIME_NAME_GPU: Final = "distillery-runtime-gpu"

GPU_TAINT_KEY: Final = "nvidia.com/gpu"
DEFAULT_GPU_RESOURCE: Final = "nvidia.com/gpu"
