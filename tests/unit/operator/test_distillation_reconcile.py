"""The DistillationJob reconciler on the in-memory client: TrainJob created once with an owner reference,
phase mirrored from its conditions, the trainer's result read from rank 0's termination message, deploy,
invalid updates, Kubeflow Trainer missing, nothing recreated after the end, RBAC covering every call."""

from __future__ import annotations

import copy
import json
from typing import Any

import kopf
import pytest

from distillery_operator import constants, rbac
from distillery_operator.distillation_reconcile import DistillationReconciler
from distillery_operator.reconcile import DJ, DM, PODS, TRAINJOB
from distillery_operator.settings import RenderSettings
from distillery_operator.testing.memclient import MemoryClient

SHA = "ab" * 32
RESULT = {"artifact": {"uri": "s3://models/out", "sha256": SHA},
          "progress": {"step": 50, "totalSteps": 50, "loss": 1.25, "validationLoss": 1.5},
          "lineage": {"teacher": "hf://deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "steps": 50, "klFinal": 0.3}}


def job_body(name: str = "dj1", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "teacher": {"uri": "hf://deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"},
        "student": {"uri": "hf://deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"},
        "dataset": {"uri": "pvc://data/support.jsonl"},
        "output": {"uri": "s3://models/out"},
    }
    body.update(spec)
    return {"apiVersion": "distillery.dev/v1alpha1", "kind": "DistillationJob",
            "metadata": {"name": name, "namespace": "ns"}, "spec": body}


def rank0_pod(name: str, message: str | None) -> dict[str, Any]:
    terminated = {"exitCode": 0, **({"message": message} if message else {})}
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"{name}-node-0-0-abcde", "namespace": "ns",
                         "labels": {constants.LABEL_JOBSET_NAME: name, constants.LABEL_JOB_INDEX: "0",
                                    constants.LABEL_COMPLETION_INDEX: "0"}},
            "status": {"containerStatuses": [{"name": "node", "state": {"terminated": terminated}}]}}


class World:
    def __init__(self) -> None:
        self.client = MemoryClient()
        self.rec = DistillationReconciler(self.client, RenderSettings(), clock=lambda: "2026-01-01T00:00:00Z")

    def job(self, name: str = "dj1") -> dict[str, Any]:
        return copy.deepcopy(self.client.objects[(DJ.plural, "ns", name)])

    def train_job(self, name: str = "dj1") -> dict[str, Any] | None:
        return self.client.objects.get((TRAINJOB.plural, "ns", name))

    async def run(self, name: str = "dj1") -> Any:
        return await self.rec.reconcile(self.job(name), trigger="unit")

    def set_conditions(self, name: str, *conditions: dict[str, str]) -> None:
        self.train_job(name)["status"] = {"conditions": list(conditions)}  # type: ignore[index]

    def condition(self, type_: str, name: str = "dj1") -> dict[str, Any]:
        return next(c for c in self.job(name)["status"]["conditions"] if c["type"] == type_)


@pytest.fixture
def world() -> World:
    return World()


