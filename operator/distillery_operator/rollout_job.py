"""The rollout's evaluation gate as a Kubernetes Job: render it (pure) and read its result back.

One Job per candidate, run from the operator's image (`distillery-eval`, no torch): a `candidate` container
scores the candidate revision through its tag-routed URL and, when the gate has maxRegression, a `stable`
container scores the stable revision in the same run. Each writes its compact JSON result (score,
scoreStdDev, ...) to /dev/termination-log, which Kubernetes keeps in the pod's status, as the trainer's
result is read for a DistillationJob. A failed Job is a failed gate with its reason, never a wait.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from . import constants
from .api import DistilledModel
from .evaluation import cli as eval_cli
from .evaluation.result import parse_summary
from .rollout import EvaluationOutcome
from .settings import RenderSettings

DATASET_MOUNT = "/dataset"
EVAL_DEADLINE_S = 3600
CONTAINERS = ("candidate", "stable")


def job_name(model: str, candidate: str, started_at: str) -> str:
    """The candidate's first hex digits, then a hash of when this rollout started: a Job lives on for a day
    (ttlSecondsAfterFinished), and rolling the same candidate out again must run a new one, not read that."""
    run = hashlib.sha256(f"{candidate}@{started_at}".encode()).hexdigest()
    return f"{model}-eval-{candidate[:4]}{run[:4]}"


def revision_url(tag: str, model: str, namespace: str) -> str:
    """In-cluster URL of a tag-routed Knative revision (KServe tags the canary `latest`, the stable `prev`)."""
    return f"http://{tag}-{model}-predictor.{namespace}.svc.cluster.local/openai/v1"


def render_evaluation_job(
    dm: DistilledModel, candidate: str, started_at: str, settings: RenderSettings
) -> dict[str, Any]:
    spec = dm.spec
    assert spec.rollout.analysis is not None and spec.rollout.analysis.evaluation is not None
    gate = spec.rollout.analysis.evaluation
    name, namespace = dm.metadata.name, dm.metadata.namespace or "default"
    claim, _, path = gate.dataset.uri.removeprefix("pvc://").partition("/")

    def container(role: str, tag: str) -> dict[str, Any]:
        return {
            "name": role,
            "image": settings.evaluation_image,
            # The CLI renders its own command line, so this Job and distillery-eval's flags cannot drift.
            "command": eval_cli.command(
                revision_url(tag, name, namespace), name, f"{DATASET_MOUNT}/{path}", scorer=gate.scorer.value,
                limit=gate.limit, repeats=gate.repeats, output=eval_cli.TERMINATION_LOG,
            ),
            "terminationMessagePath": eval_cli.TERMINATION_LOG,
            "terminationMessagePolicy": "FallbackToLogsOnError",  # an error exit leaves its message
            "volumeMounts": [{"name": "dataset", "mountPath": DATASET_MOUNT, "readOnly": True}],
            "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
            "securityContext": {"allowPrivilegeEscalation": False, "runAsNonRoot": True,
                                "capabilities": {"drop": ["ALL"]}},
        }

    containers = [container("candidate", "latest")]
    if gate.max_regression is not None:
        containers.append(container("stable", "prev"))
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(name, candidate, started_at),
            "namespace": namespace,
            "labels": {constants.LABEL_ROLLOUT_EVAL: name, constants.LABEL_PART_OF: constants.PART_OF,
                       constants.LABEL_MANAGED_BY: constants.MANAGED_BY},
        },
        "spec": {
            "backoffLimit": 0,  # a sampled score is not retried into a pass
            "activeDeadlineSeconds": EVAL_DEADLINE_S,
            "ttlSecondsAfterFinished": 86400,
            "template": {
                "metadata": {"labels": {constants.LABEL_ROLLOUT_EVAL: name}},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": containers,
                    "volumes": [{"name": "dataset",
                                 "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}],
                },
            },
        },
    }


def _condition(job: Mapping[str, Any], type_: str) -> Mapping[str, Any] | None:
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_ and cond.get("status") == "True":
            return dict(cond)
    return None


def _messages(pods: list[dict[str, Any]]) -> dict[str, str]:
    found: dict[str, str] = {}
    for pod in pods:
        for status in (pod.get("status") or {}).get("containerStatuses") or []:
            terminated = (status.get("state") or {}).get("terminated") or {}
            if status.get("name") in CONTAINERS and terminated.get("message"):
                found[str(status["name"])] = str(terminated["message"])
    return found


def _score(text: str) -> tuple[float | None, float | None, str | None]:
    """(score, its standard deviation, None) from distillery-eval's summary, or (None, None, why not)."""
    try:
        summary = parse_summary(text)
    except ValueError as exc:
        return None, None, str(exc)
    return summary.score, summary.score_std, None


def read_evaluation(job: Mapping[str, Any], pods: list[dict[str, Any]]) -> EvaluationOutcome | None:
    """The gate's input from a Job and its pods: None while it runs, an error when it failed."""
    messages = _messages(pods)
    failed = _condition(job, "Failed")
    if failed is not None:
        detail = "; ".join(f"{role}: {text.strip()[-300:]}" for role, text in sorted(messages.items()))
        reason = f"Job {(job.get('metadata') or {}).get('name')} failed ({failed.get('reason') or 'Failed'}"
        reason += f": {failed['message']})" if failed.get("message") else ")"
        return EvaluationOutcome(error=reason + (f" {detail}" if detail else ""))
    if _condition(job, "Complete") is None:
        return None
    if "candidate" not in messages:
        return EvaluationOutcome(error="the evaluation Job completed without a readable result "
                                       "(the candidate container's termination message)")
    score, std, problem = _score(messages["candidate"])
    if problem:
        return EvaluationOutcome(error=f"the candidate's {problem}")
    stable, _, _ = _score(messages["stable"]) if "stable" in messages else (None, None, None)
    return EvaluationOutcome(score=score, score_std_dev=std, stable_score=stable)
