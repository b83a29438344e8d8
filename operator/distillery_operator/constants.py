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

# The DistillationJob (same group and version) and its child, a Kubeflow Trainer TrainJob.
DJ_KIND: Final = "DistillationJob"
DJ_PLURAL: Final = "distillationjobs"
DJ_SINGULAR: Final = "distillationjob"
DJ_SHORT_NAMES: Final = ("dj",)
LABEL_JOB: Final = f"{GROUP}/distillation-job"  # value: the DistillationJob's name (on its TrainJob)
ANN_JOB_MANIFEST: Final = f"{GROUP}/job"  # pod annotation holding the job as JSON (projected to JOB_FILE)
ANN_LINEAGE: Final = f"{GROUP}/lineage"  # on a deployed DistilledModel: the lineage of its weights (JSON)
ANN_SOURCE_JOB: Final = f"{GROUP}/source-job"  # on a deployed DistilledModel: the DistillationJob behind it

TRAINER_GROUP: Final = "trainer.kubeflow.org"
TRAINER_VERSION: Final = "v1alpha1"
TRAINER_API_VERSION: Final = f"{TRAINER_GROUP}/{TRAINER_VERSION}"
TRAINJOB_KIND: Final = "TrainJob"
TRAINJOB_PLURAL: Final = "trainjobs"
TRAINING_RUNTIME_KIND: Final = "ClusterTrainingRuntime"
TRAINING_RUNTIME_NAME: Final = "distillery-distillation"  # the chart's ClusterTrainingRuntime
TRAINER_NODE_JOB: Final = "node"  # the replicated job (and container) of a torch ClusterTrainingRuntime
# The trainer image's default tag is the chart's appVersion (a test keeps them equal).
DEFAULT_TRAINER_IMAGE: Final = "ghcr.io/distillery-dev/distillery-trainer:0.1.0"
TRAINER_PATCH_MANAGER: Final = f"{GROUP}/operator"  # our entry in the TrainJob's runtimePatches
LABEL_JOBSET_NAME: Final = "jobset.sigs.k8s.io/jobset-name"  # on every pod of a TrainJob (JobSet = TrainJob name)
LABEL_JOB_INDEX: Final = "jobset.sigs.k8s.io/job-index"
LABEL_COMPLETION_INDEX: Final = "batch.kubernetes.io/job-completion-index"
# The rollout controller's evaluation Jobs run distillery-eval from the operator's own image.
DEFAULT_OPERATOR_IMAGE: Final = "ghcr.io/distillery-dev/distillery-operator:0.1.0"
ANN_TAG_ROUTING: Final = "serving.kserve.io/enable-tag-routing"  # gives a canary revision its own URL
LABEL_ROLLOUT_EVAL: Final = f"{GROUP}/rollout-evaluation"  # on evaluation Jobs (value: the model's name)
