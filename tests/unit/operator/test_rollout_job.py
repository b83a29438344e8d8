"""The rollout's evaluation Job (rendered from the spec) and its result (read from the Job and its pods), and
the InferenceService a stepped rollout renders: both checked against KServe v0.20's schema (PodSpec fields)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distillery_operator import constants
from distillery_operator.api import parse_distilled_model
from distillery_operator.evaluation.result import EvalResult
from distillery_operator.render import render_inference_service
from distillery_operator.rollout_job import job_name, read_evaluation, render_evaluation_job
from distillery_operator.settings import RenderSettings
from tests.kserve_schema import assert_valid, kserve_validator

REPO = Path(__file__).resolve().parents[3]
GATE = {"dataset": {"uri": "pvc://evals/math/gsm8k.jsonl"}, "scorer": "exact", "limit": 50, "repeats": 2,
        "minScore": 0.5, "maxRegression": 0.02}


def model(canary: int | None = None, gate: dict | None = None):
    spec = {"model": {"uri": "pvc://models/r1"}, "deploymentMode": "Knative",
            "rollout": {"steps": [10, 50], "analysis": {"interval": "60s", "evaluation": gate or GATE}}}
    dm = parse_distilled_model({"apiVersion": "distillery.dev/v1alpha1", "kind": "DistilledModel",
                                "metadata": {"name": "r1", "namespace": "ml"}, "spec": spec})
    if canary is not None:
        rollout = dm.spec.rollout.model_copy(update={"canary_traffic_percent": canary})
        dm = dm.model_copy(update={"spec": dm.spec.model_copy(update={"rollout": rollout})})
    return dm


@pytest.fixture(scope="module")
def validator():
    return kserve_validator(REPO / "third_party/reference/kserve-v0.20.0/serving.kserve.io_inferenceservices.yaml")


def test_a_stepped_rollout_renders_a_tag_routed_canary(validator):
    isvc = render_inference_service(model(canary=10), RenderSettings())
    assert isvc["metadata"]["annotations"][constants.ANN_TAG_ROUTING] == "true"
    assert isvc["spec"]["predictor"]["canaryTrafficPercent"] == 10
    assert_valid(validator, isvc)


T1 = "2026-01-01T00:00:00Z"


def test_a_new_rollout_of_the_same_candidate_runs_a_new_evaluation_job():
    first = job_name("r1", "0123456789abcdef", T1)
    assert first.startswith("r1-eval-0123") and len(first) == len("r1-eval-") + 8
    assert first == job_name("r1", "0123456789abcdef", T1)  # the same rollout finds its Job again
    assert first != job_name("r1", "0123456789abcdef", "2026-01-02T00:00:00Z")  # a later one never reads it


def test_the_evaluation_job(validator):
    job = render_evaluation_job(model(), "0123456789abcdef", T1, RenderSettings(evaluation_image="op:1"))
    assert job["metadata"]["name"] == job_name("r1", "0123456789abcdef", T1)
    pod = job["spec"]["template"]["spec"]
    assert job["spec"]["backoffLimit"] == 0 and pod["restartPolicy"] == "Never"
    candidate, stable = pod["containers"]
    assert candidate["image"] == "op:1" and candidate["command"][0] == "distillery-eval"
    argv = candidate["command"][1:]
    flags = dict(zip(argv[::2], argv[1::2], strict=True))
    assert flags == {"--endpoint": "http://latest-r1-predictor.ml.svc.cluster.local/openai/v1", "--model": "r1",
                     "--dataset": "/dataset/math/gsm8k.jsonl", "--scorer": "exact", "--limit": "50", "--repeats": "2",
                     "--output": "/dev/termination-log"}
    assert "http://prev-r1-predictor.ml.svc.cluster.local/openai/v1" in stable["command"]
    assert pod["volumes"] == [{"name": "dataset", "persistentVolumeClaim": {"claimName": "evals", "readOnly": True}}]
    # The pod spec is a valid Kubernetes PodSpec (KServe's predictor embeds PodSpec: validate it there).
    assert_valid(validator, {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
                             "metadata": {"name": "x"}, "spec": {"predictor": pod}})
    # The distillery-eval CLI accepts these arguments.
    from distillery_operator.evaluation.cli import build_parser
    args = build_parser().parse_args(argv)
    assert (args.limit, args.repeats, args.output) == (50, 2, "/dev/termination-log")


def test_no_stable_container_without_max_regression():
    job = render_evaluation_job(model(gate={**GATE, "maxRegression": None}), "abc", T1, RenderSettings())
    assert [c["name"] for c in job["spec"]["template"]["spec"]["containers"]] == ["candidate"]


def summary(score: float, std: float) -> str:
    """A compact result as distillery-eval writes it."""
    return EvalResult(model="r1", scorer="boxed", examples=10, repeats=2, score=score, score_std=std,
                      scores=[score, score], latency_s={"p50": 0.1, "p90": 0.2, "p99": 0.3}, requests=20, errors=0,
                      duration_s=3.0, min_score=None, passed=None).to_json()


def pod(**messages: str) -> dict:
    return {"status": {"containerStatuses": [{"name": role, "state": {"terminated": {"message": text}}}
                                             for role, text in messages.items()]}}


def job(condition: str | None, message: str = "") -> dict:
    conditions = [{"type": condition, "status": "True", "reason": condition, "message": message}] if condition else []
    return {"metadata": {"name": "r1-eval-x"}, "status": {"conditions": conditions}}


def test_reading_the_result():
    assert read_evaluation(job(None), []) is None  # still running
    done = read_evaluation(job("Complete"), [pod(candidate=summary(0.6, 0.05), stable=summary(0.62, 0.01))])
    assert (done.score, done.score_std_dev, done.stable_score, done.error) == (0.6, 0.05, 0.62, None)
    missing = read_evaluation(job("Complete"), [])
    assert missing.error and "without a readable result" in missing.error
    garbled = read_evaluation(job("Complete"), [pod(candidate=json.dumps({"score": 0.9}))])
    assert garbled.score is None and "latencySeconds" in garbled.error  # not a summary: no pass on it
    failed = read_evaluation(job("Failed", "Job has reached the specified backoff limit"),
                             [pod(candidate="distillery-eval: error: endpoint unreachable")])
    assert "Job has reached the specified backoff limit" in failed.error and "endpoint unreachable" in failed.error