async def test_create_then_complete_then_idempotent(world) -> None:
    world.client.put(DJ, job_body())
    outcome = await world.run()
    assert outcome.action == "created"
    tj = world.train_job()
    assert tj["metadata"]["ownerReferences"] == [{
        "apiVersion": "distillery.dev/v1alpha1", "kind": "DistillationJob", "name": "dj1",
        "uid": world.job()["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}]
    assert world.job()["status"]["phase"] == "Pending" and world.job()["status"]["trainJob"] == "dj1"
    assert world.condition("Succeeded")["reason"] == "Starting"

    tj["status"] = {"trainerStatus": {"progressPercentage": 40, "lastUpdatedTime": "2026-01-01T00:00:00Z",
                                      "metrics": [{"name": "step", "value": "20"}, {"name": "totalSteps", "value": "50"},
                                                  {"name": "loss", "value": "2.5"}]}}
    await world.run()
    assert world.job()["status"]["phase"] == "Running"
    assert world.job()["status"]["progress"] == {"step": 20, "totalSteps": 50, "loss": 2.5, "percent": 40,
                                                 "summary": "20/50"}

    world.client.put(PODS, rank0_pod("dj1", json.dumps(RESULT)))
    world.set_conditions("dj1", {"type": "Complete", "status": "True", "reason": "JobSetCompleted"})
    await world.run()
    status = world.job()["status"]
    assert status["phase"] == "Succeeded" and status.get("message") is None
    assert status["artifact"] == {"uri": "s3://models/out", "sha256": SHA}
    assert status["lineage"] == RESULT["lineage"]
    assert status["progress"]["loss"] == 1.25 and status["progress"]["percent"] == 100
    assert world.condition("Succeeded")["status"] == "True"
    assert ("dj1", "Normal", "Succeeded") in {e[:3] for e in world.client.events}

    world.client.calls.clear()
    again = await world.run()
    assert again.writes == 0 and world.client.writes() == []
    assert not [c for c in world.client.calls if c.verb == "list"], "the result is read once"


async def test_failed_train_job_fails_the_job_with_its_reason(world) -> None:
    world.client.put(DJ, job_body())
    await world.run()
    world.set_conditions("dj1", {"type": "Failed", "status": "True", "reason": "FailedJobs",
                                 "message": "jobset failed: node-0 exited 1 (CUDA out of memory)"})
    await world.run()
    status = world.job()["status"]
    assert status["phase"] == "Failed" and "CUDA out of memory" in status["message"]
    assert world.condition("Succeeded")["reason"] == "FailedJobs"
    assert [e for e in world.client.events if e[2] == "Failed"][0][1] == "Warning"


async def test_nothing_is_recreated_after_the_end(world) -> None:
    world.client.put(DJ, job_body())
    await world.run()
    world.set_conditions("dj1", {"type": "Complete", "status": "True", "reason": "Done"})
    world.client.put(PODS, rank0_pod("dj1", json.dumps(RESULT)))
    await world.run()
    del world.client.objects[(TRAINJOB.plural, "ns", "dj1")]  # TTL or a user removed it
    await world.run()
    assert world.train_job() is None
    assert world.job()["status"]["phase"] == "Succeeded"
    assert world.job()["status"]["artifact"]["sha256"] == SHA


async def test_missing_result_is_said_not_invented(world) -> None:
    world.client.put(DJ, job_body())
    await world.run()
    world.client.put(PODS, rank0_pod("dj1", None))
    world.set_conditions("dj1", {"type": "Complete", "status": "True", "reason": "Done"})
    await world.run()
    status = world.job()["status"]
    assert status["phase"] == "Succeeded" and "sha256" not in status["artifact"]
    assert "no trainer pod left a result" in status["message"]


async def test_deploy_creates_then_patches_the_distilled_model(world) -> None:
    world.client.put(DJ, job_body(quantization={"method": "int4", "groupSize": 64},
                                  deploy={"distilledModel": "r1-support"}))
    await world.run()
    assert world.condition("Deployed")["status"] == "False"
    assert (DM.plural, "ns", "r1-support") not in world.client.objects, "nothing deployed before success"
    world.client.put(PODS, rank0_pod("dj1", json.dumps(RESULT)))
    world.set_conditions("dj1", {"type": "Complete", "status": "True", "reason": "Done"})
    await world.run()
    dm = world.client.objects[(DM.plural, "ns", "r1-support")]
    assert dm["spec"]["model"] == {"uri": "s3://models/out/quantized",
                                   "teacher": "hf://deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"}
    assert dm["spec"]["quantization"] == {"prequantized": True, "method": "int4", "groupSize": 64}
    lineage = json.loads(dm["metadata"]["annotations"][constants.ANN_LINEAGE])
    assert lineage["sha256"] == SHA and lineage["klFinal"] == 0.3
    assert world.job()["status"]["deployedModel"] == "r1-support"
    assert world.condition("Deployed")["status"] == "True"
    from distillery_operator.api import parse_distilled_model
    parse_distilled_model(dm)  # what the job writes is a valid DistilledModel

    assert world.job()["status"]["deployedArtifact"] == SHA

    # The deploy happens once per generation and artifact: later edits of the model are the user's.
    dm["spec"]["model"]["uri"] = "hf://someone/else"
    dm["spec"]["quantization"] = {"method": "int8"}
    world.client.calls.clear()
    await world.run()
    await world.run()
    assert world.client.writes(DM.plural) == [] and world.client.writes() == []
    assert world.client.objects[(DM.plural, "ns", "r1-support")]["spec"]["model"]["uri"] == "hf://someone/else"
    assert len([e for e in world.client.events if e[2] == "Deployed"]) == 1

    # A new generation (here: another target) deploys once more.
    body = world.job()
    body["spec"]["deploy"] = {"distilledModel": "r1-other"}
    body["metadata"]["generation"] = 2
    world.client.objects[(DJ.plural, "ns", "dj1")] = body
    await world.run()
    assert world.client.objects[(DM.plural, "ns", "r1-other")]["spec"]["model"]["uri"].endswith("/quantized")
    assert world.job()["status"]["deployedModel"] == "r1-other"
    assert world.client.objects[(DM.plural, "ns", "r1-support")]["spec"]["model"]["uri"] == "hf://someone/else"


async def test_deploy_replaces_the_whole_model_of_an_existing_distilled_model(world) -> None:
    world.client.put(DM, {"apiVersion": "distillery.dev/v1alpha1", "kind": "DistilledModel",
                          "metadata": {"name": "r1", "namespace": "ns"},
                          "spec": {"model": {"uri": "hf://org/old", "revision": "v1", "format": "gguf",
                                             "architecture": "llama"}}})
    world.client.put(DJ, job_body(deploy={"distilledModel": "r1"}))
    await world.run()
    world.client.put(PODS, rank0_pod("dj1", json.dumps(RESULT)))
    world.set_conditions("dj1", {"type": "Complete", "status": "True", "reason": "Done"})
    await world.run()
    dm = world.client.objects[(DM.plural, "ns", "r1")]
    assert dm["spec"]["model"] == {"uri": "s3://models/out", "teacher": "hf://deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"}
    assert [c.verb for c in world.client.writes(DM.plural)] == ["patch"]


async def test_no_verified_result_means_no_deploy(world) -> None:
    world.client.put(DJ, job_body(deploy={"distilledModel": "r1"}))
    await world.run()
    world.client.put(PODS, rank0_pod("dj1", None))
    world.set_conditions("dj1", {"type": "Complete", "status": "True", "reason": "Done"})
    await world.run()
    await world.run()
    assert (DM.plural, "ns", "r1") not in world.client.objects
    deployed = world.condition("Deployed")
    assert deployed["status"] == "False" and deployed["reason"] == "NoVerifiedArtifact"
    assert "no trainer pod left a result" in deployed["message"]
    assert [e[1] for e in world.client.events if e[2] == "DeploySkipped"] == ["Warning"], "one Event"
    assert world.job()["status"].get("deployedModel") is None


async def test_spec_changed_after_start_is_not_deployed_and_the_artifact_is_what_ran(world) -> None:
    world.client.put(DJ, job_body(deploy={"distilledModel": "r1"}))
    await world.run()
    body = world.job()
    body["spec"]["output"] = {"uri": "s3://models/elsewhere"}
    body["spec"]["quantization"] = {"method": "int4"}
    body["metadata"]["generation"] = 2
    world.client.objects[(DJ.plural, "ns", "dj1")] = body
    world.client.put(PODS, rank0_pod("dj1", json.dumps(RESULT)))
    world.set_conditions("dj1", {"type": "Complete", "status": "True", "reason": "Done"})
    await world.run()
    await world.run()
    status = world.job()["status"]
    assert status["phase"] == "Succeeded"
    assert status["artifact"] == {"uri": "s3://models/out", "sha256": SHA}, "what ran, not the edited spec"
    assert world.condition("SpecApplied")["status"] == "False"
    deployed = world.condition("Deployed")
    assert deployed["status"] == "False" and deployed["reason"] == "SpecNotApplied"
    assert (DM.plural, "ns", "r1") not in world.client.objects
    assert len([e for e in world.client.events if e[2] == "DeploySkipped"]) == 1


async def test_non_finite_losses_never_reach_the_status(world) -> None:
    world.client.put(DJ, job_body(deploy={"distilledModel": "r1"}))
    await world.run()
    world.train_job()["status"] = {"trainerStatus": {"progressPercentage": "NaN", "metrics": [
        {"name": "step", "value": "inf"}, {"name": "totalSteps", "value": "50"}, {"name": "loss", "value": "nan"}]}}
    await world.run()
    status = world.job()["status"]
    assert status["phase"] == "Running" and status["progress"] == {"totalSteps": 50}
    json.dumps(status, allow_nan=False)
    diverged = {**RESULT, "progress": {"step": 50, "totalSteps": 50, "loss": float("nan"),
                                       "validationLoss": float("inf")},
                "lineage": {"steps": 50, "klFinal": float("nan"), "losses": [1.0, float("-inf")]}}
    world.client.put(PODS, rank0_pod("dj1", json.dumps(diverged)))
    world.set_conditions("dj1", {"type": "Complete", "status": "True", "reason": "Done"})
    await world.run()
    status = world.job()["status"]
    assert status["phase"] == "Succeeded" and status["artifact"]["sha256"] == SHA
    assert "loss" not in status["progress"] and "validationLoss" not in status["progress"]
    assert status["lineage"]["losses"] == [1.0, None] and status["lineage"].get("klFinal") is None
    json.dumps(status, allow_nan=False)
    annotation = world.client.objects[(DM.plural, "ns", "r1")]["metadata"]["annotations"][constants.ANN_LINEAGE]
    json.loads(annotation, parse_constant=lambda c: pytest.fail(f"{c} in the lineage annotation"))


async def test_invalid_update_sets_the_condition_and_leaves_the_train_job(world) -> None:
    world.client.put(DJ, job_body())
    await world.run()
    before = copy.deepcopy(world.train_job())
    body = world.job()
    body["spec"]["loss"] = {"temperature": -1}
    body["metadata"]["generation"] = 2
    world.client.objects[(DJ.plural, "ns", "dj1")] = body
    world.client.calls.clear()
    with pytest.raises(kopf.PermanentError):
        await world.run()
    assert world.train_job() == before and world.client.writes(TRAINJOB.plural) == []
    validated = world.condition("Validated")
    assert validated["status"] == "False" and "spec.loss.temperature" in validated["message"]
    assert world.job()["status"]["phase"] == "Pending", "the phase still follows the TrainJob"
    assert [e[1:3] for e in world.client.events if e[2] == "InvalidSpec"] == [("Warning", "InvalidSpec")]
    with pytest.raises(kopf.PermanentError):
        await world.run()
    assert len([e for e in world.client.events if e[2] == "InvalidSpec"]) == 1, "one Event per generation"


async def test_valid_update_after_start_is_reported_not_applied(world) -> None:
    world.client.put(DJ, job_body())
    await world.run()
    before = copy.deepcopy(world.train_job())
    body = world.job()
    body["spec"]["training"] = {"maxSteps": 10}
    world.client.objects[(DJ.plural, "ns", "dj1")] = body
    await world.run()
    assert world.train_job() == before
    assert world.condition("SpecApplied")["reason"] == "TrainJobImmutable"


async def test_no_train_job_api_is_a_condition_not_a_crash(world) -> None:
    world.client.put(DJ, job_body())
    world.client.fail("create", TRAINJOB.plural, 404, count=3)
    outcome = await world.run()  # no exception: the resync timer tries again later
    assert outcome.phase == "Pending"
    installed = world.condition("TrainerInstalled")
    assert installed["status"] == "False" and "Kubeflow Trainer" in installed["message"]
    await world.run()
    assert len([e for e in world.client.events if e[2] == "TrainerNotInstalled"]) == 1
    world.client.faults.clear()
    await world.run()  # Trainer installed meanwhile
    assert world.train_job() is not None and world.condition("TrainerInstalled")["status"] == "True"


async def test_rbac_covers_every_call(world) -> None:
    world.client.put(DM, {"apiVersion": "distillery.dev/v1alpha1", "kind": "DistilledModel",
                          "metadata": {"name": "r1", "namespace": "ns"}, "spec": {"model": {"uri": "hf://x/y"}}})
    world.client.put(DJ, job_body(deploy={"distilledModel": "r1"}))
    await world.run()
    world.train_job()["metadata"]["labels"] = {}  # drift: forces a patch
    await world.rec.reconcile_child(world.train_job())
    world.client.put(PODS, rank0_pod("dj1", json.dumps(RESULT)))
    world.set_conditions("dj1", {"type": "Complete", "status": "True", "reason": "Done"})
    await world.run()
    world.client.objects[(DM.plural, "ns", "r1")]["spec"]["model"]["uri"] = "hf://x/y"
    world.client.objects[(DJ.plural, "ns", "dj1")]["status"]["artifact"] = {}
    await world.run()
    groups = {DJ.plural: constants.GROUP, DM.plural: constants.GROUP, TRAINJOB.plural: constants.TRAINER_GROUP,
              "events": "", "pods": ""}
    used = {(groups[c.plural], c.plural + (f"/{c.subresource}" if c.subresource else ""),
             "create" if c.verb == "event" else c.verb) for c in world.client.calls}
    assert {("trainer.kubeflow.org", "trainjobs", "patch"), ("", "pods", "list"),
            ("distillery.dev", "distilledmodels", "patch")} <= used
    assert used <= set(rbac.REQUIRED_PERMISSIONS), used - set(rbac.REQUIRED_PERMISSIONS)


async def test_a_refused_train_job_is_reported_like_an_invalid_spec(world) -> None:
    world.client.put(DJ, job_body())
    world.client.fail("create", TRAINJOB.plural, 422, count=1)
    with pytest.raises(kopf.PermanentError):
        await world.run()
    validated = world.condition("Validated")
    assert validated["status"] == "False" and "refused the TrainJob" in validated["message"]
    assert world.job()["status"]["phase"] == "Failed" and world.train_job() is None
    assert [e[2] for e in world.client.events] == ["InvalidSpec"]


def test_the_spec_a_train_job_ran_is_read_back_from_its_manifest() -> None:
    from distillery_operator.distillation_api import parse_distillation_job
    from distillery_operator.distillation_render import render_train_job
    from distillery_operator.distillation_status import ran_spec

    job = parse_distillation_job(job_body(quantization={"method": "int4", "groupSize": 64},
                                          deploy={"distilledModel": "r1"}))
    ran = ran_spec(render_train_job(job, RenderSettings()))
    assert ran == job.spec.model_copy(update={"deploy": None})
    assert ran_spec({"spec": {}}) is None and ran_spec(None) is None
