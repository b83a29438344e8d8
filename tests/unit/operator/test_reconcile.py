"""The reconciler against an in-process fake API (memclient): writes, no-ops, conflicts, faults, bad specs."""

from __future__ import annotations

import copy
from typing import Any

import kopf
import pytest

from distillery_operator import constants
from distillery_operator.api import parse_distilled_model
from distillery_operator.reconcile import (
    DM,
    ISVC,
    ApiError,
    Reconciler,
    backoff,
    contains,
    isvc_in_sync,
    merge_patch,
    owner_reference,
)
from distillery_operator.render import render_inference_service
from distillery_operator.settings import RenderSettings
from distillery_operator.testing.memclient import MemoryClient

NS, NAME = "models", "r1"
CLOCK = "2026-01-01T00:00:00Z"


def dm_object(**spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": {"uri": "hf://deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"}, "hardwareProfile": "t4",
                            "quantization": {"method": "int8"}, "replicas": 1}
    body.update(spec)
    return {"apiVersion": "distillery.dev/v1alpha1", "kind": "DistilledModel",
            "metadata": {"name": NAME, "namespace": NS}, "spec": body}


@pytest.fixture
def client() -> MemoryClient:
    return MemoryClient()


@pytest.fixture
def reconciler(client: MemoryClient) -> Reconciler:
    return Reconciler(client, RenderSettings(), clock=lambda: CLOCK)


def stored_dm(client: MemoryClient) -> dict[str, Any]:
    return copy.deepcopy(client.objects[(DM.plural, NS, NAME)])


def stored_isvc(client: MemoryClient) -> dict[str, Any]:
    return copy.deepcopy(client.objects[(ISVC.plural, NS, NAME)])


async def converged(client: MemoryClient, reconciler: Reconciler, **spec: Any) -> dict[str, Any]:
    body = client.put(DM, dm_object(**spec))
    outcome = await reconciler.reconcile(body, trigger="create")
    assert outcome.action == "created"
    client.calls.clear()
    client.events.clear()
    return stored_dm(client)


async def test_first_reconcile_creates_the_child_with_owner_and_writes_status(client, reconciler) -> None:
    body = client.put(DM, dm_object())
    outcome = await reconciler.reconcile(body, trigger="create")
    assert (outcome.action, outcome.writes, outcome.phase) == ("created", 2, "Deploying")
    isvc = stored_isvc(client)
    expected = render_inference_service(parse_distilled_model(body), RenderSettings())
    assert isvc["spec"] == expected["spec"]
    assert isvc["metadata"]["ownerReferences"] == [owner_reference(body)]
    assert owner_reference(body)["uid"] == body["metadata"]["uid"] and owner_reference(body)["controller"] is True
    status = stored_dm(client)["status"]
    assert status["phase"] == "Deploying" and status["observedGeneration"] == 1
    assert [e[2] for e in client.events] == ["Created"]
    assert [(c.verb, c.plural) for c in client.writes()] == [("create", "inferenceservices"), ("patch", "distilledmodels")]


async def test_reconcile_without_change_sends_no_write(client, reconciler) -> None:
    body = await converged(client, reconciler)
    for trigger in ("resume", "resync"):
        outcome = await reconciler.reconcile(body, trigger=trigger)
        assert (outcome.action, outcome.writes) == ("unchanged", 0)
    assert client.writes() == [] and client.events == []
    # ... also when the child's own event hands the live object in: no read either.
    client.calls.clear()
    await reconciler.reconcile(body, trigger="child", live=stored_isvc(client))
    assert client.calls == []


