"""The DistillationJob's I/O: run each job as a Kubeflow Trainer TrainJob, mirror its state, hand the result on.

One reconcile = read the TrainJob, create it when absent (never again once the job finished), restore its
labels and ownerReference when edited, mirror its conditions into our phase, read the trainer's result
when it completed, point spec.deploy's DistilledModel at the artifact, write the status when it changed,
post Events on transitions.

The deploy: only a verified artifact (the trainer's result carries its sha256) that the current spec
describes (SpecApplied: the TrainJob ran this spec), at the URIs the trainer reported (never recomputed
from a spec edited since); once per (generation, artifact), recorded as status.deployedArtifact and the
Deployed condition's observedGeneration, so a user's later edit of the DistilledModel stays. Skipped:
Deployed=False with the reason, one Warning Event. The same KubeClient, API error policy, Event and status-write helpers as the
DistilledModel's reconciler (reconcile.py), and the same condition helper (status.py).

Where the trainer's results come from: rank 0 writes a `TrainResult` (artifact sha256, final progress,
lineage summary) as its container's termination message; Kubernetes keeps it in the pod's status, and
the operator lists the TrainJob's pods (label jobset.sigs.k8s.io/jobset-name) once, when the TrainJob is
Complete. Progress while running is Kubeflow Trainer's own status.trainerStatus, mirrored.

Failure policy, besides reconcile.py's: no TrainJob API (404 on creating one: Kubeflow Trainer is not
installed) -> TrainerInstalled=False, phase Pending, one Warning Event, retried by the periodic resync
(no crash loop, no error storm). A spec changed after its TrainJob was created -> SpecApplied=False (a
TrainJob's trainer is immutable; the running training is never restarted behind the user's back).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any, NoReturn

import kopf
from pydantic import ValidationError

from distillery_contract.distillation import DistillationJobSpec, TrainResult

from . import constants, metrics
from .api import InvalidSpec, ModelSource, Problem
from .distillation_api import DistillationJob, JobPhase, parse_distillation_job
from .distillation_render import render_train_job
from .distillation_status import (
    FINISHED,
    OWNED_KEYS,
    Observed,
    compute_job_status,
    ran_spec,
    trainjob_outcome,
)
from .reconcile import (
    DJ,
    DM,
    PODS,
    REFUSED,
    TRAINJOB,
    ApiError,
    KubeClient,
    Outcome,
    backoff,
    call_api,
    contains,
    owned_meta_patch,
    owner_reference,
    patch_status,
    post_event,
    utcnow,
    wait_for_foreign_controller,
)
from .settings import RenderSettings
from .status import COND_VALIDATED, condition, status_changed

log = logging.getLogger(__name__)


class _TrainerMissing(Exception):
    """The API server has no TrainJob resource."""


class _Refused(Exception):
    def __init__(self, error: ApiError) -> None:
        super().__init__(str(error))
        self.error = error


def read_result(pods: list[dict[str, Any]]) -> tuple[TrainResult | None, str | None]:
    """The trainer's result from the TrainJob's pods (rank 0 first), or why there is none."""
    def rank(pod: Mapping[str, Any]) -> tuple[bool, bool]:
        labels = (pod.get("metadata") or {}).get("labels") or {}
        return labels.get(constants.LABEL_JOB_INDEX) != "0", labels.get(constants.LABEL_COMPLETION_INDEX) != "0"

    for pod in sorted(pods, key=rank):
        for status in (pod.get("status") or {}).get("containerStatuses") or []:
            if status.get("name") != constants.TRAINER_NODE_JOB:
                continue
            terminated = (status.get("state") or {}).get("terminated") or (status.get("lastState") or {}).get(
                "terminated") or {}
            text = terminated.get("message")
            if not text:
                continue
            try:
                return TrainResult.model_validate(json.loads(text)), None
            except (ValueError, ValidationError) as exc:
                return None, f"the trainer's result in pod {(pod.get('metadata') or {}).get('name')} is unreadable: {exc}"
    return None, "no trainer pod left a result (rank 0's termination message)"


# spec.model fields the deploy does not set: null in its merge patch, so none stays from the previous model.
_MODEL_FIELDS = tuple(field.alias or name for name, field in ModelSource.model_fields.items())


def deployed_model(
    job: DistillationJob, ran: DistillationJobSpec, artifact: Mapping[str, Any], lineage: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """What spec.deploy's DistilledModel must hold to serve the artifact (a merge patch; the create body
    without its nulls). `ran` is the spec the TrainJob ran; `artifact` the status' record of what it wrote."""
    quantized = ran.quantization is not None and artifact.get("quantizedUri")
    model: dict[str, Any] = {**dict.fromkeys(_MODEL_FIELDS), "uri": artifact["quantizedUri"] if quantized
                             else artifact["uri"], "teacher": ran.teacher.uri}
    quantization: dict[str, Any] = {"prequantized": bool(quantized)}
    if quantized and ran.quantization is not None:
        quantization.update(method=ran.quantization.method, groupSize=ran.quantization.group_size)
    record = {"job": job.metadata.name, "sha256": artifact.get("sha256"), **(lineage or {})}
    return {
        "metadata": {"annotations": {
            constants.ANN_SOURCE_JOB: job.metadata.name,
            constants.ANN_LINEAGE: json.dumps(record, sort_keys=True, separators=(",", ":")),
        }},
        "spec": {"model": model, "quantization": quantization},
    }


