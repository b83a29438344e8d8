"""Two operator gaps: a predictor never ready within startupTimeoutSeconds is Failed with that reason (not
Deploying forever); queueDepth/gpuUtilization autoscaling on a cluster without KEDA is refused with a reason."""

from __future__ import annotations

import kopf
import pytest

from distillery_operator.api import DistilledModelSpec
from distillery_operator.reconcile import DM, ISVC, Reconciler
from distillery_operator.settings import RenderSettings
from distillery_operator.status import compute_status
from distillery_operator.testing.memclient import MemoryClient

NS, NAME = "models", "r1"
SPEC = DistilledModelSpec.model_validate({"model": {"uri": "pvc://models/r1"}, "startupTimeoutSeconds": 60})
LOADING = {"status": {"conditions": [{"type": "Ready", "status": "False", "reason": "Deploying"}]}}
READY = {"status": {"conditions": [{"type": "Ready", "status": "True"}]}}


def status_at(seconds: int, previous: dict | None, isvc: dict = LOADING, generation: int = 1) -> dict:
    return compute_status(name=NAME, generation=generation, spec=SPEC, isvc=isvc, previous=previous,
                          now=f"2026-01-01T00:{seconds // 60:02d}:{seconds % 60:02d}Z")


def test_deploying_past_the_startup_timeout_is_failed_with_the_reason():
    first = status_at(0, None)
    assert first["phase"] == "Deploying" and first["deployingSince"] == "2026-01-01T00:00:00Z"
    still = status_at(60, first)
    assert still["phase"] == "Deploying" and still["deployingSince"] == first["deployingSince"]
    failed = status_at(61, still)
    assert failed["phase"] == "Failed" and failed.get("deployingSince") is None
    ready = next(c for c in failed["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "StartupTimeout" and "startupTimeoutSeconds (60s)" in failed["message"]
    # It stays Failed for this generation; it recovers when the predictor gets ready after all.
    assert status_at(120, failed)["phase"] == "Failed"
    assert status_at(130, failed, isvc=READY)["phase"] == "Ready"


def test_a_new_generation_restarts_the_clock():
    failed = status_at(61, status_at(0, None))
    assert failed["phase"] == "Failed"
    redeploying = status_at(70, failed, generation=2)
    assert redeploying["phase"] == "Deploying" and redeploying["deployingSince"] == "2026-01-01T00:01:10Z"


def test_ready_models_have_no_deploying_clock():
    assert status_at(5, None, isvc=READY).get("deployingSince") is None


def keda_model() -> dict:
    return {"apiVersion": "distillery.dev/v1alpha1", "kind": "DistilledModel",
            "metadata": {"name": NAME, "namespace": NS},
            "spec": {"model": {"uri": "pvc://models/r1"}, "deploymentMode": "Standard",
                     "autoscaling": {"maxReplicas": 3, "metric": "queueDepth"}}}


async def test_keda_metrics_are_refused_without_keda():
    client = MemoryClient()
    body = client.put(DM, keda_model())
    reconciler = Reconciler(client, RenderSettings(keda_enabled=False), clock=lambda: "2026-01-01T00:00:00Z")
    with pytest.raises(kopf.PermanentError, match="KEDA"):
        await reconciler.reconcile(body, trigger="create")
    assert (ISVC.plural, NS, NAME) not in client.objects
    status = client.objects[(DM.plural, NS, NAME)]["status"]
    validated = next(c for c in status["conditions"] if c["type"] == "Validated")
    assert validated["status"] == "False" and "keda.enabled" in validated["message"]
    assert any(reason == "InvalidSpec" and "KEDA" in message for _, _, reason, message in client.events)


async def test_keda_metrics_render_with_keda():
    client = MemoryClient()
    body = client.put(DM, keda_model())
    await Reconciler(client, RenderSettings(keda_enabled=True)).reconcile(body, trigger="create")
    isvc = client.objects[(ISVC.plural, NS, NAME)]
    assert isvc["spec"]["predictor"]["autoScaling"]["metrics"][0]["external"]["metric"]["backend"] == "prometheus"
