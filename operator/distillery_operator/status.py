"""Translate a KServe InferenceService's status into a DistilledModel's status (pure: dicts in, dict out).

KServe reports readiness in several places: the `Ready`/`PredictorReady`/`IngressReady` conditions, the
model's load state (`modelStatus.states`, `transitionStatus`) and the last failure (`lastFailureInfo`).
A model that failed to load keeps `Ready=False` with an unremarkable reason for a long time, which is
why the model status wins over the conditions here: a failed load is `Failed` with KServe's reason and
message, never "Deploying" forever.

Phases: Pending (no InferenceService yet), Deploying (exists, not ready, nothing failed), Ready,
Failed (nothing serves and something failed, or the spec was refused and nothing serves) and Degraded
(something serves, but not what the spec asks for: a rejected spec, a failed new revision, lost readiness).
`lastTransitionTime` only moves when a condition's status changes, so an unchanged world renders an
identical status and the reconciler can skip the write.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping, Sequence
from typing import Any

from distillery_contract.values import QuantMethod

from .api import DistilledModelSpec, Phase, Problem, resolve_resources
from .constants import ANN_LINEAGE

COND_VALIDATED = "Validated"
COND_ISVC_READY = "InferenceServiceReady"
COND_READY = "Ready"

# The keys of status that the operator owns (kopf keeps its own bookkeeping beside them).
OWNED_KEYS = (
    "phase",
    "conditions",
    "url",
    "inferenceService",
    "observedGeneration",
    "replicas",
    "message",
    "gpu",
    "quantization",
    "lineage",
    "rollout",
    "deployingSince",
)

STARTUP_TIMEOUT = "StartupTimeout"
FAILED_MODEL_STATES = frozenset({"FailedToLoad"})
FAILED_TRANSITIONS = frozenset({"BlockedByFailedLoad", "InvalidSpec"})
# Reasons on KServe/Knative conditions that mean "this will not become ready by waiting".
FAILURE_REASONS = frozenset(
    {
        "RevisionFailed",
        "RevisionMissing",
        "ContainerMissing",
        "ExitCode",
        "CrashLoopBackOff",
        "ImagePullBackOff",
        "ErrImagePull",
        "ProgressDeadlineExceeded",
        "InvalidSpec",
        "InvalidPredictorSpec",
        "NoSupportingRuntime",
        "RuntimeNotRecognized",
        "RuntimeDisabled",
        "ModelLoadFailed",
        "StartupProbeFailed",
    }
)


def gpu_summary(spec: DistilledModelSpec) -> str:
    """Printer-column text for the GPUs of a replica, e.g. `1x nvidia-tesla-t4`, or `none`."""
    res = resolve_resources(spec)
    if res.gpu_count < 1:
        return "none"
    return f"{res.gpu_count}x {res.gpu_type}" if res.gpu_type else f"{res.gpu_count}x {res.gpu_resource_name}"


def quantization_summary(spec: DistilledModelSpec) -> str:
    """Printer-column text for the quantization, e.g. `int4-g128`, `int8`, `none`."""
    quant = spec.quantization
    text = quant.method.value
    if quant.method == QuantMethod.INT4:
        text += f"-g{quant.group_size}"
    if quant.prequantized:
        text += "-pre"
    return text


def _conditions_by_type(obj: Mapping[str, Any] | None) -> dict[str, Mapping[str, Any]]:
    conditions = ((obj or {}).get("status") or {}).get("conditions") or []
    return {str(c.get("type")): c for c in conditions if isinstance(c, Mapping)}


def make_condition(
    type_: str,
    status: str,
    reason: str,
    message: str,
    generation: int | None,
    previous: Mapping[str, Mapping[str, Any]],
    now: str,
) -> dict[str, Any]:
    before = previous.get(type_)
    unchanged = before is not None and before.get("status") == status and before.get("lastTransitionTime")
    condition: dict[str, Any] = {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": before.get("lastTransitionTime") if unchanged and before else now,
    }
    if generation is not None:
        condition["observedGeneration"] = generation
    return condition


def _isvc_failure(isvc: Mapping[str, Any]) -> tuple[str, str] | None:
    """(reason, message) when KServe says the model failed, else None."""
    status = isvc.get("status") or {}
    model_status = status.get("modelStatus") or {}
    states = model_status.get("states") or {}
    failure = model_status.get("lastFailureInfo") or {}
    failed_state = states.get("activeModelState") in FAILED_MODEL_STATES or states.get(
        "targetModelState"
    ) in FAILED_MODEL_STATES
    failed_transition = model_status.get("transitionStatus") in FAILED_TRANSITIONS
    if failed_state or failed_transition or failure.get("reason"):
        reason = failure.get("reason") or (
            "FailedToLoad" if failed_state else str(model_status.get("transitionStatus"))
        )
        message = failure.get("message") or f"KServe reports the model as {states.get('activeModelState') or reason}"
        if failure.get("exitCode") is not None:
            message += f" (exit code {failure['exitCode']})"
        return str(reason), str(message)
    for ctype in ("Ready", "PredictorReady", "IngressReady"):
        cond = _conditions_by_type(isvc).get(ctype)
        if cond and cond.get("status") == "False" and cond.get("reason") in FAILURE_REASONS:
            return str(cond["reason"]), str(cond.get("message") or cond["reason"])
    return None


def _replicas(isvc: Mapping[str, Any], ready: bool) -> int | None:
    model_status = (isvc.get("status") or {}).get("modelStatus") or {}
    copies = model_status.get("copies") or {}
    if "totalCopies" in copies:
        return max(0, int(copies.get("totalCopies") or 0) - int(copies.get("failedCopies") or 0))
    return None if ready else 0


def compute_status(
    *,
    name: str,
    generation: int | None,
    spec: DistilledModelSpec | None,
    problems: Sequence[Problem] = (),
    isvc: Mapping[str, Any] | None,
    previous: Mapping[str, Any] | None,
    now: str,
    lineage: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The DistilledModel status (wire format, our keys only) for a spec and its live InferenceService.

    `spec` is None when the spec failed validation (`problems` says why); `previous` is the current
    status, whose conditions keep their lastTransitionTime when their status does not change; `lineage`
    is the model's distillery.dev/lineage annotation, parsed (a DistillationJob's deploy writes it).
    """
    previous = previous or {}
    prev_conditions = {str(c.get("type")): c for c in previous.get("conditions") or [] if isinstance(c, Mapping)}
    prev_phase = previous.get("phase")

    if problems:
        validated = make_condition(
            COND_VALIDATED, "False", "InvalidSpec", "; ".join(str(p) for p in problems), generation, prev_conditions, now
        )
    else:
        validated = make_condition(COND_VALIDATED, "True", "Valid", "spec is valid", generation, prev_conditions, now)

    url: str | None = None
    replicas: int | None = None
    if isvc is None:
        isvc_ready = make_condition(
            COND_ISVC_READY, "Unknown", "NotCreated", f"InferenceService {name} does not exist yet", generation,
            prev_conditions, now,
        )
        serving = False
        failure = None
    else:
        kserve_ready = _conditions_by_type(isvc).get("Ready") or {}
        serving = kserve_ready.get("status") == "True"
        failure = _isvc_failure(isvc)
        status = isvc.get("status") or {}
        url = status.get("url") or None
        replicas = _replicas(isvc, serving)
        reason = str(kserve_ready.get("reason") or ("Ready" if serving else "Deploying"))
        message = str(kserve_ready.get("message") or "")
        if not serving:
            unready = [
                f"{ctype}: {cond.get('reason') or cond.get('status')}"
                + (f" ({cond.get('message')})" if cond.get("message") else "")
                for ctype, cond in _conditions_by_type(isvc).items()
                if ctype != "Ready" and cond.get("status") != "True"
            ]
            message = message or "; ".join(unready) or "waiting for KServe to report readiness"
        isvc_ready = make_condition(
            COND_ISVC_READY, str(kserve_ready.get("status") or "Unknown"), reason, message, generation,
            prev_conditions, now,
        )

    # Phase, with the reason why it is not Ready.
    message_out: str | None
    if problems:
        detail = "; ".join(str(p) for p in problems)
        if serving:
            phase, reason, message_out = Phase.DEGRADED, "InvalidSpec", f"spec rejected, still serving the previous spec: {detail}"
        else:
            phase, reason, message_out = Phase.FAILED, "InvalidSpec", f"spec rejected: {detail}"
    elif isvc is None:
        phase, reason, message_out = Phase.PENDING, "NotCreated", f"InferenceService {name} does not exist yet"
    elif failure is not None:
        phase = Phase.DEGRADED if serving else Phase.FAILED
        reason, message_out = failure
    elif serving:
        phase, reason, message_out = Phase.READY, "Ready", None
    elif prev_phase in (Phase.READY.value, Phase.DEGRADED.value):
        phase, reason = Phase.DEGRADED, str(isvc_ready["reason"])
        message_out = f"lost readiness: {isvc_ready['message']}"
    else:
        phase, reason, message_out = Phase.DEPLOYING, str(isvc_ready["reason"]), str(isvc_ready["message"])
    # A predictor that never gets ready (a download that hangs, pods that never schedule) is Failed once
    # startupTimeoutSeconds have passed since this generation started deploying, not Deploying forever.
    same_generation = previous.get("observedGeneration") == generation
    deploying_since: str | None = None
    if phase == Phase.DEPLOYING:
        prev_ready = prev_conditions.get(COND_READY) or {}
        timed_out = prev_phase == Phase.FAILED.value and prev_ready.get("reason") == STARTUP_TIMEOUT
        deploying_since = str(previous.get("deployingSince") or now) if same_generation else now
        expired = _elapsed(deploying_since, now) > spec.startup_timeout_seconds if spec is not None else False
        if (timed_out and same_generation) or expired:
            phase, reason = Phase.FAILED, STARTUP_TIMEOUT
            limit = f" ({spec.startup_timeout_seconds}s)" if spec is not None else ""
            message_out = f"the predictor was not ready within startupTimeoutSeconds{limit}: {isvc_ready['message']}"
            deploying_since = None

    ready = make_condition(
        COND_READY,
        "True" if phase == Phase.READY else "False",
        reason,
        message_out or "the model serves requests",
        generation,
        prev_conditions,
        now,
    )
    result: dict[str, Any] = {
        "phase": phase.value,
        "conditions": [validated, isvc_ready, ready],
        "url": url,
        "inferenceService": name if isvc is not None else None,
        "observedGeneration": generation,
        "replicas": replicas,
        "message": message_out,
        "gpu": gpu_summary(spec) if spec is not None else previous.get("gpu"),
        "quantization": quantization_summary(spec) if spec is not None else previous.get("quantization"),
        "lineage": dict(lineage) if lineage else None,
        "rollout": previous.get("rollout"),  # the rollout controller's (reconcile.py), carried unchanged here
        "deployingSince": deploying_since,
    }
    return result