async def test_spec_change_patches_in_place_and_removes_stale_fields(client, reconciler) -> None:
    await converged(client, reconciler)
    before = stored_isvc(client)
    body = stored_dm(client)
    body["spec"]["replicas"] = None
    body["spec"]["autoscaling"] = {"minReplicas": 0, "maxReplicas": 3, "metric": "concurrency"}
    body["metadata"]["generation"] = 2
    outcome = await reconciler.reconcile(body, trigger="update")
    assert outcome.action == "patched" and outcome.events == ["Updated"]
    after = stored_isvc(client)
    assert after["metadata"]["uid"] == before["metadata"]["uid"]
    assert after["spec"]["predictor"]["scaleMetric"] == "concurrency"
    assert after["metadata"]["annotations"][constants.ANN_DEPLOYMENT_MODE] == "Knative"
    assert constants.ANN_AUTOSCALER_CLASS not in after["metadata"]["annotations"], "stale annotation removed"
    expected = render_inference_service(parse_distilled_model(body), RenderSettings())
    assert after["spec"] == expected["spec"]
    assert stored_dm(client)["status"]["observedGeneration"] == 2


async def test_hand_edits_are_repaired_and_reported(client, reconciler) -> None:
    body = await converged(client, reconciler)
    isvc = stored_isvc(client)
    isvc["spec"]["predictor"]["model"]["args"] = ["--oops"]
    isvc["spec"]["predictor"]["extra"] = "kept out"
    client.objects[(ISVC.plural, NS, NAME)] = isvc
    outcome = await reconciler.reconcile(body, trigger="child", live=isvc)
    assert outcome.action == "patched" and outcome.events == ["DriftRepaired"]
    repaired = stored_isvc(client)
    assert "--oops" not in repaired["spec"]["predictor"]["model"]["args"]
    assert "extra" not in repaired["spec"]["predictor"]
    assert ("Warning", "DriftRepaired") in {(e[1], e[2]) for e in client.events}


async def test_child_deleted_by_hand_is_recreated(client, reconciler) -> None:
    await converged(client, reconciler)
    gone = client.objects.pop((ISVC.plural, NS, NAME))
    outcome = await reconciler.reconcile_child("DELETED", gone)
    assert outcome is not None and outcome.action == "created"
    assert (ISVC.plural, NS, NAME) in client.objects


async def test_child_without_owner_model_is_left_alone(client, reconciler) -> None:
    orphan = {"metadata": {"name": "x", "namespace": NS, "labels": {constants.LABEL_MODEL: "x"}}}
    assert await reconciler.reconcile_child("MODIFIED", orphan) is None
    assert client.writes() == []


async def test_create_conflict_rereads_and_adopts_an_identical_child(client, reconciler) -> None:
    body = client.put(DM, dm_object())
    desired = render_inference_service(parse_distilled_model(body), RenderSettings())
    desired["metadata"]["ownerReferences"] = [owner_reference(body)]

    async def racing_create(ref, namespace, obj):  # someone else creates it between our read and our create
        client.put(ISVC, desired)
        raise ApiError(409, "already exists")

    client.create = racing_create  # type: ignore[method-assign]
    outcome = await reconciler.reconcile(body, trigger="create")
    assert outcome.action == "unchanged"
    assert [c.verb for c in client.writes("inferenceservices")] == []


async def test_patch_conflict_rereads_and_retries(client, reconciler) -> None:
    body = await converged(client, reconciler)
    body["spec"]["serving"] = {"maxBatchSize": 2}
    client.fail("patch", "inferenceservices", 409, count=2)
    outcome = await reconciler.reconcile(body, trigger="update")
    assert outcome.action == "patched"
    assert len(client.writes("inferenceservices")) == 3
    assert "--max_batch_size=2" in stored_isvc(client)["spec"]["predictor"]["model"]["args"]


async def test_endless_conflicts_become_a_temporary_error(client, reconciler) -> None:
    body = await converged(client, reconciler)
    body["spec"]["serving"] = {"maxBatchSize": 2}
    client.fail("patch", "inferenceservices", 409, count=100)
    with pytest.raises(kopf.TemporaryError):
        await reconciler.reconcile(body, trigger="update")


