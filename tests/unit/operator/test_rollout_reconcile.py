"""The rollout through the reconciler on the in-process fake API, with a clock the test moves: a stale copy
of the model (a timer's, an event's) never takes a second step; the stable spec is what a rollback serves."""

from __future__ import annotations

import copy
from typing import Any

import kopf
import pytest

from distillery_operator import metrics
from distillery_operator.reconcile import DM, ISVC, Reconciler
from distillery_operator.settings import RenderSettings
from distillery_operator.testing.memclient import MemoryClient

NS, NAME = "models", "r1"


class Clock:
    def __init__(self) -> None:
        self.seconds = 0

    def __call__(self) -> str:
        return f"2026-01-01T00:{self.seconds // 60:02d}:{self.seconds % 60:02d}Z"


def dm_object() -> dict[str, Any]:
    return {"apiVersion": "distillery.dev/v1alpha1", "kind": "DistilledModel",
            "metadata": {"name": NAME, "namespace": NS},
            "spec": {"model": {"uri": "pvc://models/r1"}, "deploymentMode": "Knative", "quantization": {"method": "int4"},
                     "rollout": {"steps": [10, 50, 90], "analysis": {"interval": "10s"}}}}


def set_revisions(client: MemoryClient, latest: str, rolled_out: str) -> None:
    isvc = client.objects[(ISVC.plural, NS, NAME)]
    isvc["status"] = {"conditions": [{"type": "Ready", "status": "True"}], "components": {"predictor": {
        "latestCreatedRevision": latest, "latestReadyRevision": latest, "latestRolledoutRevision": rolled_out}}}


def stored(client: MemoryClient) -> dict[str, Any]:
    return copy.deepcopy(client.objects[(DM.plural, NS, NAME)])


async def test_a_stale_copy_never_takes_a_second_step() -> None:
    client, clock = MemoryClient(), Clock()
    reconciler = Reconciler(client, RenderSettings(), clock=clock)
    client.put(DM, dm_object())
    await reconciler.reconcile(stored(client), trigger="create")
    assert stored(client)["status"]["rollout"]["phase"] == "Idle"
    set_revisions(client, "r1-predictor-00001", "r1-predictor-00001")
    await client.patch(DM, NS, NAME, {"spec": {"quantization": {"method": "int8"}}})
    await reconciler.reconcile(stored(client), trigger="update")
    assert stored(client)["status"]["rollout"]["step"] == 1
    set_revisions(client, "r1-predictor-00002", "r1-predictor-00001")
    await reconciler.reconcile(stored(client), trigger="child")  # the candidate is ready: step 1's clock starts
    clock.seconds = 10
    stale = stored(client)  # a copy taken when step 1 was due
    await reconciler.reconcile(stale, trigger="rollout")
    assert stored(client)["status"]["rollout"]["step"] == 2
    await reconciler.reconcile(stale, trigger="resync")  # the same old copy again, at the same time
    rollout = stored(client)["status"]["rollout"]
    assert (rollout["step"], rollout["trafficPercent"]) == (2, 50)
    assert client.objects[(ISVC.plural, NS, NAME)]["spec"]["predictor"]["canaryTrafficPercent"] == 50
    assert [reason for _, _, reason, _ in client.events].count("RolloutStep") == 1


async def rolling_out(client: MemoryClient, reconciler: Reconciler) -> dict[str, Any]:
    """int4 (revision -00001) rolling out int8, whose revision -00002 is ready at step 1. Returns the child as it
    was before the candidate's revision existed (what a late watch event may still carry)."""
    client.put(DM, dm_object())
    await reconciler.reconcile(stored(client), trigger="create")
    set_revisions(client, "r1-predictor-00001", "r1-predictor-00001")
    before_the_candidate = copy.deepcopy(client.objects[(ISVC.plural, NS, NAME)])
    await client.patch(DM, NS, NAME, {"spec": {"quantization": {"method": "int8"}}})
    await reconciler.reconcile(stored(client), trigger="update")
    set_revisions(client, "r1-predictor-00002", "r1-predictor-00001")
    await reconciler.reconcile(stored(client), trigger="child")
    assert stored(client)["status"]["rollout"]["candidateRevision"] == "r1-predictor-00002"
    return before_the_candidate


