"""The operator's wiring: kopf registration, no blocking calls, RBAC in step with the calls, scope, metrics."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import kopf
import pytest
from prometheus_client import REGISTRY

from distillery_operator import constants, handlers, metrics, rbac, reconcile, runner
from distillery_operator.reconcile import DM, ISVC, Reconciler
from distillery_operator.settings import OperatorSettings, RenderSettings
from distillery_operator.testing.memclient import MemoryClient

PACKAGE = Path(handlers.__file__).parent
BLOCKING_MODULES = {"kubernetes", "requests", "urllib.request", "http.client", "pykube", "subprocess"}


def test_every_handler_is_async_and_timers_need_no_finalizer() -> None:
    registry = handlers.register(kopf.OperatorRegistry(), OperatorSettings())
    changing = registry._changing.get_all_handlers()
    assert {h.id for h in changing} == {"reconcile-create", "reconcile-update", "reconcile-resume", "forget",
                                        "job-create", "job-update", "job-resume", "job-forget"}
    assert all(not h.requires_finalizer for h in changing), "no finalizer: the ownerReference does the cleanup"
    spawning = registry._spawning.get_all_handlers()
    assert [h.id for h in spawning] == ["resync", "rollout", "job-resync"]
    assert not any(h.requires_finalizer for h in spawning)
    watching = registry._watching.get_all_handlers()
    assert [h.labels for h in watching] == [{constants.LABEL_MODEL: kopf.PRESENT}, {constants.LABEL_JOB: kopf.PRESENT}]
    for handler in [*changing, *spawning, *watching]:
        assert inspect.iscoroutinefunction(handler.fn), handler.id


@pytest.mark.parametrize("module", ["handlers.py", "reconcile.py", "status.py", "runner.py", "metrics.py",
                                    "distillation_reconcile.py", "distillation_status.py", "rollout.py", "rollout_job.py"])
def test_operator_code_imports_no_blocking_client(module: str) -> None:
    tree = ast.parse((PACKAGE / module).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not {m for m in imported if m.split(".")[0] in BLOCKING_MODULES or m in BLOCKING_MODULES}
    calls = {ast.unparse(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    assert "time.sleep" not in calls


async def test_rbac_covers_every_call_a_reconcile_makes() -> None:
    client = MemoryClient()
    reconciler = Reconciler(client, RenderSettings())
    body = client.put(DM, {"apiVersion": "distillery.dev/v1alpha1", "kind": "DistilledModel",
                           "metadata": {"name": "r1", "namespace": "ns"},
                           "spec": {"model": {"uri": "hf://a/b"}}})
    await reconciler.reconcile(body, trigger="create")
    client.objects[(ISVC.plural, "ns", "r1")]["spec"] = {}  # drift: forces a patch of the child
    await reconciler.reconcile_child("MODIFIED", client.objects[(ISVC.plural, "ns", "r1")])
    groups = {DM.plural: constants.GROUP, ISVC.plural: constants.KSERVE_GROUP, "events": ""}
    used = set()
    for call in client.calls:
        verb = "create" if call.verb == "event" else call.verb
        resource = call.plural + (f"/{call.subresource}" if call.subresource else "")
        used.add((groups[call.plural], resource, verb))
    assert ("serving.kserve.io", "inferenceservices", "patch") in used
    assert used <= set(rbac.REQUIRED_PERMISSIONS), used - set(rbac.REQUIRED_PERMISSIONS)
    assert len(rbac.REQUIRED_PERMISSIONS) == len(set(rbac.REQUIRED_PERMISSIONS))
    assert not [p for p in rbac.REQUIRED_PERMISSIONS if p[2] in ("delete", "*") or "*" in p[1]]
    assert {tuple(r["verbs"]) for r in rbac.as_rules() if r["resources"] == ["inferenceservices"]} == {
        ("get", "list", "watch", "create", "patch")}


def test_scope_prefers_the_command_line_and_defaults_to_all_namespaces() -> None:
    settings = OperatorSettings(namespaces="a,b")
    assert runner.scope(settings, None, False) == (False, ["a", "b"])
    assert runner.scope(settings, ["c"], False) == (False, ["c"])
    assert runner.scope(settings, None, True) == (True, [])
    assert runner.scope(OperatorSettings(), None, False) == (True, [])


async def test_reconciles_are_counted_and_timed() -> None:
    def count(result: str) -> float:
        return REGISTRY.get_sample_value("distillery_operator_reconciles_total",
                                         {"trigger": "unit", "result": result}) or 0.0

    client = MemoryClient()
    body = client.put(DM, {"apiVersion": "distillery.dev/v1alpha1", "kind": "DistilledModel",
                           "metadata": {"name": "m1", "namespace": "ns"}, "spec": {"model": {"uri": "hf://a/b"}}})
    before = count("created"), count("retry")
    reconciler = Reconciler(client, RenderSettings())
    await reconciler.reconcile(body, trigger="unit")
    client.fail("get", "inferenceservices", 500)
    with pytest.raises(kopf.TemporaryError):
        await reconciler.reconcile(body, trigger="unit")
    assert (count("created"), count("retry")) == (before[0] + 1, before[1] + 1)
    assert REGISTRY.get_sample_value("distillery_operator_models", {"phase": "Deploying"}) >= 1
    metrics.forget_model("ns", "m1")
    assert reconcile.backoff(0) == 1.0 and reconcile.backoff(10) == 60.0
