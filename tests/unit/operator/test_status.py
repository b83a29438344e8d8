"""KServe InferenceService status -> DistilledModel status (status.py, pure)."""

from __future__ import annotations

from typing import Any

from distillery_operator.api import DistilledModelSpec, Problem
from distillery_operator.status import compute_status, gpu_summary, quantization_summary, status_changed

T0, T1 = "2026-01-01T00:00:00Z", "2026-01-01T00:05:00Z"
SPEC = DistilledModelSpec.model_validate(
    {"model": {"uri": "hf://deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"}, "hardwareProfile": "t4",
     "quantization": {"method": "int4", "groupSize": 128}}
)


def isvc(status: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": "r1"}, "spec": {}, "status": status or {}}


def ready_isvc(url: str = "http://r1.models.example.com") -> dict[str, Any]:
    return isvc({
        "url": url,
        "conditions": [{"type": "PredictorReady", "status": "True"}, {"type": "IngressReady", "status": "True"},
                       {"type": "Ready", "status": "True"}],
        "modelStatus": {"transitionStatus": "UpToDate", "states": {"activeModelState": "Loaded"},
                        "copies": {"totalCopies": 3, "failedCopies": 1}},
    })


def status_of(live: dict[str, Any] | None, previous: dict[str, Any] | None = None, now: str = T0,
              problems: list[Problem] | None = None) -> dict[str, Any]:
    return compute_status(name="r1", generation=4, spec=None if problems else SPEC, problems=problems or [],
                          isvc=live, previous=previous, now=now)


def cond(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == type_)


def test_no_inference_service_yet_is_pending() -> None:
    status = status_of(None)
    assert status["phase"] == "Pending"
    assert cond(status, "InferenceServiceReady")["status"] == "Unknown"
    assert cond(status, "Validated")["status"] == "True"
    assert status["observedGeneration"] == 4
    assert [c["type"] for c in status["conditions"]] == ["Validated", "InferenceServiceReady", "Ready"]


def test_existing_but_not_ready_is_deploying_with_kserve_reason() -> None:
    live = isvc({"conditions": [
        {"type": "PredictorReady", "status": "Unknown", "reason": "RevisionMissing", "message": "creating revision"},
        {"type": "Ready", "status": "False", "reason": "PredictorNotReady"},
    ]})
    status = status_of(live)
    assert status["phase"] == "Deploying"
    assert cond(status, "Ready")["status"] == "False"
    assert cond(status, "InferenceServiceReady")["reason"] == "PredictorNotReady"
    assert "PredictorReady" in status["message"]


def test_ready_mirrors_url_replicas_and_conditions() -> None:
    status = status_of(ready_isvc())
    assert status["phase"] == "Ready"
    assert status["url"] == "http://r1.models.example.com"
    assert status["replicas"] == 2  # total copies minus failed ones
    assert cond(status, "Ready")["status"] == "True"
    assert cond(status, "InferenceServiceReady")["status"] == "True"
    assert status["message"] is None
    assert (status["gpu"], status["quantization"]) == ("1x nvidia-tesla-t4", "int4-g128")


def test_failed_to_load_is_failed_with_kserve_reason_and_message() -> None:
    live = isvc({
        "conditions": [{"type": "Ready", "status": "False", "reason": "PredictorNotReady"}],
        "modelStatus": {
            "transitionStatus": "BlockedByFailedLoad",
            "states": {"activeModelState": "FailedToLoad", "targetModelState": "FailedToLoad"},
            "lastFailureInfo": {"reason": "ModelLoadFailed", "message": "CUDA out of memory", "exitCode": 137},
        },
    })
    status = status_of(live)
    assert status["phase"] == "Failed"
    assert cond(status, "Ready")["reason"] == "ModelLoadFailed"
    assert "CUDA out of memory" in cond(status, "Ready")["message"]
    assert "exit code 137" in status["message"]


def test_failed_state_without_failure_info_and_failing_conditions_are_failed() -> None:
    only_state = isvc({"modelStatus": {"states": {"activeModelState": "FailedToLoad"}}})
    assert status_of(only_state)["phase"] == "Failed"
    assert cond(status_of(only_state), "Ready")["reason"] == "FailedToLoad"
    crash = isvc({"conditions": [{"type": "PredictorReady", "status": "False", "reason": "ExitCode",
                                  "message": "container exited 1"}]})
    assert status_of(crash)["phase"] == "Failed"
    assert status_of(crash)["message"] == "container exited 1"


def test_new_revision_failing_while_old_one_serves_is_degraded() -> None:
    live = ready_isvc()
    live["status"]["modelStatus"]["lastFailureInfo"] = {"reason": "ModelLoadFailed", "message": "bad weights"}
    status = status_of(live)
    assert status["phase"] == "Degraded"
    assert cond(status, "Ready")["status"] == "False"
    assert status["url"] == "http://r1.models.example.com"


def test_lost_readiness_after_ready_is_degraded_not_deploying() -> None:
    previous = status_of(ready_isvc())
    unready = isvc({"conditions": [{"type": "Ready", "status": "False", "reason": "IngressNotReady"}]})
    assert status_of(unready, previous)["phase"] == "Degraded"
    assert status_of(unready)["phase"] == "Deploying"


def test_invalid_spec_keeps_serving_status_and_says_why() -> None:
    problems = [Problem("spec.autoscaling.minReplicas", "minReplicas 3 is greater than maxReplicas 1")]
    previous = status_of(ready_isvc())
    status = status_of(ready_isvc(), previous, problems=problems)
    assert status["phase"] == "Degraded"  # the previous spec still serves
    validated = cond(status, "Validated")
    assert validated["status"] == "False" and validated["reason"] == "InvalidSpec"
    assert "spec.autoscaling.minReplicas" in validated["message"]
    assert (status["gpu"], status["quantization"]) == (previous["gpu"], previous["quantization"])
    assert status_of(None, problems=problems)["phase"] == "Failed"


def test_transition_time_moves_only_when_a_condition_status_changes() -> None:
    first = status_of(isvc({"conditions": [{"type": "Ready", "status": "False"}]}), now=T0)
    again = status_of(isvc({"conditions": [{"type": "Ready", "status": "False"}]}), previous=first, now=T1)
    assert again == first
    assert not status_changed(first, again)
    ready = status_of(ready_isvc(), previous=first, now=T1)
    assert cond(ready, "Ready")["lastTransitionTime"] == T1
    assert cond(ready, "Validated")["lastTransitionTime"] == T0
    assert status_changed(first, ready)


def test_status_changed_ignores_kopf_bookkeeping_and_empty_values() -> None:
    new = status_of(None)
    assert not status_changed({**new, "kopf": {"progress": {}}, "url": None}, new)


def test_printer_column_summaries() -> None:
    cpu = DistilledModelSpec.model_validate({"model": {"uri": "hf://a/b"}, "hardwareProfile": "cpu"})
    assert gpu_summary(cpu) == "none" and quantization_summary(cpu) == "none"
    two = DistilledModelSpec.model_validate(
        {"model": {"uri": "hf://a/b"}, "resources": {"gpu": {"count": 2, "type": "nvidia-l4"}},
         "quantization": {"method": "int8", "prequantized": True}}
    )
    assert gpu_summary(two) == "2x nvidia-l4" and quantization_summary(two) == "int8-pre"
