"""Translate a TrainJob (and the trainer's result) into a DistillationJob's status (pure: dicts in, dict out).

Kubeflow Trainer reports a TrainJob's end in its conditions: `Complete` (True: Succeeded) or `Failed`
(True: Failed, with the JobSet's reason and message); `Suspended` keeps it Pending; it is Running once a
child Job has all its pods ready (status.jobsStatus) or the trainer reports progress, Pending before.
Progress while running comes from status.trainerStatus (Trainer's TrainJobStatus feature: a percentage
and metrics, of which we read `step`, `totalSteps` and `loss`); at the end, from the trainer's result
(distillery_contract.distillation.TrainResult, rank 0's termination message), which also carries the
artifact's sha256 and the lineage summary. Conditions keep their lastTransitionTime while their status
holds, so an unchanged world renders an identical status and the reconciler skips the write.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from distillery_contract.distillation import (
    PROGRESS_METRICS,
    QUANTIZED_SUBDIR,
    DistillationJobSpec,
    TrainResult,
)

from . import constants
from .api import Problem
from .distillation_api import JobPhase
from .status import COND_VALIDATED, make_condition

COND_TRAINER = "TrainerInstalled"
COND_SUCCEEDED = "Succeeded"
COND_SPEC_APPLIED = "SpecApplied"
COND_DEPLOYED = "Deployed"

OWNED_KEYS = ("phase", "conditions", "trainJob", "progress", "artifact", "lineage", "deployedModel",
              "deployedArtifact", "observedGeneration", "message")
FINISHED = frozenset({JobPhase.SUCCEEDED.value, JobPhase.FAILED.value})


@dataclass(frozen=True)
class Observed:
    """What the reconciler saw and did, besides the spec."""

    train_job: Mapping[str, Any] | None = None
    trainer_missing: bool = False  # the API has no TrainJob resource: Kubeflow Trainer is not installed
    spec_applied: bool = True  # the TrainJob runs the current spec (its trainer is immutable once created)
    result: TrainResult | None = None
    result_problem: str | None = None  # why there is no result for a succeeded TrainJob
    ran: DistillationJobSpec | None = None  # the spec the TrainJob runs (its job manifest), when readable
    deployed: tuple[bool, str, str] | None = None  # spec.deploy acted upon: (done, reason, message)


def ran_spec(train_job: Mapping[str, Any] | None) -> DistillationJobSpec | None:
    """The spec a TrainJob runs: the job manifest its runtime patch hands the trainer (None if unreadable)."""
    for patch in ((train_job or {}).get("spec") or {}).get("runtimePatches") or []:
        jobs = ((((patch or {}).get("trainingRuntimeSpec") or {}).get("template") or {}).get("spec") or {}).get(
            "replicatedJobs") or []
        for replicated in jobs:
            pod = ((((replicated or {}).get("template") or {}).get("spec") or {}).get("template") or {})
            text = ((pod.get("metadata") or {}).get("annotations") or {}).get(constants.ANN_JOB_MANIFEST)
            if not text:
                continue
            try:
                return DistillationJobSpec.model_validate(json.loads(text)["spec"])
            except (ValueError, KeyError, TypeError, ValidationError):
                return None
    return None


def trainjob_conditions(train_job: Mapping[str, Any] | None) -> dict[str, Mapping[str, Any]]:
    conditions = ((train_job or {}).get("status") or {}).get("conditions") or []
    return {str(c.get("type")): c for c in conditions if isinstance(c, Mapping)}


def trainjob_outcome(train_job: Mapping[str, Any]) -> tuple[JobPhase, str, str | None]:
    """(phase, reason, message) of a TrainJob from its conditions."""
    conditions = trainjob_conditions(train_job)
    failed, complete, suspended = (conditions.get(t) or {} for t in ("Failed", "Complete", "Suspended"))
    if failed.get("status") == "True":
        return JobPhase.FAILED, str(failed.get("reason") or "Failed"), str(failed.get("message") or "the TrainJob failed")
    if complete.get("status") == "True":
        return JobPhase.SUCCEEDED, "Complete", None
    if suspended.get("status") == "True":
        return JobPhase.PENDING, "Suspended", str(suspended.get("message") or "the TrainJob is suspended")
    status = train_job.get("status") or {}
    jobs = [j for j in status.get("jobsStatus") or [] if isinstance(j, Mapping)]
    if status.get("trainerStatus") or any((j.get("ready") or 0) > 0 or (j.get("succeeded") or 0) > 0 for j in jobs):
        return JobPhase.RUNNING, "Running", None
    return JobPhase.PENDING, "Starting", "the TrainJob is created; waiting for its pods to be scheduled and ready"


def _number(text: Any) -> float | None:
    """A finite number or None: NaN/Inf (a diverged loss) has no JSON form, and a status holding one is refused."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _progress(
    spec: DistillationJobSpec | None, train_job: Mapping[str, Any] | None, result: TrainResult | None,
    phase: JobPhase, previous: Mapping[str, Any] | None,
) -> dict[str, Any] | None:
    progress: dict[str, Any] = dict(previous or {})
    trainer_status = ((train_job or {}).get("status") or {}).get("trainerStatus") or {}
    metrics = {str(m.get("name")): m.get("value") for m in trainer_status.get("metrics") or [] if isinstance(m, Mapping)}
    step, total, loss = (_number(metrics.get(key)) for key in PROGRESS_METRICS)
    if step is not None:
        progress["step"] = int(step)
    if total is not None:
        progress["totalSteps"] = int(total)
    if loss is not None:
        progress["loss"] = loss
    if (percent := _number(trainer_status.get("progressPercentage"))) is not None:
        progress["percent"] = int(percent)
    if result is not None and result.progress is not None:
        final = result.progress
        progress.update({k: v for k, v in (("step", final.step), ("totalSteps", final.total_steps),
                                           ("loss", final.loss), ("validationLoss", final.validation_loss))
                         if v is not None})
    if phase == JobPhase.SUCCEEDED:
        progress["percent"] = 100
    elif progress.get("percent") is None and progress.get("totalSteps") and progress.get("step") is not None:
        progress["percent"] = min(100, int(100 * progress["step"] / progress["totalSteps"]))
    if progress.get("step") is not None and progress.get("totalSteps"):
        progress["summary"] = f"{progress['step']}/{progress['totalSteps']}"
    elif progress.get("percent") is not None:
        progress["summary"] = f"{progress['percent']}%"
    return progress or None