@pytest.mark.parametrize("verb", ["get", "create"])
@pytest.mark.parametrize("status", [500, 503, 429, 0])
async def test_server_errors_and_lost_connections_become_temporary_errors_with_backoff(
    client, reconciler, verb: str, status: int
) -> None:
    body = client.put(DM, dm_object())
    client.fail(verb, "inferenceservices", status)
    with pytest.raises(kopf.TemporaryError) as caught:
        await reconciler.reconcile(body, trigger="create", retry=3)
    assert caught.value.delay == backoff(3) == 8.0
    outcome = await reconciler.reconcile(body, trigger="create", retry=4)  # the retry converges
    assert outcome.action == "created"


async def test_status_write_to_a_deleted_model_is_not_an_error(client, reconciler) -> None:
    body = client.put(DM, dm_object())
    client.fail("patch", "distilledmodels", 404)
    outcome = await reconciler.reconcile(body, trigger="create")
    assert outcome.action == "gone"


async def test_child_controlled_by_someone_else_is_not_taken_over(client, reconciler) -> None:
    body = client.put(DM, dm_object())
    client.put(ISVC, {"metadata": {"name": NAME, "namespace": NS, "ownerReferences": [
        {"apiVersion": "v1", "kind": "Other", "name": "o", "uid": "other-uid", "controller": True}]}, "spec": {}})
    with pytest.raises(kopf.TemporaryError, match="controlled by Other/o"):
        await reconciler.reconcile(body, trigger="create")
    assert client.writes("inferenceservices") == []


async def test_invalid_spec_is_recorded_once_and_leaves_the_child_untouched(client, reconciler) -> None:
    await converged(client, reconciler)
    isvc_before = stored_isvc(client)
    body = stored_dm(client)
    body["spec"]["autoscaling"] = {"minReplicas": 3, "maxReplicas": 1, "metric": "cpu"}
    body["metadata"]["generation"] = 2
    with pytest.raises(kopf.PermanentError, match="minReplicas"):
        await reconciler.reconcile(body, trigger="update")
    assert stored_isvc(client) == isvc_before
    assert client.writes("inferenceservices") == []
    status = stored_dm(client)["status"]
    validated = next(c for c in status["conditions"] if c["type"] == "Validated")
    assert (validated["status"], validated["reason"]) == ("False", "InvalidSpec")
    assert "spec.autoscaling.minReplicas" in validated["message"] and "spec.replicas" in validated["message"]
    assert status["observedGeneration"] == 2
    assert [(e[1], e[2]) for e in client.events] == [("Warning", "InvalidSpec")]

    # The resync or a child event sees the same bad generation again: no second Event, no write.
    client.calls.clear()
    client.events.clear()
    body["status"] = status
    with pytest.raises(kopf.PermanentError):
        await reconciler.reconcile(body, trigger="resync")
    assert client.writes() == [] and client.events == []


@pytest.mark.parametrize("verb", ["create", "patch"])
@pytest.mark.parametrize("status", [400, 422])
async def test_a_child_the_api_server_refuses_is_reported_on_the_model_not_retried(
    client, reconciler, verb: str, status: int
) -> None:
    """An admission webhook (or the API's own validation) refusing what a valid spec renders to is bad input
    too: Validated=False with the API's message and one Warning Event, no retry loop, the running child kept."""
    if verb == "create":
        body, before = client.put(DM, dm_object()), None
    else:
        body = await converged(client, reconciler)
        before = stored_isvc(client)
        body["spec"]["serving"] = {"maxBatchSize": 2}
        body["metadata"]["generation"] = 2
    client.fail(verb, "inferenceservices", status)
    with pytest.raises(kopf.PermanentError, match="refused"):
        await reconciler.reconcile(body, trigger="update")
    assert client.objects.get((ISVC.plural, NS, NAME)) == before
    validated = next(c for c in stored_dm(client)["status"]["conditions"] if c["type"] == "Validated")
    assert validated["status"] == "False" and f"HTTP {status}" in validated["message"]
    assert [(e[1], e[2]) for e in client.events] == [("Warning", "InvalidSpec")]


