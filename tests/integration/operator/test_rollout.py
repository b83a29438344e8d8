"""Stepped rollouts with the real operator on the emulator: a stub Prometheus HTTP API serves the candidate's
figures, the test plays KServe (revision names in the InferenceService's status) and the kubelet (the
evaluation Job's status and its pods' termination messages). Intervals are a second; the operator looks at
models in a rollout every 0.2 s."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web
from prometheus_client import REGISTRY

from distillery_operator import constants
from distillery_operator.evaluation.result import EvalResult
from distillery_operator.testing.emulator import JOBS_RESOURCE

pytestmark = pytest.mark.integration
NS = "default"
JOBS_PATH = f"/apis/batch/v1/namespaces/{NS}/jobs"
PODS_PATH = f"/api/v1/namespaces/{NS}/pods"
GOOD = {"p99": 0.8, "errors": 0.001, "tokens": 40.0, "rps": 4.0}


class StubPrometheus:
    """Answers each SLO query with the figure the test chose; remembers the queries."""

    def __init__(self) -> None:
        self.values: dict[str, float | None] = dict(GOOD)
        self.asked: list[str] = []
        self.url = ""

    def answer(self, query: str) -> float | None:
        if "histogram_quantile" in query:
            return self.values["p99"]
        if 'status=~"5.."' in query:
            return self.values["errors"]
        if "token" in query:
            return self.values["tokens"]
        return self.values["rps"]

    async def handle(self, request: web.Request) -> web.Response:
        query = request.query["query"]
        self.asked.append(query)
        value = self.answer(query)
        result = [] if value is None else [{"metric": {}, "value": [1700000000, str(value)]}]
        return web.json_response({"status": "success", "data": {"resultType": "vector", "result": result}})


@pytest_asyncio.fixture
async def prometheus() -> AsyncIterator[StubPrometheus]:
    stub = StubPrometheus()
    app = web.Application()
    app.router.add_get("/api/v1/query", stub.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    stub.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    yield stub
    await runner.cleanup()


@pytest.fixture
def operator_settings(prometheus: StubPrometheus) -> dict[str, Any]:
    return {"prometheus_url": prometheus.url, "rollout_analysis_enabled": True, "rollout_tick_seconds": 0.2,
            "resync_seconds": 60}


def rollout_dm(sample_dm, name: str, analysis: dict[str, Any]) -> dict[str, Any]:
    dm = sample_dm(name)
    dm["spec"]["deploymentMode"] = "Knative"
    dm["spec"]["rollout"] = {"steps": [10, 50], "analysis": analysis}
    return dm


SLO = {"interval": "1s", "slo": {"p99LatencySeconds": 2.0, "maxErrorRate": 0.01}}


def rollout(cluster, name: str) -> dict[str, Any]:
    return ((cluster.dm(name) or {}).get("status") or {}).get("rollout") or {}


def predictor(cluster, name: str) -> dict[str, Any]:
    return (cluster.isvc(name) or {}).get("spec", {}).get("predictor", {})


async def serving(cluster, name: str, *, latest: str, rolled_out: str) -> None:
    """Play KServe: the InferenceService is Ready, with these revisions."""
    await cluster.patch_isvc(name, {"status": {
        "url": f"http://{name}.default.example.com",
        "conditions": [{"type": "Ready", "status": "True"}, {"type": "PredictorReady", "status": "True"}],
        "components": {"predictor": {
            "latestCreatedRevision": latest, "latestReadyRevision": latest, "latestRolledoutRevision": rolled_out,
        }},
    }}, "status")


async def started_rollout(cluster, name: str) -> None:
    """The model serves revision 1; then a new quantization starts a rollout (revision 2 is the candidate)."""
    await cluster.eventually(lambda: rollout(cluster, name).get("phase") == "Idle", what="rollout Idle")
    await serving(cluster, name, latest=f"{name}-predictor-00001", rolled_out=f"{name}-predictor-00001")
    await cluster.patch_dm(name, {"spec": {"quantization": {"method": "int8"}}})
    await cluster.eventually(lambda: rollout(cluster, name).get("phase") in ("Progressing", "Evaluating"),
                             what="rollout started")
    await serving(cluster, name, latest=f"{name}-predictor-00002", rolled_out=f"{name}-predictor-00001")


def counted(name: str, outcome: str) -> float:
    return REGISTRY.get_sample_value("distillery_operator_rollouts_total",
                                     {"namespace": NS, "model": name, "outcome": outcome}) or 0.0


async def watch_traffic(cluster, name: str, seen: list[Any], stop: asyncio.Event) -> None:
    while not stop.is_set():
        percent = predictor(cluster, name).get("canaryTrafficPercent", "none")
        if not seen or seen[-1] != percent:
            seen.append(percent)
        await asyncio.sleep(0.02)


async def test_good_numbers_step_10_50_then_promote(cluster, operator, sample_dm, prometheus) -> None:
    name = "r1-good"
    await cluster.apply(rollout_dm(sample_dm, name, SLO))
    await cluster.eventually(lambda: cluster.isvc(name), what="InferenceService")
    assert cluster.isvc(name)["metadata"]["annotations"][constants.ANN_TAG_ROUTING] == "true"
    assert "canaryTrafficPercent" not in predictor(cluster, name)  # the first version serves at once
    seen: list[Any] = []
    stop = asyncio.Event()
    watcher = asyncio.create_task(watch_traffic(cluster, name, seen, stop))
    await started_rollout(cluster, name)
    await cluster.eventually(lambda: rollout(cluster, name).get("phase") == "Promoted", timeout=15, what="Promoted")
    await asyncio.sleep(0.3)
    stop.set()
    await watcher
    assert seen == ["none", 10, 50, "none"], seen
    assert "--quantization=int8" in predictor(cluster, name)["model"]["args"]
    status = rollout(cluster, name)
    assert status["stable"] == status["candidate"] and status["trafficPercent"] == 100
    assert status["lastAnalysis"]["passed"] is True and status["lastAnalysis"]["p99LatencySeconds"] == 0.8
    # Judged on the candidate revision's own pods.
    assert prometheus.asked and all(f'pod=~"{name}-predictor-00002-.*"' in q for q in prometheus.asked), \
        prometheus.asked[:3]
    assert all("[1s]" in q for q in prometheus.asked)  # over the step's interval
    reasons = [e["reason"] for e in cluster.events(name)]
    assert reasons.count("RolloutStep") == 1 and "Promoted" in reasons and "RolloutStarted" in reasons
    assert counted(name, "promoted") == 1


async def test_high_p99_rolls_back_with_the_reason_and_an_event(cluster, operator, sample_dm, prometheus) -> None:
    name = "r1-slow"
    await cluster.apply(rollout_dm(sample_dm, name, SLO))
    await cluster.eventually(lambda: cluster.isvc(name), what="InferenceService")
    prometheus.values["p99"] = 3.5
    await started_rollout(cluster, name)
    assert predictor(cluster, name)["canaryTrafficPercent"] == 10
    await cluster.eventually(lambda: rollout(cluster, name).get("phase") == "RolledBack", timeout=10, what="RolledBack")
    status = rollout(cluster, name)
    assert "P99 latency 3.5s > 2s" in status["message"] and status["trafficPercent"] == 0
    assert status["lastAnalysis"] == {**status["lastAnalysis"], "passed": False, "p99LatencySeconds": 3.5}
    # The stable spec is restored; all traffic stays on the stable revision (KServe's `prev`, canary 0) until
    # the restored spec's revision is ready, then it serves without a canary. The user's spec is untouched.
    await cluster.eventually(lambda: "--quantization=int4" in predictor(cluster, name)["model"]["args"],
                             what="stable spec restored")
    assert predictor(cluster, name)["canaryTrafficPercent"] == 0
    await serving(cluster, name, latest=f"{name}-predictor-00003", rolled_out=f"{name}-predictor-00001")
    await cluster.eventually(lambda: "canaryTrafficPercent" not in predictor(cluster, name), what="canary removed")
    assert "--quantization=int4" in predictor(cluster, name)["model"]["args"]
    assert cluster.dm(name)["spec"]["quantization"]["method"] == "int8"
    warning = [e for e in cluster.events(name) if e["reason"] == "RolledBack"]
    assert warning and warning[0]["type"] == "Warning" and "3.5s" in warning[0]["message"]
    assert counted(name, "rolled_back") == 1
    # It stays rolled back (no new rollout of the same candidate).
    await asyncio.sleep(1.5)
    assert rollout(cluster, name)["phase"] == "RolledBack" and counted(name, "started") == 1


async def finish_job(cluster, name: str, *, candidate: str | None, stable: str | None, failed: bool = False) -> None:
    """Play the Job controller and kubelet: the evaluation Job's pod terminated with these results."""
    jobs = await cluster.eventually(lambda: cluster.emu.names(JOBS_RESOURCE, NS), what="evaluation Job")
    job = jobs[0]
    statuses = [{"name": role, "state": {"terminated": {"exitCode": 1 if failed else 0, "message": message}}}
                for role, message in (("candidate", candidate), ("stable", stable)) if message]
    await cluster.request("POST", PODS_PATH, {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": f"{job}-abcde", "labels": {"batch.kubernetes.io/job-name": job}},
        "spec": {"containers": [{"name": "candidate", "image": "x"}]},
    })
    await cluster.request("PATCH", f"{PODS_PATH}/{job}-abcde/status", {"status": {"containerStatuses": statuses}},
                          "application/merge-patch+json")
    condition = {"type": "Failed" if failed else "Complete", "status": "True",
                 "reason": "BackoffLimitExceeded" if failed else "Completed"}
    await cluster.request("PATCH", f"{JOBS_PATH}/{job}/status", {"status": {"conditions": [condition]}},
                          "application/merge-patch+json")