async def test_a_new_candidate_mid_rollout_never_takes_the_previous_candidates_revision() -> None:
    client, clock = MemoryClient(), Clock()
    reconciler = Reconciler(client, RenderSettings(), clock=clock)
    await rolling_out(client, reconciler)
    await client.patch(DM, NS, NAME, {"spec": {"quantization": {"method": "none"}}})  # C1 -> C2 mid-rollout
    await reconciler.reconcile(stored(client), trigger="update")
    assert "candidateRevision" not in stored(client)["status"]["rollout"]  # -00002 is C1's, not C2's
    for seconds in (10, 20, 30, 40):  # C2's revision is never created: nothing steps, nothing is promoted
        clock.seconds = seconds
        await reconciler.reconcile(stored(client), trigger="resync")
    rollout = stored(client)["status"]["rollout"]
    assert (rollout["phase"], rollout["step"]) == ("Progressing", 1) and "candidateReadyAt" not in rollout
    assert rollout["baseRevision"] == "r1-predictor-00002"
    set_revisions(client, "r1-predictor-00003", "r1-predictor-00001")  # C2's revision, ready
    await reconciler.reconcile(stored(client), trigger="child")
    rollout = stored(client)["status"]["rollout"]
    assert rollout["candidateRevision"] == "r1-predictor-00003" and rollout["candidateReadyAt"]


async def test_an_abandoned_candidate_serves_nothing_while_the_stable_spec_is_restored() -> None:
    client, clock = MemoryClient(), Clock()
    reconciler = Reconciler(client, RenderSettings(), clock=clock)
    await rolling_out(client, reconciler)
    await client.patch(DM, NS, NAME, {"spec": {"quantization": {"method": "int4"}}})  # back to the stable model
    await reconciler.reconcile(stored(client), trigger="update")
    assert stored(client)["status"]["rollout"]["phase"] == "Idle"
    # The abandoned candidate -00002 is still Knative's latest ready revision: all traffic stays on -00001.
    assert client.objects[(ISVC.plural, NS, NAME)]["spec"]["predictor"]["canaryTrafficPercent"] == 0
    await reconciler.reconcile(stored(client), trigger="child")  # nothing changed: still held
    assert client.objects[(ISVC.plural, NS, NAME)]["spec"]["predictor"]["canaryTrafficPercent"] == 0
    set_revisions(client, "r1-predictor-00003", "r1-predictor-00001")  # the reverted spec's revision is ready
    await reconciler.reconcile(stored(client), trigger="child")
    assert "canaryTrafficPercent" not in client.objects[(ISVC.plural, NS, NAME)]["spec"]["predictor"]
    rollout = stored(client)["status"]["rollout"]
    assert rollout["phase"] == "Idle" and "candidateRevision" not in rollout


async def test_an_old_copy_of_the_child_from_a_late_event_never_lifts_the_hold() -> None:
    client, clock = MemoryClient(), Clock()
    reconciler = Reconciler(client, RenderSettings(), clock=clock)
    before_the_candidate = await rolling_out(client, reconciler)
    await client.patch(DM, NS, NAME, {"spec": {"quantization": {"method": "int4"}}})  # abandoned
    await reconciler.reconcile(stored(client), trigger="update")
    assert client.objects[(ISVC.plural, NS, NAME)]["spec"]["predictor"]["canaryTrafficPercent"] == 0
    # A watch event delivered late carries the child as it was before the candidate's revision existed: by
    # that copy nothing would be restoring, yet -00002 is still Knative's latest ready revision.
    await reconciler.reconcile_child("MODIFIED", before_the_candidate)
    assert client.objects[(ISVC.plural, NS, NAME)]["spec"]["predictor"]["canaryTrafficPercent"] == 0
    assert stored(client)["status"]["rollout"]["candidateRevision"] == "r1-predictor-00002"
    await reconciler.reconcile(stored(client), trigger="rollout")  # the next tick still holds
    assert client.objects[(ISVC.plural, NS, NAME)]["spec"]["predictor"]["canaryTrafficPercent"] == 0


async def test_a_failed_status_write_neither_counts_nor_announces_the_rollout_twice() -> None:
    client, clock = MemoryClient(), Clock()
    reconciler = Reconciler(client, RenderSettings(), clock=clock)
    client.put(DM, dm_object())
    await reconciler.reconcile(stored(client), trigger="create")
    set_revisions(client, "r1-predictor-00001", "r1-predictor-00001")
    await client.patch(DM, NS, NAME, {"spec": {"quantization": {"method": "int8"}}})
    started = metrics.ROLLOUTS.labels(NS, NAME, "started")
    before = started._value.get()
    client.fail("patch", DM.plural, 500)  # the status write of the rollout's start
    with pytest.raises(kopf.TemporaryError):
        await reconciler.reconcile(stored(client), trigger="update")
    assert "RolloutStarted" not in [reason for _, _, reason, _ in client.events]
    await reconciler.reconcile(stored(client), trigger="retry")
    assert stored(client)["status"]["rollout"]["phase"] == "Progressing"
    assert [reason for _, _, reason, _ in client.events].count("RolloutStarted") == 1
    assert started._value.get() == before + 1
