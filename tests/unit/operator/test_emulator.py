"""The cluster emulator the operator's integration tests, demo and benchmark run against: it must behave
like an API server where the operator relies on it (metadata, status subresource, conflicts, GC)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import kmock
import pytest_asyncio

from distillery_operator.testing.emulator import DM_RESOURCE, ISVC_RESOURCE, ClusterEmulator

DM_PATH = "/apis/distillery.dev/v1alpha1/namespaces/ns/distilledmodels"
ISVC_PATH = "/apis/serving.kserve.io/v1beta1/namespaces/ns/inferenceservices"
MERGE = {"Content-Type": "application/merge-patch+json"}


@pytest_asyncio.fixture
async def emu() -> AsyncIterator[ClusterEmulator]:
    async with ClusterEmulator() as emulator, kmock.Server(emulator):
        emulator.register_distillery()
        yield emulator


async def call(emu: ClusterEmulator, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with emu.request(method, path, json=body, headers=MERGE if method == "PATCH" else None) as response:
        return response.status, await response.json()


def dm(name: str = "m") -> dict[str, Any]:
    return {"apiVersion": "distillery.dev/v1alpha1", "kind": "DistilledModel", "metadata": {"name": name},
            "spec": {"model": {"uri": "hf://a/b"}}}


async def test_create_assigns_metadata(emu) -> None:
    status, created = await call(emu, "POST", DM_PATH, dm())
    assert status == 200
    meta = created["metadata"]
    assert meta["namespace"] == "ns" and meta["generation"] == 1 and meta["uid"] and meta["creationTimestamp"]
    status, event = await call(emu, "POST", "/api/v1/namespaces/ns/events", {"metadata": {"generateName": "e-"}})
    assert event["metadata"]["name"].startswith("e-")
    _, second = await call(emu, "POST", "/api/v1/namespaces/ns/events", {"metadata": {"generateName": "e-"}})
    assert second["metadata"]["name"] != event["metadata"]["name"]


async def test_generation_follows_spec_and_status_is_a_subresource(emu) -> None:
    _, created = await call(emu, "POST", DM_PATH, dm())
    rv0 = created["metadata"]["resourceVersion"]
    await call(emu, "PATCH", f"{DM_PATH}/m/status", {"status": {"phase": "Ready"}, "spec": {"replicas": 9}})
    stored = emu.read(DM_RESOURCE, "ns", "m")
    assert stored["status"] == {"phase": "Ready"} and "replicas" not in stored["spec"]
    assert stored["metadata"]["generation"] == 1 and stored["metadata"]["resourceVersion"] != rv0
    await call(emu, "PATCH", f"{DM_PATH}/m", {"spec": {"replicas": 2}, "status": {"phase": "Failed"}})
    stored = emu.read(DM_RESOURCE, "ns", "m")
    assert stored["metadata"]["generation"] == 2 and stored["status"] == {"phase": "Ready"}
    await call(emu, "PATCH", f"{DM_PATH}/m", {"metadata": {"labels": {"a": "b"}}})
    assert emu.read(DM_RESOURCE, "ns", "m")["metadata"]["generation"] == 2


async def test_stale_resource_version_is_a_conflict(emu) -> None:
    await call(emu, "POST", DM_PATH, dm())
    status, body = await call(emu, "PATCH", f"{DM_PATH}/m", {"metadata": {"resourceVersion": "0"}, "spec": {}})
    assert status == 409 and body["reason"] == "Conflict"


async def test_deleting_an_owner_collects_what_it_controls(emu) -> None:
    _, owner = await call(emu, "POST", DM_PATH, dm())
    ref = {"apiVersion": "distillery.dev/v1alpha1", "kind": "DistilledModel", "name": "m",
           "uid": owner["metadata"]["uid"], "controller": True}
    await call(emu, "POST", ISVC_PATH, {"metadata": {"name": "m", "ownerReferences": [ref]}, "spec": {}})
    await call(emu, "POST", ISVC_PATH, {"metadata": {"name": "other"}, "spec": {}})
    await call(emu, "DELETE", f"{DM_PATH}/m")
    assert emu.read(ISVC_RESOURCE, "ns", "m") is None
    assert emu.read(ISVC_RESOURCE, "ns", "other") is not None


async def test_injected_faults_answer_then_stop(emu) -> None:
    fault = emu.fail("POST", "distilledmodels", 503, count=2)
    assert (await call(emu, "POST", DM_PATH, dm()))[0] == 503
    assert (await call(emu, "POST", DM_PATH, dm()))[0] == 503
    assert emu.read(DM_RESOURCE, "ns", "m") is None, "a refused request changes nothing"
    assert (await call(emu, "POST", DM_PATH, dm()))[0] == 200
    assert fault.served == 2
    assert emu.writes[("distilledmodels", "ns", "m")] == 1, "refused writes are not counted as writes"


async def test_request_log_stays_bounded(emu) -> None:
    for i in range(60):
        await call(emu, "POST", DM_PATH, dm(f"m{i}"))
    assert len(emu._requests) < 40
    assert sum(n for (method, plural, _), n in emu.requests.items() if plural == "distilledmodels") == 60


async def test_an_absent_api_group_answers_404() -> None:
    async with ClusterEmulator() as emulator, kmock.Server(emulator):
        emulator.register_distillery(trainer=False)
        path = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/ns/trainjobs"
        assert (await call(emulator, "POST", path, {"metadata": {"name": "t"}}))[0] == 404
        assert (await call(emulator, "GET", f"{path}/t"))[0] == 404
