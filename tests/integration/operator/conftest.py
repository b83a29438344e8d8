"""Fixtures for the operator's integration tests: kmock's Kubernetes emulator and the real operator (kopf).

`cluster` is a ClusterEmulator (uid/resourceVersion/generation, status subresource, garbage collection,
fault injection) served on 127.0.0.1 at a free port; `operator` runs distillery_operator.runner.operate
in the test's event loop against it (standalone, all namespaces), and can be restarted.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import kmock
import kopf
import pytest
import pytest_asyncio
import yaml

from distillery_operator.runner import OperatorThread
from distillery_operator.settings import OperatorSettings
from distillery_operator.testing.emulator import DM_RESOURCE, EVENTS_RESOURCE, ISVC_RESOURCE, ClusterEmulator

pytestmark = pytest.mark.integration
NS = "default"
DM_PATH = f"/apis/distillery.dev/v1alpha1/namespaces/{NS}/distilledmodels"
ISVC_PATH = f"/apis/serving.kserve.io/v1beta1/namespaces/{NS}/inferenceservices"


class Cluster:
    """The emulator plus the kubectl-like calls a test makes."""

    def __init__(self, emulator: ClusterEmulator) -> None:
        self.emu = emulator

    @property
    def url(self) -> str:
        return str(self.emu.url).rstrip("/")

    async def request(self, method: str, path: str, body: Any = None, content_type: str | None = None) -> Any:
        headers = {"Content-Type": content_type} if content_type else None
        async with self.emu.request(method, path, json=body, headers=headers) as response:
            data = await response.json()
            assert response.status < 300, f"{method} {path}: {response.status} {data}"
            return data

    async def apply(self, dm: dict[str, Any]) -> dict[str, Any]:
        return await self.request("POST", DM_PATH, dm)  # type: ignore[no-any-return]

    async def patch_dm(self, name: str, patch: dict[str, Any]) -> Any:
        return await self.request("PATCH", f"{DM_PATH}/{name}", patch, "application/merge-patch+json")

    async def patch_isvc(self, name: str, patch: dict[str, Any], subresource: str | None = None) -> Any:
        path = f"{ISVC_PATH}/{name}" + (f"/{subresource}" if subresource else "")
        return await self.request("PATCH", path, patch, "application/merge-patch+json")

    async def delete_isvc(self, name: str) -> Any:
        return await self.request("DELETE", f"{ISVC_PATH}/{name}")

    def dm(self, name: str) -> dict[str, Any] | None:
        return self.emu.read(DM_RESOURCE, NS, name)

    def isvc(self, name: str) -> dict[str, Any] | None:
        return self.emu.read(ISVC_RESOURCE, NS, name)

    def events(self, name: str) -> list[dict[str, Any]]:
        found = [self.emu.read(EVENTS_RESOURCE, NS, n) for n in self.emu.names(EVENTS_RESOURCE, NS)]
        return [e for e in found if e and (e.get("involvedObject") or {}).get("name") == name]

    def writes(self, plural: str, name: str) -> int:
        return self.emu.writes[(plural, NS, name)]

    def condition(self, name: str, type_: str) -> dict[str, Any]:
        return condition(self.dm(name), type_)

    def phase(self, name: str) -> str | None:
        return ((self.dm(name) or {}).get("status") or {}).get("phase")

    @staticmethod
    async def eventually(check: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:  # noqa: ASYNC109
        return await eventually(check, timeout, what)


async def eventually(check: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:  # noqa: ASYNC109
    """Poll `check` until it returns something truthy (and return that), or fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (KeyError, TypeError, IndexError):
            last = None
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def condition(dm: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    for cond in ((dm or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_:
            return dict(cond)
    return {}


@pytest.fixture
def sample_dm(repo_root: Path) -> Callable[[str], dict[str, Any]]:
    """A fresh copy of the CPU sample DistilledModel under a given name."""
    base = yaml.safe_load((repo_root / "manifests/samples/r1-distill-qwen-1.5b-int4-cpu.yaml").read_text())

    def make(name: str) -> dict[str, Any]:
        dm = copy.deepcopy(base)
        dm["metadata"] = {"name": name, "namespace": NS}
        return dm

    return make


@pytest.fixture
def trainer_installed() -> bool:
    """Whether the emulated cluster serves Kubeflow Trainer's TrainJobs; a test module can override this."""
    return True


@pytest_asyncio.fixture
async def cluster(trainer_installed: bool) -> AsyncIterator[Cluster]:
    async with ClusterEmulator() as emulator, kmock.Server(emulator):
        emulator.register_distillery(trainer=trainer_installed)
        yield Cluster(emulator)


class Operator:
    """The real operator, in its own thread and event loop, until stopped."""

    def __init__(self, cluster: Cluster, **overrides: Any) -> None:
        self.settings = OperatorSettings(
            metrics_port=0, liveness_port=0, standalone=True, log_format="text", **overrides
        )
        self.thread = OperatorThread(self.settings, kopf.ConnectionInfo(server=cluster.url, insecure=True))

    async def start(self) -> None:
        await asyncio.to_thread(self.thread.start)

    async def stop(self) -> None:
        await asyncio.to_thread(self.thread.stop)

    async def restart(self) -> None:
        await self.stop()
        await self.start()


@pytest.fixture
def operator_settings() -> dict[str, Any]:
    """Overrides of the operator's settings; a test module or test can override this fixture."""
    return {}


@pytest_asyncio.fixture
async def operator(cluster: Cluster, operator_settings: dict[str, Any]) -> AsyncIterator[Operator]:
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    op = Operator(cluster, **operator_settings)
    await op.start()
    try:
        yield op
    finally:
        await op.stop()