def artifact_uris(uri: str, ran: DistillationJobSpec | None) -> dict[str, str]:
    """status.artifact's URIs: where the student was written, and its pre-quantized copy when the spec the
    TrainJob ran asked for one (never the current spec: it may have changed since)."""
    quantized = ran is not None and ran.quantization is not None
    return {"uri": uri, **({"quantizedUri": f"{uri.rstrip('/')}/{QUANTIZED_SUBDIR}"} if quantized else {})}


def compute_job_status(
    *,
    name: str,
    generation: int | None,
    spec: DistillationJobSpec | None,
    problems: Sequence[Problem] = (),
    observed: Observed,
    previous: Mapping[str, Any] | None,
    now: str,
) -> dict[str, Any]:
    """The DistillationJob status (wire format, our keys only). `spec` is None when it failed validation."""
    previous = previous or {}
    before = {str(c.get("type")): c for c in previous.get("conditions") or [] if isinstance(c, Mapping)}
    prev_phase = previous.get("phase")
    train_job = observed.train_job

    def cond(type_: str, status: str, reason: str, message: str) -> dict[str, Any]:
        return make_condition(type_, status, reason, message, generation, before, now)

    detail = "; ".join(str(p) for p in problems)
    conditions = [cond(COND_VALIDATED, "False", "InvalidSpec", detail) if problems
                  else cond(COND_VALIDATED, "True", "Valid", "spec is valid")]
    if observed.trainer_missing:
        conditions.append(cond(COND_TRAINER, "False", "TrainerNotInstalled",
                               "the API server has no TrainJob resource (trainer.kubeflow.org/v1alpha1): install "
                               "Kubeflow Trainer v2; the job starts once it is there"))
    elif train_job is not None or (before.get(COND_TRAINER) or {}).get("status") == "True":
        conditions.append(cond(COND_TRAINER, "True", "Installed", "Kubeflow Trainer serves TrainJobs"))

    message: str | None
    if train_job is not None:
        phase, reason, message = trainjob_outcome(train_job)
    elif prev_phase in FINISHED:  # finished, and the TrainJob since removed: nothing runs again
        phase, reason, message = JobPhase(prev_phase), "Finished", previous.get("message")
    elif problems:
        phase, reason, message = JobPhase.FAILED, "InvalidSpec", f"spec rejected: {detail}"
    elif observed.trainer_missing:
        phase, reason, message = JobPhase.PENDING, "TrainerNotInstalled", conditions[-1]["message"]
    else:
        phase, reason, message = JobPhase.PENDING, "NotCreated", f"TrainJob {name} does not exist yet"
    if problems and train_job is not None and phase not in (JobPhase.SUCCEEDED, JobPhase.FAILED):
        message = f"spec rejected, the TrainJob runs the previous spec: {detail}"

    result = observed.result
    artifact = dict(previous.get("artifact") or {}) or None
    lineage = previous.get("lineage")
    # The artifact is recorded once, from what ran: the trainer's result, else the TrainJob's job manifest.
    if phase == JobPhase.SUCCEEDED and spec is not None and train_job is not None \
            and not (artifact or {}).get("sha256"):
        uri = result.artifact.uri if result is not None else (observed.ran.output.uri if observed.ran else None)
        if uri:
            artifact = artifact_uris(uri, observed.ran)
        if result is not None:
            artifact = {**(artifact or {}), "sha256": result.artifact.sha256}
            lineage = dict(result.lineage) or lineage
        elif observed.result_problem:
            message = f"succeeded, but {observed.result_problem}"

    succeeded_message = {
        JobPhase.SUCCEEDED: f"the student is at {(artifact or {}).get('uri')}",
        JobPhase.FAILED: message or "the job failed",
        JobPhase.RUNNING: "training",
        JobPhase.PENDING: message or "waiting to start",
    }[phase]
    conditions.append(cond(COND_SUCCEEDED, "True" if phase == JobPhase.SUCCEEDED else "False", reason,
                           str(succeeded_message)))
    if train_job is not None and spec is not None:
        conditions.append(
            cond(COND_SPEC_APPLIED, "True", "Applied", "the TrainJob runs this spec") if observed.spec_applied else
            cond(COND_SPEC_APPLIED, "False", "TrainJobImmutable",
                 "the spec changed after the TrainJob was created, and a TrainJob's trainer cannot change: the "
                 "TrainJob runs the spec it started with (delete and re-create the DistillationJob to run the new one)"))
    deployed_model, deployed_artifact = previous.get("deployedModel"), previous.get("deployedArtifact")
    if spec is not None and spec.deploy is not None:
        if observed.deployed is not None:
            ok, reason, text = observed.deployed
            conditions.append(cond(COND_DEPLOYED, "True" if ok else "False", reason, text))
            if ok:
                deployed_model, deployed_artifact = spec.deploy.distilled_model, (artifact or {}).get("sha256")
        elif (before.get(COND_DEPLOYED) or {}).get("status") == "True":
            conditions.append(dict(before[COND_DEPLOYED]))
        else:
            conditions.append(cond(COND_DEPLOYED, "False", "WaitingForArtifact",
                                   f"DistilledModel {spec.deploy.distilled_model} is pointed at the artifact once the "
                                   "job succeeds"))

    return {
        "phase": phase.value,
        "conditions": conditions,
        "trainJob": name if train_job is not None else previous.get("trainJob"),
        "progress": _progress(spec, train_job, result, phase, previous.get("progress")),
        "artifact": artifact,
        "lineage": lineage,
        "deployedModel": deployed_model,
        "deployedArtifact": deployed_artifact,
        "observedGeneration": generation,
        "message": message if phase != JobPhase.SUCCEEDED or (message or "").startswith("succeeded,") else None,
    }