def _elapsed(since: str, now: str) -> float:
    """Seconds from one RFC 3339 time to another (0 when either is unreadable)."""
    try:
        start = datetime.datetime.fromisoformat(since.replace("Z", "+00:00"))
        end = datetime.datetime.fromisoformat(now.replace("Z", "+00:00"))
    except ValueError:
        return 0.0
    return (end - start).total_seconds()


def lineage_of(body: Mapping[str, Any]) -> dict[str, Any] | None:
    """The distillery.dev/lineage annotation of an object, parsed (None when absent or not a JSON object)."""
    text = (((body.get("metadata") or {}).get("annotations")) or {}).get(ANN_LINEAGE)
    try:
        value = json.loads(text) if text else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def owned_subset(status: Mapping[str, Any] | None, keys: Sequence[str] = OWNED_KEYS) -> dict[str, Any]:
    """Our keys of a status, without empty values: what two statuses are compared on."""
    status = status or {}
    return {key: status[key] for key in keys if status.get(key) is not None}


def status_changed(previous: Mapping[str, Any] | None, new: Mapping[str, Any], keys: Sequence[str] = OWNED_KEYS) -> bool:
    return owned_subset(previous, keys) != owned_subset(new, keys)


def condition(status: Mapping[str, Any] | None, type_: str) -> Mapping[str, Any] | None:
    """A condition of a DistilledModel status by type."""
    for cond in (status or {}).get("conditions") or []:
        if isinstance(cond, Mapping) and cond.get("type") == type_:
            return cond
    return None
