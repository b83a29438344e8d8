"""The rollout through the reconciler on the in-process fake API, with a clock the test moves: a stale copy
of the model (a timer's, an event's) never takes a second step; the stable spec is what a rollback serves."""

from __future__ import annotations

import copy
from typing import Any

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