def summary(score: float, std: float) -> str:
    """A compact result as distillery-eval writes it to its termination message."""
    return EvalResult(model="m", scorer="boxed", examples=20, repeats=3, score=score, score_std=std,
                      scores=[score] * 3, latency_s={"p50": 0.1, "p90": 0.2, "p99": 0.3}, requests=60, errors=0,
                      duration_s=3.0, min_score=None, passed=None).to_json()


EVAL = {"interval": "1s", "evaluation": {"dataset": {"uri": "pvc://evals/gsm8k.jsonl"}, "scorer": "boxed",
                                         "limit": 20, "repeats": 3, "minScore": 0.6, "maxRegression": 0.05}}


async def test_failing_evaluation_rolls_back_before_any_traffic_moved(cluster, operator, sample_dm) -> None:
    name = "r1-dumb"
    await cluster.apply(rollout_dm(sample_dm, name, EVAL))
    await cluster.eventually(lambda: cluster.isvc(name), what="InferenceService")
    await started_rollout(cluster, name)
    assert rollout(cluster, name)["phase"] == "Evaluating"
    jobs = await cluster.eventually(lambda: cluster.emu.names(JOBS_RESOURCE, NS), what="evaluation Job")
    job = cluster.emu.read(JOBS_RESOURCE, NS, jobs[0])
    containers = job["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["candidate", "stable"]
    command = " ".join(containers[0]["command"])
    assert f"--endpoint http://latest-{name}-predictor.{NS}.svc.cluster.local/openai/v1" in command
    assert "--dataset /dataset/gsm8k.jsonl" in command and "--repeats 3" in command
    assert job["metadata"]["ownerReferences"][0]["name"] == name
    assert predictor(cluster, name)["canaryTrafficPercent"] == 0  # no traffic while evaluating
    await finish_job(cluster, name, candidate=summary(0.55, 0.02), stable=summary(0.7, 0.01))
    await cluster.eventually(lambda: rollout(cluster, name).get("phase") == "RolledBack", timeout=10, what="RolledBack")
    status = rollout(cluster, name)
    assert "score 0.55 < minScore 0.6" in status["message"] and "regresses 0.15" in status["message"]
    assert status["lastAnalysis"]["score"] == 0.55 and status["lastAnalysis"]["scoreStdDev"] == 0.02
    await cluster.eventually(lambda: "--quantization=int4" in predictor(cluster, name)["model"]["args"],
                             what="stable spec restored")
    assert predictor(cluster, name)["canaryTrafficPercent"] == 0  # traffic never moved


async def test_a_failed_evaluation_job_is_a_failed_gate(cluster, operator, sample_dm) -> None:
    name = "r1-crash"
    await cluster.apply(rollout_dm(sample_dm, name, EVAL))
    await cluster.eventually(lambda: cluster.isvc(name), what="InferenceService")
    await started_rollout(cluster, name)
    await finish_job(cluster, name, candidate="distillery-eval: error: endpoint unreachable", stable=None, failed=True)
    await cluster.eventually(lambda: rollout(cluster, name).get("phase") == "RolledBack", timeout=10, what="RolledBack")
    assert "BackoffLimitExceeded" in rollout(cluster, name)["message"]
    assert "endpoint unreachable" in rollout(cluster, name)["message"]


async def test_passing_evaluation_then_steps(cluster, operator, sample_dm) -> None:
    name = "r1-smart"
    await cluster.apply(rollout_dm(sample_dm, name, EVAL))
    await cluster.eventually(lambda: cluster.isvc(name), what="InferenceService")
    await started_rollout(cluster, name)
    await finish_job(cluster, name, candidate=summary(0.72, 0.01), stable=summary(0.7, 0.01))
    # No SLOs: the steps advance on the interval.
    await cluster.eventually(lambda: rollout(cluster, name).get("phase") == "Promoted", timeout=10, what="Promoted")
    assert "canaryTrafficPercent" not in predictor(cluster, name)
    assert "--quantization=int8" in predictor(cluster, name)["model"]["args"]


async def test_restart_mid_rollout_resumes_without_a_double_step(cluster, operator, sample_dm, prometheus) -> None:
    name = "r1-restart"
    dm = rollout_dm(sample_dm, name, {**SLO, "interval": "2s"})
    await cluster.apply(dm)
    await cluster.eventually(lambda: cluster.isvc(name), what="InferenceService")
    await started_rollout(cluster, name)
    await cluster.eventually(lambda: rollout(cluster, name).get("step") == 2, timeout=10, what="step 2")
    # kopf posts Events from a queue of its own, after the status write: one still queued when the operator stops
    # is lost (best effort, as kopf's Events are), and the count below would miss it rather than see a double step.
    await cluster.eventually(lambda: [e for e in cluster.events(name) if e["reason"] == "RolloutStep"],
                             what="step 2's Event posted")
    before = rollout(cluster, name)
    await operator.restart()
    await asyncio.sleep(0.5)
    after = rollout(cluster, name)
    assert (after["step"], after["stepStartedAt"]) == (2, before["stepStartedAt"]), "no step taken on restart"
    await cluster.eventually(lambda: rollout(cluster, name).get("phase") == "Promoted", timeout=10, what="Promoted")
    steps = [e for e in cluster.events(name) if e["reason"] == "RolloutStep"]
    assert len(steps) == 1, [e["message"] for e in steps]
