"""The real operator (kopf) on the emulator with DistillationJobs: the TrainJob is created with an owner
reference, its conditions become the job's phase, the trainer's result (rank 0's termination message)
becomes status.artifact and status.lineage, spec.deploy points a DistilledModel (and so an
InferenceService) at the artifact, an invalid update leaves the TrainJob alone, and a cluster without
Kubeflow Trainer gets a condition instead of a crash loop."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from distillery_operator import constants
from distillery_operator.testing.emulator import DJ_RESOURCE, TRAINJOB_RESOURCE

pytestmark = pytest.mark.integration
NS = "default"
DJ_PATH = f"/apis/distillery.dev/v1alpha1/namespaces/{NS}/distillationjobs"
TJ_PATH = f"/apis/trainer.kubeflow.org/v1alpha1/namespaces/{NS}/trainjobs"
SHA = "0123456789abcdef" * 4
REPO = Path(__file__).resolve().parents[3]


def dj(name: str, **spec: Any) -> dict[str, Any]:
    body = {
        "teacher": {"uri": "hf://deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"},
        "student": {"uri": "hf://deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"},
        "dataset": {"uri": "pvc://data/support.jsonl"},
        "output": {"uri": "s3://models/out"},
        "resources": {"gpusPerNode": 0, "hardwareProfile": "cpu"},
        **spec,
    }
    return {"apiVersion": "distillery.dev/v1alpha1", "kind": "DistillationJob", "metadata": {"name": name},
            "spec": body}


def job(cluster, name: str) -> dict[str, Any]:
    return cluster.emu.read(DJ_RESOURCE, NS, name) or {}


def train_job(cluster, name: str) -> dict[str, Any] | None:
    return cluster.emu.read(TRAINJOB_RESOURCE, NS, name)


def job_condition(cluster, name: str, type_: str) -> dict[str, Any]:
    return next((c for c in (job(cluster, name).get("status") or {}).get("conditions") or [] if c["type"] == type_), {})


def job_phase(cluster, name: str) -> str | None:
    return (job(cluster, name).get("status") or {}).get("phase")


async def started(cluster, name: str, **spec: Any) -> dict[str, Any]:
    await cluster.request("POST", DJ_PATH, dj(name, **spec))
    tj = await cluster.eventually(lambda: train_job(cluster, name), what=f"TrainJob {name}")
    await cluster.eventually(lambda: job_phase(cluster, name) == "Pending", what="phase Pending")
    # Kubeflow Trainer reports the node Job ready: the job runs.
    ready = {"jobsStatus": [{"name": "node", "active": 1, "ready": 1, "succeeded": 0, "failed": 0, "suspended": 0}]}
    await cluster.request("PATCH", f"{TJ_PATH}/{name}/status", {"status": ready}, "application/merge-patch+json")
    await cluster.eventually(lambda: job_phase(cluster, name) == "Running", what="phase Running")
    return train_job(cluster, name) or tj


async def finish(cluster, name: str, condition: dict[str, str], result: dict[str, Any] | None = None) -> None:
    if result is not None:  # rank 0's pod, terminated with its result as the termination message
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": f"{name}-node-0-0-x1y2z",
                            "labels": {constants.LABEL_JOBSET_NAME: name, constants.LABEL_JOB_INDEX: "0",
                                       constants.LABEL_COMPLETION_INDEX: "0"}},
               "spec": {"containers": [{"name": "node", "image": "trainer"}]},
               "status": {"containerStatuses": [{"name": "node", "state": {"terminated": {
                   "exitCode": 0, "message": json.dumps(result)}}}]}}
        await cluster.request("POST", f"/api/v1/namespaces/{NS}/pods", pod)
    await cluster.request("PATCH", f"{TJ_PATH}/{name}/status", {"status": {"conditions": [condition]}},
                          "application/merge-patch+json")


async def test_create_makes_the_train_job_with_owner_reference(cluster, operator) -> None:
    tj = await started(cluster, "dj-create")
    owner = job(cluster, "dj-create")
    assert tj["metadata"]["ownerReferences"] == [{
        "apiVersion": "distillery.dev/v1alpha1", "kind": "DistillationJob", "name": "dj-create",
        "uid": owner["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}]
    assert tj["spec"]["runtimeRef"]["name"] == constants.TRAINING_RUNTIME_NAME
    assert owner["status"]["trainJob"] == "dj-create" and owner["status"]["observedGeneration"] == 1
    assert job_condition(cluster, "dj-create", "Validated")["status"] == "True"
    await cluster.eventually(lambda: any(e["reason"] == "Created" for e in cluster.events("dj-create")),
                             what="a Created event")


async def test_complete_succeeds_with_artifact_lineage_and_deploys(cluster, operator) -> None:
    await started(cluster, "dj-ok", quantization={"method": "int4", "groupSize": 128},
                  deploy={"distilledModel": "r1-distilled"})
    lineage = {"teacher": {"uri": "hf://deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"}, "steps": 12, "finalKl": 0.21}
    result = {"artifact": {"uri": "s3://models/out", "sha256": SHA}, "lineage": lineage,
              "progress": {"step": 12, "totalSteps": 12, "loss": 0.9}}
    await finish(cluster, "dj-ok", {"type": "Complete", "status": "True", "reason": "JobSetCompleted",
                                    "message": "done", "lastTransitionTime": "2026-01-01T00:00:00Z"}, result)
    await cluster.eventually(lambda: job_phase(cluster, "dj-ok") == "Succeeded", what="phase Succeeded")
    status = await cluster.eventually(
        lambda: (s := job(cluster, "dj-ok")["status"]).get("deployedModel") and s, what="the deploy")
    assert status["artifact"] == {"uri": "s3://models/out", "sha256": SHA, "quantizedUri": "s3://models/out/quantized"}
    assert status["lineage"] == lineage
    assert status["progress"]["summary"] == "12/12"
    # The DistilledModel serves the pre-quantized artifact; the operator's other half deploys it.
    dm = cluster.dm("r1-distilled")
    assert dm["spec"]["model"]["uri"] == "s3://models/out/quantized"
    assert dm["spec"]["quantization"] == {"prequantized": True, "method": "int4", "groupSize": 128}
    assert json.loads(dm["metadata"]["annotations"][constants.ANN_LINEAGE])["sha256"] == SHA
    dm_lineage = await cluster.eventually(lambda: (cluster.dm("r1-distilled").get("status") or {}).get("lineage"),
                                          what="the lineage in the DistilledModel's status")
    assert dm_lineage["sha256"] == SHA and dm_lineage["job"] == "dj-ok" and dm_lineage["finalKl"] == 0.21
    isvc = await cluster.eventually(lambda: cluster.isvc("r1-distilled"), what="the InferenceService")
    assert isvc["spec"]["predictor"]["model"]["storageUri"] == "s3://models/out/quantized"
    assert "--prequantized" in isvc["spec"]["predictor"]["model"]["args"]
    await cluster.eventually(lambda: {"Succeeded", "Deployed"} <= {e["reason"] for e in cluster.events("dj-ok")},
                             what="Succeeded and Deployed events")


async def test_failed_train_job_fails_the_job_with_the_reason(cluster, operator) -> None:
    await started(cluster, "dj-fail")
    await finish(cluster, "dj-fail", {"type": "Failed", "status": "True", "reason": "FailedJobs",
                                      "message": "node-0 exited with 1: teacher and student tokenizers differ",
                                      "lastTransitionTime": "2026-01-01T00:00:00Z"})
    await cluster.eventually(lambda: job_phase(cluster, "dj-fail") == "Failed", what="phase Failed")
    assert "tokenizers differ" in job(cluster, "dj-fail")["status"]["message"]
    assert job_condition(cluster, "dj-fail", "Succeeded")["reason"] == "FailedJobs"
    warning = await cluster.eventually(lambda: [e for e in cluster.events("dj-fail") if e["reason"] == "Failed"],
                                       what="a Failed event")
    assert warning[0]["type"] == "Warning"


async def test_invalid_update_sets_condition_and_event_and_leaves_the_train_job(cluster, operator) -> None:
    before = await started(cluster, "dj-bad")
    await cluster.request("PATCH", f"{DJ_PATH}/dj-bad", {"spec": {"method": "full", "lora": {"rank": 8}}},
                          "application/merge-patch+json")
    validated = await cluster.eventually(
        lambda: (c := job_condition(cluster, "dj-bad", "Validated")) and c["status"] == "False" and c,
        what="Validated=False")
    assert "spec.lora" in validated["message"]
    await cluster.eventually(lambda: [e for e in cluster.events("dj-bad") if e["reason"] == "InvalidSpec"],
                             what="an InvalidSpec event")
    await asyncio.sleep(0.5)
    after = train_job(cluster, "dj-bad")
    assert after["spec"] == before["spec"] and after["metadata"]["resourceVersion"] == before["metadata"][
        "resourceVersion"]


async def test_the_sample_is_accepted(cluster, operator) -> None:
    sample = yaml.safe_load((REPO / "manifests/samples/distillation/r1-support.yaml").read_text())
    await cluster.request("POST", DJ_PATH, sample)
    tj = await cluster.eventually(lambda: train_job(cluster, "r1-support"), what="the sample's TrainJob")
    assert tj["spec"]["trainer"]["numProcPerNode"] == 8