def test_contains_tolerates_defaulted_keys_but_not_changed_values() -> None:
    assert contains({"a": {"b": 1}}, {"a": {"b": 1, "defaulted": True}, "c": 2})
    assert not contains({"a": {"b": 1}}, {"a": {"b": 2}})
    assert not contains({"args": ["x"]}, {"args": ["x", "y"]})
    assert not contains({"a": 1}, {})


def test_merge_patch_nulls_what_the_desired_object_lacks() -> None:
    assert merge_patch({"a": 1, "b": {"c": 1, "d": 2}}, {"b": {"c": 2}}) == {"a": None, "b": {"c": 2, "d": None}}


def test_in_sync_needs_the_hash_the_fields_and_our_controller_reference() -> None:
    body = {**dm_object(), "metadata": {"name": NAME, "namespace": NS, "uid": "u1", "generation": 1}}
    desired = render_inference_service(parse_distilled_model(body), RenderSettings())
    desired["metadata"]["ownerReferences"] = [owner_reference(body)]
    live = copy.deepcopy(desired)
    assert isvc_in_sync(desired, live, "u1")
    assert not isvc_in_sync(desired, live, "another-uid")
    live["metadata"]["annotations"][constants.ANN_SPEC_HASH] = "0"
    assert not isvc_in_sync(desired, live, "u1")


async def test_a_new_model_creates_its_child_without_reading_first(client, reconciler) -> None:
    body = client.put(DM, dm_object())
    await reconciler.reconcile(body, trigger="create", assume_absent=True)
    assert [c.verb for c in client.calls if c.plural == "inferenceservices"] == ["create"]
    # ... and when the child is there after all, the 409 leads to a read and nothing else.
    client.calls.clear()
    outcome = await reconciler.reconcile(stored_dm(client), trigger="create", assume_absent=True)
    assert [c.verb for c in client.calls if c.plural == "inferenceservices"] == ["create", "get"]
    assert outcome.action == "unchanged" and client.writes() == [c for c in client.writes() if c.verb == "create"]


async def test_status_rides_in_kopfs_patch_when_a_sink_is_given(client, reconciler) -> None:
    body = client.put(DM, dm_object())
    sink: dict[str, Any] = {}
    outcome = await reconciler.reconcile(body, trigger="create", status_sink=sink)
    assert sink["phase"] == "Deploying" and outcome.writes == 2
    assert [(c.verb, c.plural) for c in client.writes()] == [("create", "inferenceservices")]
    assert "status" not in stored_dm(client), "the handler's kopf patch writes it, not the reconciler"


async def test_child_event_that_changes_nothing_costs_no_api_call(client, reconciler) -> None:
    await converged(client, reconciler)
    assert await reconciler.reconcile_child("MODIFIED", stored_isvc(client)) is not None
    assert client.calls == []
    # A status change of the child is mirrored: read the model, write its status.
    isvc = stored_isvc(client)
    isvc["status"] = {"url": "http://r1", "conditions": [{"type": "Ready", "status": "True"}]}
    client.objects[(ISVC.plural, NS, NAME)] = isvc
    outcome = await reconciler.reconcile_child("MODIFIED", isvc)
    assert outcome is not None and outcome.phase == "Ready"
    assert [(c.verb, c.plural) for c in client.calls] == [
        ("get", "distilledmodels"), ("event", "events"), ("patch", "distilledmodels")]  # the event: Ready
    # ... and a model the reconciler has forgotten is read back before anything is decided.
    reconciler.forget(NS, NAME)
    client.calls.clear()
    await reconciler.reconcile_child("MODIFIED", isvc)
    assert [(c.verb, c.plural) for c in client.calls] == [("get", "distilledmodels")]