class DistillationReconciler:
    """Reconciles DistillationJobs through a KubeClient; one per operator process."""

    def __init__(self, client: KubeClient, settings: RenderSettings, *, clock: Callable[[], str] = utcnow) -> None:
        self.client = client
        self.settings = settings
        self.clock = clock
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    def forget(self, namespace: str, name: str) -> None:
        self._locks.pop((namespace, name), None)

    async def reconcile(
        self, body: Mapping[str, Any], *, trigger: str, retry: int = 0,
        status_sink: MutableMapping[str, Any] | None = None,
    ) -> Outcome:
        """Bring one DistillationJob's TrainJob, DistilledModel and status in line; raise kopf errors on failure."""
        meta = body.get("metadata") or {}
        namespace, name = str(meta.get("namespace") or "default"), str(meta.get("name"))
        started = time.perf_counter()
        result = "error"
        try:
            async with self._locks.setdefault((namespace, name), asyncio.Lock()):
                outcome = await self._reconcile(body, namespace, name, retry, status_sink)
            result = outcome.action
            return outcome
        except kopf.PermanentError:
            result = "invalid"
            raise
        except kopf.TemporaryError:
            result = "retry"
            raise
        finally:
            metrics.observe_reconcile(f"job-{trigger}", result, time.perf_counter() - started)

    async def reconcile_child(self, train_job: Mapping[str, Any]) -> Outcome | None:
        """A change of a TrainJob we own: reconcile its DistillationJob."""
        meta = train_job.get("metadata") or {}
        namespace = str(meta.get("namespace") or "default")
        owner = (meta.get("labels") or {}).get(constants.LABEL_JOB)
        if not owner:
            return None
        body = await call_api(self.client.get(DJ, namespace, owner), 0)
        if body is None or (body.get("metadata") or {}).get("deletionTimestamp"):
            return None
        try:
            return await self.reconcile(body, trigger="child")
        except kopf.PermanentError:
            return Outcome("invalid")

    # ------------------------------------------------------------------------------------- internals
    async def _reconcile(
        self, body: Mapping[str, Any], namespace: str, name: str, retry: int,
        sink: MutableMapping[str, Any] | None,
    ) -> Outcome:
        meta = body.get("metadata") or {}
        if meta.get("deletionTimestamp"):
            return Outcome("deleting")
        generation = meta.get("generation")
        previous = body.get("status") or {}
        live: dict[str, Any] | None = await call_api(self.client.get(TRAINJOB, namespace, name), retry)
        try:
            job = parse_distillation_job(dict(body))
        except InvalidSpec as invalid:
            await self._record_invalid(body, namespace, name, invalid, live, previous, retry)

        outcome = Outcome("unchanged")
        desired = render_train_job(job, self.settings)
        desired["metadata"]["ownerReferences"] = [owner_reference(body, constants.DJ_KIND)]
        trainer_missing = False
        if live is None and previous.get("phase") not in FINISHED:
            try:
                live = await self._create(desired, namespace, name, retry, outcome)
            except _TrainerMissing:
                trainer_missing = True
            except _Refused as refused:
                problem = Problem("spec", f"the API server refused the TrainJob rendered from it ({refused.error})")
                await self._record_invalid(body, namespace, name, InvalidSpec([problem]), None, previous, retry)
        elif live is not None:
            live = await self._restore_metadata(desired, live, namespace, name, retry, outcome)
        spec_applied = live is None or (
            ((live.get("metadata") or {}).get("annotations") or {}).get(constants.ANN_SPEC_HASH)
            == desired["metadata"]["annotations"][constants.ANN_SPEC_HASH])

        ran = ran_spec(live) or (job.spec if live is not None and spec_applied else None)
        observed = Observed(train_job=live, trainer_missing=trainer_missing, spec_applied=spec_applied, ran=ran)
        if live is not None and trainjob_outcome(live)[0] == JobPhase.SUCCEEDED \
                and not (previous.get("artifact") or {}).get("sha256"):
            result, problem_text = await self._read_result(namespace, name, retry)
            observed = dataclasses.replace(observed, result=result, result_problem=problem_text)

        def status(obs: Observed) -> dict[str, Any]:
            return compute_job_status(name=name, generation=generation, spec=job.spec, observed=obs,
                                      previous=previous, now=self.clock())

        new = status(observed)
        if new["phase"] == JobPhase.SUCCEEDED.value and job.spec.deploy is not None:
            deployed = await self._deploy_once(job, observed, previous, new, generation, namespace, retry, outcome)
            if deployed is not None:
                new = status(dataclasses.replace(observed, deployed=deployed))
        await self._write_status(body, namespace, name, previous, new, retry, outcome, None if trainer_missing else sink)
        outcome.phase = new["phase"]
        return outcome

    async def _create(
        self, desired: dict[str, Any], namespace: str, name: str, retry: int, outcome: Outcome
    ) -> dict[str, Any] | None:
        try:
            created: dict[str, Any] = await call_api(self.client.create(TRAINJOB, namespace, desired), retry)
        except ApiError as exc:
            if exc.status == 404:
                raise _TrainerMissing() from exc
            if exc.status in REFUSED:
                raise _Refused(exc) from exc
            if exc.status != 409:
                raise kopf.TemporaryError(f"creating TrainJob {name}: {exc}", delay=backoff(retry)) from exc
            found: dict[str, Any] | None = await call_api(self.client.get(TRAINJOB, namespace, name), retry)
            return found
        outcome.action = "created"
        outcome.writes += 1
        outcome.events.append("Created")
        return created

    async def _restore_metadata(
        self, desired: dict[str, Any], live: dict[str, Any], namespace: str, name: str, retry: int, outcome: Outcome
    ) -> dict[str, Any]:
        """Our labels and ownerReference back on an edited TrainJob (its spec is immutable: never patched)."""
        lmeta = live.get("metadata") or {}
        ours = desired["metadata"]["ownerReferences"][0]
        refs = lmeta.get("ownerReferences") or []
        wait_for_foreign_controller(live, ours["uid"], f"TrainJob {name}", retry)
        owned = any(r.get("uid") == ours["uid"] for r in refs)
        if owned and contains(desired["metadata"]["labels"], lmeta.get("labels") or {}):
            return live
        patch = {"metadata": {
            "labels": owned_meta_patch(lmeta.get("labels"), desired["metadata"]["labels"]),
            "ownerReferences": [*(r for r in refs if r.get("uid") != ours["uid"]), ours],
        }}
        try:
            patched: dict[str, Any] = await call_api(self.client.patch(TRAINJOB, namespace, name, patch), retry)
        except ApiError as exc:
            raise kopf.TemporaryError(f"patching TrainJob {name}: {exc}", delay=backoff(retry)) from exc
        outcome.action = "patched"
        outcome.writes += 1
        outcome.events.append("DriftRepaired")
        return patched

    async def _read_result(self, namespace: str, name: str, retry: int) -> tuple[TrainResult | None, str | None]:
        try:
            pods = await call_api(self.client.list(PODS, namespace, {constants.LABEL_JOBSET_NAME: name}), retry)
        except ApiError as exc:  # e.g. 403: say so on the job rather than retrying forever
            return None, f"the trainer pods could not be listed ({exc})"
        return read_result(pods)

    async def _deploy_once(
        self, job: DistillationJob, observed: Observed, previous: Mapping[str, Any], new: Mapping[str, Any],
        generation: int | None, namespace: str, retry: int, outcome: Outcome,
    ) -> tuple[bool, str, str] | None:
        """Deploy a verified artifact once per (generation, artifact): later edits of the DistilledModel are
        the user's. None when already done (the Deployed condition stays); else (done, reason, message)."""
        assert job.spec.deploy is not None
        target = job.spec.deploy.distilled_model
        artifact = new.get("artifact") or {}
        sha = artifact.get("sha256")
        before = condition(previous, "Deployed") or {}
        if sha and before.get("status") == "True" and before.get("observedGeneration") == generation \
                and previous.get("deployedArtifact") == sha and previous.get("deployedModel") == target:
            return None
        kept = (f"; DistilledModel {previous['deployedModel']} keeps what it serves"
                if previous.get("deployedModel") else "")
        skipped: tuple[str, str] | None = None
        if not sha:
            why = str(new.get("message") or "succeeded, but the trainer's result carries no artifact sha256")
            skipped = "NoVerifiedArtifact", f"not deployed: the job {why}{kept}"
        elif observed.train_job is None:
            skipped = "TrainJobGone", ("not deployed: the TrainJob is gone, so the spec it ran cannot be checked "
                                       f"against this one{kept}")
        elif not observed.spec_applied or observed.ran is None:
            skipped = "SpecNotApplied", ("not deployed: the spec changed after the TrainJob was created (see "
                                         "SpecApplied), so the artifact is not what this spec describes; delete and "
                                         f"re-create the DistillationJob to run and deploy it{kept}")
        if skipped is not None:
            reason, message = skipped
            if (before.get("reason"), before.get("message")) != (reason, message):
                outcome.events.append("DeploySkipped")
            return False, reason, message
        assert observed.ran is not None
        return await self._deploy(job, observed.ran, artifact, new.get("lineage"), namespace, retry, outcome)

    async def _deploy(
        self, job: DistillationJob, ran: DistillationJobSpec, artifact: Mapping[str, Any],
        lineage: Mapping[str, Any] | None, namespace: str, retry: int, outcome: Outcome,
    ) -> tuple[bool, str, str]:
        """Create or patch spec.deploy's DistilledModel so that it serves the artifact; (done, reason, message)."""
        assert job.spec.deploy is not None
        target = job.spec.deploy.distilled_model
        want = deployed_model(job, ran, artifact, lineage)
        done = (True, "Deployed", f"DistilledModel {target} serves {want['spec']['model']['uri']}")
        try:
            live = await call_api(self.client.get(DM, namespace, target), retry)
            if live is None:
                model = {k: v for k, v in want["spec"]["model"].items() if v is not None}
                body = {"apiVersion": constants.API_VERSION, "kind": constants.KIND,
                        "metadata": {"name": target, "namespace": namespace,
                                     "labels": {constants.LABEL_PART_OF: constants.PART_OF},
                                     **want["metadata"]},
                        "spec": {**want["spec"], "model": model}}
                await call_api(self.client.create(DM, namespace, body), retry)
            elif contains(want, {"metadata": live.get("metadata") or {}, "spec": live.get("spec") or {}}):
                return done
            else:
                await call_api(self.client.patch(DM, namespace, target, want), retry)
        except ApiError as exc:
            if exc.status == 409:
                raise kopf.TemporaryError(f"DistilledModel {target}: {exc}", delay=1) from exc
            return False, "DeployFailed", f"could not point DistilledModel {target} at the artifact: {exc}"
        outcome.writes += 1
        outcome.events.append("Deployed")
        return done

    async def _write_status(
        self, body: Mapping[str, Any], namespace: str, name: str, previous: Mapping[str, Any], new: dict[str, Any],
        retry: int, outcome: Outcome, sink: MutableMapping[str, Any] | None,
    ) -> None:
        await self._post_events(body, previous, new, outcome)
        if not status_changed(previous, new, OWNED_KEYS):
            return
        if sink is not None:
            sink.update(new)
        elif not await patch_status(self.client, DJ, namespace, name, new, retry):
            outcome.action = "gone"
            return
        outcome.writes += 1

    async def _post_events(
        self, body: Mapping[str, Any], previous: Mapping[str, Any], new: Mapping[str, Any], outcome: Outcome
    ) -> None:
        name = (body.get("metadata") or {}).get("name")
        deployed = condition(new, "Deployed") or {}
        messages = {
            "Created": ("Normal", f"created TrainJob {name}"),
            "DriftRepaired": ("Warning", f"TrainJob {name}'s labels or owner were changed by hand; restored them"),
            "Deployed": ("Normal", str(deployed.get("message"))),
            "DeploySkipped": ("Warning", str(deployed.get("message"))),
        }
        for reason in outcome.events:
            if reason in messages:
                type_, message = messages[reason]
                await post_event(self.client, body, type_, reason, message)
        phase = new.get("phase")
        if phase != previous.get("phase") and outcome.action != "invalid":
            if phase == JobPhase.SUCCEEDED.value:
                succeeded = condition(new, "Succeeded") or {}
                await post_event(self.client, body, "Normal", "Succeeded", str(succeeded.get("message")))
            elif phase == JobPhase.FAILED.value:
                await post_event(self.client, body, "Warning", "Failed", str(new.get("message") or "the job failed"))
        missing = condition(new, "TrainerInstalled")
        before = condition(previous, "TrainerInstalled")
        if missing and missing.get("status") == "False" and (before or {}).get("status") != "False":
            await post_event(self.client, body, "Warning", "TrainerNotInstalled", str(missing.get("message")))

    async def _record_invalid(
        self, body: Mapping[str, Any], namespace: str, name: str, invalid: InvalidSpec,
        live: Mapping[str, Any] | None, previous: Mapping[str, Any], retry: int,
    ) -> NoReturn:
        """Validated=False with every problem, a Warning Event once per generation; the TrainJob stays as it is."""
        generation = (body.get("metadata") or {}).get("generation")
        outcome = Outcome("invalid")
        new = compute_job_status(name=name, generation=generation, spec=None, problems=invalid.problems,
                                 observed=Observed(train_job=live), previous=previous, now=self.clock())
        before = condition(previous, COND_VALIDATED)
        already_reported = (
            before is not None and before.get("status") == "False"
            and before.get("observedGeneration") == generation
            and before.get("message") == condition(new, COND_VALIDATED)["message"]  # type: ignore[index]
        )
        if not already_reported:
            await post_event(self.client, body, "Warning", "InvalidSpec", f"spec rejected, nothing changed: {invalid}")
        await self._write_status(body, namespace, name, previous, new, retry, outcome, None)
        raise kopf.PermanentError(f"invalid spec: {invalid}")
