"""Render a DistillationJob into a Kubeflow Trainer TrainJob (trainer.kubeflow.org/v1alpha1).

Pure: a validated DistillationJob and RenderSettings in, a plain dict out (ownerReferences are the
reconciler's business). The TrainJob runs on the chart's torch ClusterTrainingRuntime with
numNodes / numProcPerNode from spec.resources (one process per GPU, one on CPU), the trainer image, and
`torchrun --no-python distillery-train -f JOB_FILE`: the job's manifest travels as a pod annotation that
a downward-API volume projects to JOB_FILE (no ConfigMap to create and own, no size limit below the
annotations' 256 KiB). Placement (node selector and tolerations of the hardware profile), the job file
and the pvc:// claims (mounted at PVC_MOUNT_ROOT/CLAIM) go into one runtimePatches entry, the TrainJob's
way to change the runtime's pod template.
"""

from __future__ import annotations

import json
from typing import Any

from distillery_contract.distillation import (
    JOB_DIR,
    JOB_FILE,
    PVC_MOUNT_ROOT,
    DistillationJobSpec,
    pvc_claims,
)

from . import constants
from .api import HARDWARE_PROFILES
from .distillation_api import DistillationJob
from .render import spec_hash
from .settings import RenderSettings

JOB_VOLUME = "distillery-job"
TRAINER_COMMAND = ("torchrun", "--no-python", "distillery-train")
# torchrun reads its rendezvous from the PET_* variables Kubeflow Trainer's torch plugin sets.


def job_manifest(job: DistillationJob) -> dict[str, Any]:
    """What the trainer reads from JOB_FILE: the job with its defaults filled in. `deploy` is the operator's
    business, left out so that pointing a finished job at another DistilledModel changes no TrainJob."""
    return {
        "apiVersion": constants.API_VERSION,
        "kind": constants.DJ_KIND,
        "metadata": {"name": job.metadata.name, "namespace": job.metadata.namespace or "default"},
        "spec": job.spec.model_dump(by_alias=True, exclude_none=True, mode="json", exclude={"deploy"}),
    }


def procs_per_node(spec: DistillationJobSpec) -> int:
    return max(1, spec.resources.gpus_per_node)


def _resources(spec: DistillationJobSpec) -> dict[str, Any]:
    quantities: dict[str, str] = {}
    if spec.resources.cpu:
        quantities["cpu"] = spec.resources.cpu
    if spec.resources.memory:
        quantities["memory"] = spec.resources.memory
    if spec.resources.gpus_per_node > 0:  # extended resources: request == limit
        quantities[constants.DEFAULT_GPU_RESOURCE] = str(spec.resources.gpus_per_node)
    return {"requests": dict(quantities), "limits": dict(quantities)} if quantities else {}


def _pod_patch(job: DistillationJob, settings: RenderSettings) -> dict[str, Any]:
    """The runtime patch of the node pods: job file, claims, placement."""
    spec = job.spec
    volumes: list[dict[str, Any]] = [{
        "name": JOB_VOLUME,
        "downwardAPI": {"items": [{
            "path": JOB_FILE.removeprefix(JOB_DIR + "/"),
            "fieldRef": {"fieldPath": f"metadata.annotations['{constants.ANN_JOB_MANIFEST}']"},
        }]},
    }]
    mounts: list[dict[str, Any]] = [{"name": JOB_VOLUME, "mountPath": JOB_DIR, "readOnly": True}]
    for index, claim in enumerate(pvc_claims(spec)):
        volumes.append({"name": f"pvc-{index}", "persistentVolumeClaim": {"claimName": claim}})
        mounts.append({"name": f"pvc-{index}", "mountPath": f"{PVC_MOUNT_ROOT}/{claim}"})
    pod: dict[str, Any] = {
        "volumes": volumes,
        "containers": [{"name": constants.TRAINER_NODE_JOB, "volumeMounts": mounts}],
    }
    profile = spec.resources.hardware_profile
    gpu_type = HARDWARE_PROFILES[profile].gpu_type if profile is not None else None
    if gpu_type and spec.resources.gpus_per_node > 0:
        pod["nodeSelector"] = {settings.gpu_node_label: gpu_type}
    if spec.resources.gpus_per_node > 0:
        pod["tolerations"] = [{"key": constants.GPU_TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"}]
    annotations = {constants.ANN_JOB_MANIFEST: json.dumps(job_manifest(job), sort_keys=True, separators=(",", ":"))}
    return {
        "manager": constants.TRAINER_PATCH_MANAGER,
        "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [{
            "name": constants.TRAINER_NODE_JOB,
            "template": {"spec": {"template": {"metadata": {"annotations": annotations}, "spec": pod}}},
        }]}}},
    }


def _labels(job: DistillationJob) -> dict[str, str]:
    name = job.metadata.name
    labels = {k: v for k, v in job.metadata.labels.items()
              if not k.startswith("app.kubernetes.io/") and k != constants.LABEL_JOB}
    labels.update({
        constants.LABEL_NAME: "distillation-job",
        constants.LABEL_INSTANCE: name,
        constants.LABEL_COMPONENT: "trainer",
        constants.LABEL_PART_OF: constants.PART_OF,
        constants.LABEL_MANAGED_BY: constants.MANAGED_BY,
        constants.LABEL_JOB: name,
    })
    return labels


def render_train_job(job: DistillationJob, settings: RenderSettings) -> dict[str, Any]:
    """The TrainJob for a validated DistillationJob."""
    spec = job.spec
    trainer: dict[str, Any] = {
        "image": settings.trainer_image,
        "command": list(TRAINER_COMMAND),
        "args": ["-f", JOB_FILE],
        "numNodes": spec.resources.num_nodes,
        "numProcPerNode": procs_per_node(spec),
        "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}],
    }
    if resources := _resources(spec):
        trainer["resourcesPerNode"] = resources
    annotations: dict[str, str] = {}
    owned: dict[str, Any] = {
        "labels": _labels(job),
        "annotations": annotations,
        "spec": {
            "runtimeRef": {
                "apiGroup": constants.TRAINER_GROUP,
                "kind": constants.TRAINING_RUNTIME_KIND,
                "name": settings.training_runtime_name,
            },
            "trainer": trainer,
            "runtimePatches": [_pod_patch(job, settings)],
        },
    }
    annotations[constants.ANN_SPEC_HASH] = spec_hash(owned)
    return {
        "apiVersion": constants.TRAINER_API_VERSION,
        "kind": constants.TRAINJOB_KIND,
        "metadata": {
            "name": job.metadata.name,
            "namespace": job.metadata.namespace or "default",
            "labels": owned["labels"],
            "annotations": annotations,
        },
        "spec": owned["spec"],
    }
