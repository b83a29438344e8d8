"""A cluster without Kubeflow Trainer (no TrainJob API): a DistillationJob says so in a condition and an
Event, the operator keeps running (DistilledModels are still served), no crash loop."""

from __future__ import annotations

import pytest

from distillery_operator.testing.emulator import DJ_RESOURCE

from .test_distillation import DJ_PATH, NS, dj

pytestmark = pytest.mark.integration


@pytest.fixture
def trainer_installed() -> bool:
    return False


async def test_no_train_job_api_is_a_condition(cluster, operator, sample_dm) -> None:
    await cluster.request("POST", DJ_PATH, dj("dj-nt"))

    def installed() -> dict:
        body = cluster.emu.read(DJ_RESOURCE, NS, "dj-nt") or {}
        return next((c for c in (body.get("status") or {}).get("conditions") or []
                     if c["type"] == "TrainerInstalled"), {})

    cond = await cluster.eventually(lambda: installed().get("status") == "False" and installed(),
                                    what="TrainerInstalled=False")
    assert cond["reason"] == "TrainerNotInstalled" and "Kubeflow Trainer" in cond["message"]
    assert (cluster.emu.read(DJ_RESOURCE, NS, "dj-nt") or {})["status"]["phase"] == "Pending"
    await cluster.eventually(lambda: [e for e in cluster.events("dj-nt") if e["reason"] == "TrainerNotInstalled"],
                             what="a TrainerNotInstalled event")
    await cluster.apply(sample_dm("r1-still-served"))  # the operator still works
    await cluster.eventually(lambda: cluster.isvc("r1-still-served"), what="an InferenceService")
