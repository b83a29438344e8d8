"""The real operator (kopf) against kmock's Kubernetes emulator: create, status, update, bad input, drift,
restart, API faults. Each test starts its own emulator and operator; object counts stay tiny."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import REGISTRY

from distillery_operator import constants
from distillery_operator.api import parse_distilled_model
from distillery_operator.render import render_inference_service

pytestmark = pytest.mark.integration
RECONCILES = "distillery_operator_reconciles_total"

READY_STATUS = {
    "url": "http://r1-ready.default.example.com",
    "conditions": [
        {"type": "IngressReady", "status": "True"},
        {"type": "PredictorReady", "status": "True"},
        {"type": "Ready", "status": "True"},
    ],
    "modelStatus": {"transitionStatus": "UpToDate", "states": {"activeModelState": "Loaded"},
                    "copies": {"totalCopies": 2, "failedCopies": 0}},
}


async def created(cluster, operator, sample_dm, name: str) -> dict:
    await cluster.apply(sample_dm(name))
    isvc = await cluster.eventually(lambda: cluster.isvc(name), what=f"InferenceService {name}")
    await cluster.eventually(lambda: cluster.phase(name) == "Deploying", what="phase Deploying")
    return isvc


async def test_create_renders_the_inference_service_with_owner_reference(cluster, operator, sample_dm) -> None:
    isvc = await created(cluster, operator, sample_dm, "r1-create")
    dm = cluster.dm("r1-create")
    expected = render_inference_service(parse_distilled_model(dm), operator.settings.render_settings())
    assert isvc["spec"] == expected["spec"]
    assert isvc["metadata"]["labels"] == expected["metadata"]["labels"]
    assert constants.ANN_SPEC_HASH in isvc["metadata"]["annotations"]
    assert isvc["metadata"]["annotations"].items() >= expected["metadata"]["annotations"].items()
    assert isvc["metadata"]["ownerReferences"] == [{
        "apiVersion": "distillery.dev/v1alpha1", "kind": "DistilledModel", "name": "r1-create",
        "uid": dm["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True,
    }]
    assert not dm["metadata"].get("finalizers"), "garbage collection deletes the child: no finalizer"
    assert cluster.emu.requests[("PATCH", "distilledmodels", "")] == 0, "only status is written (see rbac.py)"
    status = dm["status"]
    assert status["observedGeneration"] == 1
    assert status["inferenceService"] == "r1-create"
    assert (status["gpu"], status["quantization"]) == ("none", "int4-g64")
    assert cluster.condition("r1-create", "Validated")["status"] == "True"
    assert cluster.condition("r1-create", "Ready")["status"] == "False"
    await cluster.eventually(lambda: any(e["reason"] == "Created" for e in cluster.events("r1-create")),
                             what="a Created event")


async def test_ready_and_failed_inference_service_status_is_mirrored(cluster, operator, sample_dm) -> None:
    await created(cluster, operator, sample_dm, "r1-ready")
    await cluster.patch_isvc("r1-ready", {"status": READY_STATUS}, "status")
    await cluster.eventually(lambda: cluster.phase("r1-ready") == "Ready", what="phase Ready")
    status = cluster.dm("r1-ready")["status"]
    assert status["url"] == READY_STATUS["url"]
    assert status["replicas"] == 2
    assert cluster.condition("r1-ready", "Ready")["status"] == "True"
    assert cluster.condition("r1-ready", "InferenceServiceReady")["status"] == "True"

    failed = {
        "conditions": [{"type": "PredictorReady", "status": "False", "reason": "RevisionFailed"},
                       {"type": "Ready", "status": "False", "reason": "RevisionFailed"}],
        "modelStatus": {
            "transitionStatus": "BlockedByFailedLoad",
            "states": {"activeModelState": "FailedToLoad", "targetModelState": "FailedToLoad"},
            "lastFailureInfo": {"reason": "ModelLoadFailed", "message": "weights not found at hf://x", "exitCode": 1},
        },
    }
    await cluster.patch_isvc("r1-ready", {"status": failed}, "status")
    await cluster.eventually(lambda: cluster.phase("r1-ready") == "Failed", what="phase Failed")
    ready = cluster.condition("r1-ready", "Ready")
    assert ready["status"] == "False" and ready["reason"] == "ModelLoadFailed"
    assert "weights not found" in ready["message"]
    assert "weights not found" in cluster.dm("r1-ready")["status"]["message"]
    await cluster.eventually(
        lambda: {"Ready", "Failed"} <= {e["reason"] for e in cluster.events("r1-ready")}, what="Ready + Failed events"
    )
    assert next(e for e in cluster.events("r1-ready") if e["reason"] == "Failed")["type"] == "Warning"


async def test_spec_update_patches_the_inference_service(cluster, operator, sample_dm) -> None:
    before = await created(cluster, operator, sample_dm, "r1-update")
    await cluster.patch_dm("r1-update", {"spec": {"serving": {"maxBatchSize": 16}}})
    after = await cluster.eventually(
        lambda: (i := cluster.isvc("r1-update")) and "--max_batch_size=16" in i["spec"]["predictor"]["model"]["args"]
        and i, what="the patched InferenceService",
    )
    assert after["metadata"]["uid"] == before["metadata"]["uid"], "patched in place, not recreated"
    assert after["metadata"]["annotations"][constants.ANN_SPEC_HASH] != before["metadata"]["annotations"][
        constants.ANN_SPEC_HASH]
    await cluster.eventually(lambda: cluster.dm("r1-update")["status"]["observedGeneration"] == 2,
                             what="observedGeneration 2")


async def test_invalid_update_is_refused_and_leaves_the_inference_service_alone(cluster, operator, sample_dm) -> None:
    before = await created(cluster, operator, sample_dm, "r1-invalid")
    bad = {"spec": {"replicas": None, "autoscaling": {"minReplicas": 3, "maxReplicas": 1, "metric": "cpu"}}}
    await cluster.patch_dm("r1-invalid", bad)
    validated = await cluster.eventually(
        lambda: (c := cluster.condition("r1-invalid", "Validated")) and c["status"] == "False" and c,
        what="Validated=False",
    )
    assert validated["reason"] == "InvalidSpec"
    assert "spec.autoscaling.minReplicas" in validated["message"]
    warning = await cluster.eventually(
        lambda: [e for e in cluster.events("r1-invalid") if e["reason"] == "InvalidSpec"], what="an InvalidSpec event"
    )
    assert warning[0]["type"] == "Warning" and "minReplicas" in warning[0]["message"]
    await asyncio.sleep(0.5)  # give a wrong operator the time to touch the child
    after = cluster.isvc("r1-invalid")
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
    assert after["spec"] == before["spec"]
    assert cluster.dm("r1-invalid")["status"]["observedGeneration"] == 2

    await cluster.patch_dm("r1-invalid", {"spec": {"autoscaling": None, "replicas": 3}})  # fixed: applied
    await cluster.eventually(lambda: cluster.condition("r1-invalid", "Validated")["status"] == "True",
                             what="Validated=True again")
    fixed = await cluster.eventually(lambda: (i := cluster.isvc("r1-invalid"))["spec"]["predictor"]["minReplicas"] == 3
                                     and i, what="the fixed spec applied")
    assert fixed["spec"]["predictor"]["maxReplicas"] == 3


async def test_inference_service_deleted_or_edited_by_hand_is_restored(cluster, operator, sample_dm) -> None:
    original = await created(cluster, operator, sample_dm, "r1-drift")
    await cluster.delete_isvc("r1-drift")
    restored = await cluster.eventually(lambda: cluster.isvc("r1-drift"), timeout=5, what="the recreated child")
    assert restored["metadata"]["uid"] != original["metadata"]["uid"]
    assert restored["spec"] == original["spec"]

    await cluster.patch_isvc("r1-drift", {"spec": {"predictor": {"minReplicas": 0, "model": {"args": ["--oops"]}}},
                                          "metadata": {"labels": {constants.LABEL_PART_OF: "someone-else"}}})
    repaired = await cluster.eventually(
        lambda: (i := cluster.isvc("r1-drift"))["spec"] == original["spec"] and i, timeout=5, what="the repaired child"
    )
    assert repaired["metadata"]["labels"] == original["metadata"]["labels"]
    assert repaired["metadata"]["uid"] == restored["metadata"]["uid"], "repaired in place"
    await cluster.eventually(lambda: any(e["reason"] == "DriftRepaired" for e in cluster.events("r1-drift")),
                             what="a DriftRepaired event")


async def test_restarted_operator_resumes_without_duplicate_writes(cluster, operator, sample_dm) -> None:
    await created(cluster, operator, sample_dm, "r1-restart")
    await asyncio.sleep(0.5)  # let the child's ADDED event settle
    writes = (cluster.writes("distilledmodels", "r1-restart"), cluster.writes("inferenceservices", "r1-restart"))
    events = len(cluster.events("r1-restart"))
    resumed = REGISTRY.get_sample_value(RECONCILES, {"trigger": "resume", "result": "unchanged"}) or 0.0
    await operator.restart()
    await cluster.eventually(
        lambda: (REGISTRY.get_sample_value(RECONCILES, {"trigger": "resume", "result": "unchanged"}) or 0) > resumed,
        what="the resume handler's no-op reconcile",
    )
    await asyncio.sleep(1.0)  # the initial listing of children is processed too
    assert (cluster.writes("distilledmodels", "r1-restart"), cluster.writes("inferenceservices", "r1-restart")) == writes
    assert len(cluster.events("r1-restart")) == events
    # ... and the restarted operator is alive: a spec change still goes through.
    await cluster.patch_dm("r1-restart", {"spec": {"serving": {"maxQueue": 7}}})
    await cluster.eventually(lambda: "--max_queue=7" in cluster.isvc("r1-restart")["spec"]["predictor"]["model"]["args"],
                             what="the update after the restart")


async def test_api_conflicts_and_server_errors_are_retried_until_converged(cluster, operator, sample_dm) -> None:
    cluster.emu.fail("POST", "inferenceservices", 500, count=2)
    cluster.emu.fail("PATCH", "distilledmodels", 500, count=2, subresource="status")
    await cluster.apply(sample_dm("r1-faults"))
    await cluster.eventually(lambda: cluster.isvc("r1-faults"), timeout=15, what="the child despite two 500s")
    await cluster.eventually(lambda: cluster.phase("r1-faults") == "Deploying", timeout=10,
                             what="the status despite two 500s")

    cluster.emu.fail("PATCH", "inferenceservices", 409, count=2)
    cluster.emu.fail("GET", "inferenceservices", 503, count=1)
    await cluster.patch_dm("r1-faults", {"spec": {"serving": {"maxBatchSize": 4}}})
    await cluster.eventually(
        lambda: "--max_batch_size=4" in cluster.isvc("r1-faults")["spec"]["predictor"]["model"]["args"],
        timeout=15, what="the update despite a 503 and two 409s",
    )
    # The status the operator mirrors from a child event is its own write: a 409 there is re-tried.
    cluster.emu.fail("PATCH", "distilledmodels", 409, count=2, subresource="status")
    await cluster.patch_isvc("r1-faults", {"status": READY_STATUS}, "status")
    await cluster.eventually(lambda: cluster.phase("r1-faults") == "Ready", timeout=10,
                             what="phase Ready despite two 409s")
    assert all(f.served == f.count for f in cluster.emu.faults), "every injected fault was hit"
    assert cluster.emu.writes[("inferenceservices", "default", "r1-faults")] >= 2
