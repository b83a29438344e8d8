"""All of the operator's I/O: keep each DistilledModel's InferenceService and status in line with its spec.

One reconcile = read the child, create it or patch it when it differs from the render, compute our status
from the child's, write the status only when it changed, post Events on transitions. The Kubernetes API
sits behind `KubeClient` (four calls), so unit tests and the benchmark swap in an in-process fake; the
operator uses `KopfClient`, which rides kopf's own aiohttp session and credentials (async, no extra
dependency, no thread pool).

Failure policy (kopf retries handlers that raise TemporaryError, never those that raise PermanentError):
- 409 on create: someone created it first: re-read and compare. 409 on a patch: re-read and retry (3x).
- 404 on a patch of the child: it vanished: create it. 404 on our status: the model is gone: stop.
- 5xx, 429, timeouts, connection errors: `kopf.TemporaryError` with exponential backoff.
- An invalid spec: Validated=False with every problem, one Warning Event per generation, the running
  InferenceService untouched, then `kopf.PermanentError` (retrying cannot fix a spec).
- 400/422 on a create or patch of the child (the API server or an admission webhook refuses what the spec
  renders to): reported like an invalid spec, with the API's message; the running child stays as it was.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any, NoReturn, Protocol, cast

import kopf

from . import constants, metrics
from .api import (
    Capabilities,
    DistilledModel,
    DistilledModelSpec,
    InvalidSpec,
    Problem,
    RolloutPhase,
    parse_distilled_model,
)
from .monitoring import promql
from .monitoring.prometheus import PrometheusClient, PrometheusError, SloMeasurement, measure
from .render import render_inference_service, spec_hash
from .rollout import (
    IN_PROGRESS,
    RESTORABLE,
    Decision,
    EvaluationOutcome,
    Observed,
    decide,
    interval_seconds,
    parse_time,
)
from .rollout_job import job_name, read_evaluation, render_evaluation_job
from .settings import RenderSettings
from .status import COND_VALIDATED, compute_status, condition, lineage_of, status_changed

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------- the client
@dataclass(frozen=True)
class Ref:
    """A namespaced resource of the API (group '' is the core group)."""

    group: str
    version: str
    plural: str

    def path(self, namespace: str, name: str | None = None, subresource: str | None = None) -> str:
        base = f"/api/{self.version}" if not self.group else f"/apis/{self.group}/{self.version}"
        path = f"{base}/namespaces/{namespace}/{self.plural}"
        if name:
            path += f"/{name}"
        if subresource:
            path += f"/{subresource}"
        return path


DM = Ref(constants.GROUP, constants.VERSION, constants.PLURAL)
ISVC = Ref(constants.KSERVE_GROUP, constants.KSERVE_VERSION, constants.ISVC_PLURAL)
EVENTS = Ref("", "v1", "events")
DJ = Ref(constants.GROUP, constants.VERSION, constants.DJ_PLURAL)
TRAINJOB = Ref(constants.TRAINER_GROUP, constants.TRAINER_VERSION, constants.TRAINJOB_PLURAL)
PODS = Ref("", "v1", "pods")
JOBS = Ref("batch", "v1", "jobs")
LABEL_JOB_NAME = "batch.kubernetes.io/job-name"  # set by the Job controller on its pods


class ApiError(Exception):
    """An API call that failed; status 0 means no HTTP answer (connection error, timeout)."""

    def __init__(self, status: int, message: str = "") -> None:
        self.status = status
        self.message = message
        super().__init__(f"HTTP {status}: {message}" if status else message or "no answer from the API server")

    @property
    def transient(self) -> bool:
        return self.status == 0 or self.status == 429 or self.status >= 500


class KubeClient(Protocol):
    """The API calls the reconciler makes. Implementations raise ApiError; get returns None on 404."""

    async def get(self, ref: Ref, namespace: str, name: str) -> dict[str, Any] | None: ...

    async def create(self, ref: Ref, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]: ...

    async def patch(
        self, ref: Ref, namespace: str, name: str, patch: Mapping[str, Any], subresource: str | None = None
    ) -> dict[str, Any]: ...

    async def event(self, involved: Mapping[str, Any], type_: str, reason: str, message: str) -> None: ...

    async def list(self, ref: Ref, namespace: str, labels: Mapping[str, str]) -> list[dict[str, Any]]: ...


def has_labels(obj: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    own = (obj.get("metadata") or {}).get("labels") or {}
    return all(own.get(key) == value for key, value in labels.items())


class KopfClient:
    """KubeClient on kopf's API access: its aiohttp session and its login credentials.

    kopf retries 5xx itself for a minute before giving up; here every call is tried once so that the
    reconciler turns failures into kopf.TemporaryError and the handler, not the call, waits.
    """

    def __init__(
        self, kopf_settings: kopf.OperatorSettings, logger: logging.Logger | logging.LoggerAdapter[Any] | None = None
    ) -> None:
        self._settings = kopf_settings
        self._logger = logger or log

    async def _request(self, method: str, url: str, payload: object | None, content_type: str | None) -> Any:
        from kopf._cogs.clients import api, errors  # kopf's own client; private, pinned by kopf>=1.45

        headers = {"Content-Type": content_type} if content_type else None
        try:
            response = await api.request(
                method, url, payload=payload, headers=headers, settings=self._settings, backoffs=(),
                logger=self._logger,
            )
            async with response:
                return await response.json()
        except errors.APIError as exc:
            raise ApiError(exc.status, exc.message or str(exc)) from exc
        except (TimeoutError, OSError) as exc:  # aiohttp's connection errors are OSErrors
            raise ApiError(0, repr(exc)) from exc
        except Exception as exc:  # aiohttp.ClientError that is not an OSError (payload, disconnect)
            if type(exc).__module__.startswith("aiohttp"):
                raise ApiError(0, repr(exc)) from exc
            raise

    async def get(self, ref: Ref, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = await self._request("get", ref.path(namespace, name), None, None)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise
        return result

    async def create(self, ref: Ref, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = await self._request("post", ref.path(namespace), body, "application/json")
        return result

    async def patch(
        self, ref: Ref, namespace: str, name: str, patch: Mapping[str, Any], subresource: str | None = None
    ) -> dict[str, Any]:
        url = ref.path(namespace, name, subresource)
        result: dict[str, Any] = await self._request("patch", url, patch, "application/merge-patch+json")
        return result

    async def list(self, ref: Ref, namespace: str, labels: Mapping[str, str]) -> list[dict[str, Any]]:
        from urllib.parse import quote

        selector = ",".join(f"{key}={value}" for key, value in labels.items())
        result = await self._request("get", f"{ref.path(namespace)}?labelSelector={quote(selector)}", None, None)
        # Filtered here too: an API that ignores the selector must not hand us strangers' objects.
        return [item for item in (result or {}).get("items") or [] if has_labels(item, labels)]

    async def event(self, involved: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        # kopf queues it and posts it from its own task (with its own retries): never blocks a reconcile.
        kopf.event(cast(kopf.Body, dict(involved)), type=type_, reason=reason, message=message)


# ------------------------------------------------------------------------------------ the logic
def utcnow() -> str:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def owner_reference(body: Mapping[str, Any], kind: str = constants.KIND) -> dict[str, Any]:
    meta = body.get("metadata") or {}
    return {
        "apiVersion": constants.API_VERSION,
        "kind": kind,
        "name": meta.get("name"),
        "uid": meta.get("uid"),
        "controller": True,
        "blockOwnerDeletion": True,
    }


def contains(desired: Any, live: Any) -> bool:
    """Whether `live` has every field of `desired` with the same value (dicts may carry extra keys,
    which admission webhooks add as defaults; lists and scalars must be equal)."""
    if isinstance(desired, Mapping):
        if not isinstance(live, Mapping):
            return False
        return all(contains(value, live.get(key)) for key, value in desired.items())
    if isinstance(desired, list):
        return (
            isinstance(live, list)
            and len(desired) == len(live)
            and all(contains(d, li) and contains(li, d) for d, li in zip(desired, live, strict=True))
        )
    return bool(desired == live)


def merge_patch(live: Any, desired: Any) -> Any:
    """A JSON merge patch turning `live` into `desired` (keys that `desired` lacks become null)."""
    if not isinstance(desired, Mapping) or not isinstance(live, Mapping):
        return desired
    patch: dict[str, Any] = {key: None for key in live if key not in desired}
    for key, value in desired.items():
        patch[key] = merge_patch(live[key], value) if key in live else value
    return patch


# Label/annotation keys the renderer writes; stale ones (from an older render) are removed on patch.
OWNED_META_PREFIXES = ("app.kubernetes.io/", f"{constants.GROUP}/", "serving.kserve.io/", "autoscaling.knative.dev/")


def owned_meta_patch(live: Mapping[str, str] | None, desired: Mapping[str, str]) -> dict[str, str | None]:
    patch: dict[str, str | None] = {
        key: None for key in (live or {}) if key not in desired and key.startswith(OWNED_META_PREFIXES)
    }
    patch.update(desired)
    return patch


def isvc_in_sync(desired: Mapping[str, Any], live: Mapping[str, Any], owner_uid: str | None) -> bool:
    """Whether the live child is what we render: same hash, our fields unchanged, owned by this model."""
    dmeta, lmeta = desired["metadata"], live.get("metadata") or {}
    annotations = lmeta.get("annotations") or {}
    if annotations.get(constants.ANN_SPEC_HASH) != dmeta["annotations"][constants.ANN_SPEC_HASH]:
        return False
    if not any(ref.get("uid") == owner_uid and ref.get("controller") for ref in lmeta.get("ownerReferences") or []):
        return False
    return (
        contains(dmeta["labels"], lmeta.get("labels") or {})
        and contains(dmeta["annotations"], annotations)
        and contains(desired["spec"], live.get("spec") or {})
    )


def isvc_patch(desired: Mapping[str, Any], live: Mapping[str, Any]) -> dict[str, Any]:
    """The merge patch that restores our labels, annotations, ownerReference and spec on the live child."""
    lmeta = live.get("metadata") or {}
    ours = desired["metadata"]["ownerReferences"][0]
    others = [r for r in lmeta.get("ownerReferences") or [] if r.get("uid") != ours["uid"] and not r.get("controller")]
    return {
        "metadata": {
            "labels": owned_meta_patch(lmeta.get("labels"), desired["metadata"]["labels"]),
            "annotations": owned_meta_patch(lmeta.get("annotations"), desired["metadata"]["annotations"]),
            "ownerReferences": [*others, ours],
        },
        "spec": merge_patch(live.get("spec") or {}, desired["spec"]),
    }


def wait_for_foreign_controller(live: Mapping[str, Any], owner_uid: str, what: str, retry: int) -> None:
    """A child controlled by another owner (another controller, or a deleted namesake of ours awaiting garbage
    collection) is never taken over: raise TemporaryError to wait for it to go."""
    refs = (live.get("metadata") or {}).get("ownerReferences") or []
    foreign = [r for r in refs if r.get("controller") and r.get("uid") != owner_uid]
    if foreign:
        raise kopf.TemporaryError(
            f"{what} is controlled by {foreign[0].get('kind')}/{foreign[0].get('name')} (uid {foreign[0].get('uid')}); "
            "waiting for it to go", delay=backoff(retry) * 5,
        )


def backoff(retry: int) -> float:
    """Seconds before kopf retries a handler that hit a transient API error (1, 2, 4 ... 60)."""
    return float(min(60, 2 ** max(0, retry)))


async def call_api(awaitable: Any, retry: int) -> Any:
    """Await a client call; transient API failures become kopf.TemporaryError with backoff."""
    try:
        return await awaitable
    except ApiError as exc:
        metrics.API_ERRORS.labels(str(exc.status)).inc()
        if exc.transient:
            raise kopf.TemporaryError(f"Kubernetes API: {exc}", delay=backoff(retry)) from exc
        raise


async def post_event(client: KubeClient, body: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
    try:
        await client.event(body, type_, reason, message)
    except ApiError as exc:  # an Event is best effort: never fail a reconcile for one
        log.warning("could not post Event %s on %s: %s", reason, (body.get("metadata") or {}).get("name"), exc)


async def patch_status(client: KubeClient, ref: Ref, namespace: str, name: str, new: Mapping[str, Any],
                       retry: int) -> bool:
    """Write a status through the status subresource (409s retried); False when the object is gone."""
    for attempt in range(MAX_CONFLICT_RETRIES + 1):
        try:
            await call_api(client.patch(ref, namespace, name, {"status": dict(new)}, "status"), retry)
            return True
        except ApiError as exc:
            if exc.status == 404:
                return False
            if exc.status != 409 or attempt == MAX_CONFLICT_RETRIES:
                raise kopf.TemporaryError(f"writing status of {name}: {exc}", delay=backoff(retry)) from exc
    return True


@dataclass
class Outcome:
    """What a reconcile did (for logs, metrics, tests and the benchmark)."""

    action: str  # created | patched | unchanged | invalid | deleting | gone
    writes: int = 0
    events: list[str] = field(default_factory=list)
    phase: str | None = None


@dataclass
class Seen:
    """What the last successful reconcile of a model rendered and wrote: lets a child event that changes
    nothing be recognised without reading the model back."""

    desired: dict[str, Any]
    spec: DistilledModelSpec
    generation: int | None
    status: dict[str, Any]


class Unset:
    pass


UNSET = Unset()
MAX_CONFLICT_RETRIES = 3
REFUSED = (400, 422)  # the API server refused the object itself: the same render would be refused again


class _Refused(Exception):
    """A create/patch of the child the API server refused; `live` is the child as it still runs (or None)."""

    def __init__(self, error: ApiError, live: Mapping[str, Any] | None) -> None:
        super().__init__(str(error))
        self.error = error
        self.live = live


def strip_none(mapping: Mapping[str, Any] | None) -> dict[str, Any]:
    return {key: value for key, value in (mapping or {}).items() if value is not None}


def served_key(dm: DistilledModel, settings: RenderSettings) -> str:
    """Hash of the rendered model server (weights, quantization, serving flags, image, resources): a change
    of it is what a stepped rollout rolls out; replicas and autoscaling take effect at once."""
    return spec_hash(render_inference_service(dm, settings)["spec"]["predictor"]["model"])


def components_predictor(isvc: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return (((isvc or {}).get("status") or {}).get("components") or {}).get("predictor") or {}


def revisions(state: Mapping[str, Any], isvc: Mapping[str, Any] | None) -> dict[str, str]:
    """The stable revision (what rolled out before the candidate) and the candidate's (the latest created
    one, once it is neither the stable one nor `baseRevision`, the latest when the rollout started: an
    earlier candidate's revision is never this one's), from the InferenceService's status.components.predictor."""
    predictor = components_predictor(isvc)
    found: dict[str, str] = {}
    stable = state.get("stableRevision") or predictor.get("latestRolledoutRevision") or predictor.get(
        "latestReadyRevision")
    if stable:
        found["stableRevision"] = str(stable)
    created = predictor.get("latestCreatedRevision")
    new = created and created not in (stable, state.get("baseRevision"))
    candidate = state.get("candidateRevision") or (created if new else None)
    if candidate:
        found["candidateRevision"] = str(candidate)
    return found


def candidate_ready(state: Mapping[str, Any], isvc: Mapping[str, Any] | None) -> bool:
    """Whether the candidate's revision exists and is the latest ready one."""
    candidate = revisions(state, isvc).get("candidateRevision")
    return bool(candidate) and components_predictor(isvc).get("latestReadyRevision") == candidate


def latest_revision(isvc: Mapping[str, Any] | None) -> str | None:
    created = components_predictor(isvc).get("latestCreatedRevision")
    return str(created) if created else None


def restoring(state: Mapping[str, Any], isvc: Mapping[str, Any] | None) -> bool:
    """After a rollback or an abandon: whether the revision of the restored stable spec is not yet the
    latest ready one (a candidate's revision is still the newest, or the restored one is not ready). The
    candidates are this rollout's and, when the rollout started over an earlier one, its base revision."""
    base = state.get("baseRevision")
    candidates = {state.get("candidateRevision"), base if base != state.get("stableRevision") else None} - {None}
    if not candidates:
        return False  # no candidate ever had a revision: nothing serves one
    predictor = components_predictor(isvc)
    created = predictor.get("latestCreatedRevision")
    return not created or created in candidates or predictor.get("latestReadyRevision") != created


class Reconciler:
    """Reconciles DistilledModels through a KubeClient; one per operator process."""

    def __init__(
        self,
        client: KubeClient,
        settings: RenderSettings,
        *,
        clock: Callable[[], str] = utcnow,
    ) -> None:
        self.client = client
        self.settings = settings
        self.clock = clock
        self.capabilities = Capabilities(prometheus=settings.rollout_analysis_enabled, keda=settings.keda_enabled)
        self.prometheus = PrometheusClient(settings.prometheus_url)
        # One reconcile at a time per model: the DistilledModel handlers, the child watch and the resync
        # timer run in different kopf workers and would otherwise race each other into duplicate writes.
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._seen: dict[tuple[str, str], Seen] = {}

    def lock(self, namespace: str, name: str) -> asyncio.Lock:
        return self._locks.setdefault((namespace, name), asyncio.Lock())

    def forget(self, namespace: str, name: str) -> None:
        self._locks.pop((namespace, name), None)
        self._seen.pop((namespace, name), None)

    # ---------------------------------------------------------------------------- entry points
    async def reconcile(
        self,
        body: Mapping[str, Any],
        *,
        trigger: str,
        retry: int = 0,
        live: Mapping[str, Any] | None | Unset = UNSET,
        assume_absent: bool = False,
        status_sink: MutableMapping[str, Any] | None = None,
    ) -> Outcome:
        """Bring one DistilledModel's child and status in line; raise kopf errors on failure.

        `live` is the child as an event just delivered it (UNSET: read it); `assume_absent` skips that read
        for a model that was just created (a 409 on the create falls back to reading it); `status_sink`
        (kopf's patch.status in its handlers) takes a changed status instead of a write of our own, so it
        travels in the one status patch kopf makes for its bookkeeping anyway."""
        meta = body.get("metadata") or {}
        namespace, name = str(meta.get("namespace") or "default"), str(meta.get("name"))
        started = time.perf_counter()
        result = "error"
        try:
            async with self.lock(namespace, name):
                outcome = await self._reconcile(body, namespace, name, retry, live, assume_absent, status_sink)
            result = outcome.action
            if outcome.phase:
                metrics.set_phase(namespace, name, outcome.phase)
            return outcome
        except kopf.PermanentError:
            result = "invalid"
            raise
        except kopf.TemporaryError:
            result = "retry"
            raise
        finally:
            metrics.observe_reconcile(trigger, result, time.perf_counter() - started)

    async def reconcile_child(self, event_type: str, isvc: Mapping[str, Any], *, trigger: str = "child") -> Outcome | None:
        """A change of a child InferenceService: mirror its status, restore it if edited or deleted by hand."""
        meta = isvc.get("metadata") or {}
        namespace = str(meta.get("namespace") or "default")
        owner = (meta.get("labels") or {}).get(constants.LABEL_MODEL)
        if not owner:
            return None
        if event_type != "DELETED" and self._nothing_to_do(namespace, str(owner), isvc):
            metrics.observe_reconcile(trigger, "unchanged", 0.0)
            return Outcome("unchanged")
        body = await self._call(self.client.get(DM, namespace, owner), 0)
        if body is None or (body.get("metadata") or {}).get("deletionTimestamp"):
            return None  # an orphan, or its owner is going: garbage collection's business
        live: Mapping[str, Any] | None | Unset = None if event_type == "DELETED" else isvc
        try:
            return await self.reconcile(body, trigger=trigger, live=live)
        except kopf.PermanentError:
            return Outcome("invalid")  # already recorded on the model; nothing to retry

    # ---------------------------------------------------------------------------- internals
    def _nothing_to_do(self, namespace: str, name: str, isvc: Mapping[str, Any]) -> bool:
        """The child is what we last rendered and its status maps to what we last wrote: no reads, no writes.
        Anything else (or no memory of the model) goes the full way, reading the model first."""
        seen = self._seen.get((namespace, name))
        if seen is None:
            return False
        rollout = seen.status.get("rollout") or {}
        if rollout.get("phase") in IN_PROGRESS or "canaryTrafficPercent" in seen.desired["spec"]["predictor"] and \
                rollout.get("phase") in RESTORABLE:
            return False  # the rollout acts on the child's status (its revisions): decide again
        uid = seen.desired["metadata"]["ownerReferences"][0]["uid"]
        if not isvc_in_sync(seen.desired, isvc, uid):
            return False
        new = compute_status(
            name=name, generation=seen.generation, spec=seen.spec, isvc=isvc, previous=seen.status, now=self.clock(),
            lineage=seen.status.get("lineage"),
        )
        return not status_changed(seen.status, new)

    async def _call(self, awaitable: Any, retry: int) -> Any:
        return await call_api(awaitable, retry)

    async def _get_isvc(self, namespace: str, name: str, retry: int) -> dict[str, Any] | None:
        result: dict[str, Any] | None = await self._call(self.client.get(ISVC, namespace, name), retry)
        return result

    async def _reconcile(
        self,
        body: Mapping[str, Any],
        namespace: str,
        name: str,
        retry: int,
        live_in: Mapping[str, Any] | None | Unset,
        assume_absent: bool,
        status_sink: MutableMapping[str, Any] | None,
    ) -> Outcome:
        meta = body.get("metadata") or {}
        if meta.get("deletionTimestamp"):
            return Outcome("deleting")
        generation = meta.get("generation")
        previous = body.get("status") or {}
        live: Mapping[str, Any] | None
        if isinstance(live_in, Unset):
            # A brand-new model's child rarely exists: try the create first and read only on a 409.
            live = None if assume_absent and retry == 0 else await self._get_isvc(namespace, name, retry)
        else:
            live = live_in

        try:
            dm = parse_distilled_model(dict(body), self.capabilities)
        except InvalidSpec as invalid:
            await self._record_invalid(body, namespace, name, invalid, live, previous, retry)

        outcome = Outcome("unchanged")
        decision: Decision | None = None
        served = dm
        reread = False  # the event's copy replaced by a fresh read already
        if dm.spec.rollout.steps:
            if not isinstance(live_in, Unset):
                # The rollout decides on the child's revisions: an event's copy may be older than what an
                # earlier reconcile acted on (by a late one, a restored stable spec would look ready and the
                # hold on the stable revision would lift while Knative still routes to the candidate).
                live, reread = await self._get_isvc(namespace, name, retry), True
            decision, previous = await self._rollout(body, dm, live, namespace, name, previous, retry)
            served = self._served_model(dm, decision)
        desired = render_inference_service(served, self.settings)
        desired["metadata"]["ownerReferences"] = [owner_reference(body)]
        uid = meta.get("uid")

        if live is not None and not reread and not isvc_in_sync(desired, live, uid):
            # The event's copy may be stale: decide on a fresh read before writing.
            live = await self._get_isvc(namespace, name, retry)
        try:
            if live is None:
                live = await self._create(desired, namespace, name, retry, outcome)
            if outcome.action != "created" and live is not None and not isvc_in_sync(desired, live, uid):
                live = await self._patch_isvc(desired, live, namespace, name, retry, outcome)
        except _Refused as refused:
            problem = Problem("spec", f"the API server refused the InferenceService rendered from it ({refused.error}); "
                                      "the running one, if any, is unchanged")
            await self._record_invalid(body, namespace, name, InvalidSpec([problem]), refused.live, previous, retry)

        new = compute_status(
            name=name, generation=generation, spec=dm.spec, isvc=live, previous=previous, now=self.clock(),
            lineage=lineage_of(body),
        )
        if decision is not None:
            new["rollout"] = decision.status
            if status_changed({"rollout": previous.get("rollout")}, {"rollout": new["rollout"]}):
                # A rollout's progress is written here, under the model's lock, so that the next reconcile
                # (a tick with an older copy of the model) reads it back and never repeats a step.
                status_sink = None
        elif previous.get("rollout"):
            new["rollout"] = None  # steps removed: the manual mode has no rollout status
        await self._write_status(body, namespace, name, previous, new, retry, outcome, status_sink)
        if decision is not None and outcome.action != "gone":  # once written: a failed write decides again
            await self._rollout_written(body, namespace, name, decision)
        outcome.phase = new["phase"]
        if outcome.action != "gone":
            self._seen[(namespace, name)] = Seen(desired, dm.spec, generation, new)
        return outcome

    async def _create(
        self, desired: dict[str, Any], namespace: str, name: str, retry: int, outcome: Outcome
    ) -> dict[str, Any]:
        try:
            created: dict[str, Any] = await self._call(self.client.create(ISVC, namespace, desired), retry)
        except ApiError as exc:
            if exc.status in REFUSED:
                raise _Refused(exc, None) from exc
            if exc.status != 409:
                raise kopf.TemporaryError(f"creating InferenceService {name}: {exc}", delay=backoff(retry)) from exc
            found = await self._get_isvc(namespace, name, retry)  # created meanwhile: compare with it
            if found is None:
                raise kopf.TemporaryError(f"InferenceService {name}: create conflicted, then not found", delay=1) from exc
            return found
        outcome.action = "created"
        outcome.writes += 1
        outcome.events.append("Created")
        return created

    async def _patch_isvc(
        self, desired: dict[str, Any], live: Mapping[str, Any], namespace: str, name: str, retry: int, outcome: Outcome
    ) -> dict[str, Any]:
        lmeta = live.get("metadata") or {}
        wait_for_foreign_controller(live, desired["metadata"]["ownerReferences"][0]["uid"], f"InferenceService {name}",
                                    retry)
        by_hand = (lmeta.get("annotations") or {}).get(constants.ANN_SPEC_HASH) == desired["metadata"]["annotations"][
            constants.ANN_SPEC_HASH]
        for attempt in range(MAX_CONFLICT_RETRIES + 1):
            try:
                patched: dict[str, Any] = await self._call(
                    self.client.patch(ISVC, namespace, name, isvc_patch(desired, live)), retry
                )
                break
            except ApiError as exc:
                if exc.status == 404:  # deleted under our feet: create it again
                    return await self._create(desired, namespace, name, retry, outcome)
                if exc.status in REFUSED:
                    raise _Refused(exc, live) from exc
                if exc.status != 409 or attempt == MAX_CONFLICT_RETRIES:
                    raise kopf.TemporaryError(f"patching InferenceService {name}: {exc}", delay=backoff(retry)) from exc
                fresh = await self._get_isvc(namespace, name, retry)
                if fresh is None:
                    return await self._create(desired, namespace, name, retry, outcome)
                live = fresh
                if isvc_in_sync(desired, live, desired["metadata"]["ownerReferences"][0]["uid"]):
                    return dict(live)
        outcome.action = "patched"
        outcome.writes += 1
        outcome.events.append("DriftRepaired" if by_hand else "Updated")
        return patched

    async def _write_status(
        self,
        body: Mapping[str, Any],
        namespace: str,
        name: str,
        previous: Mapping[str, Any],
        new: dict[str, Any],
        retry: int,
        outcome: Outcome,
        sink: MutableMapping[str, Any] | None = None,
    ) -> None:
        # Events first: they describe what this reconcile did and saw, whether or not the status changes.
        await self._post_events(body, previous, new, outcome)
        if not status_changed(previous, new):
            return
        payload = dict(new)
        old_rollout, new_rollout = previous.get("rollout"), new.get("rollout")
        if isinstance(old_rollout, Mapping) and isinstance(new_rollout, Mapping):
            # A merge patch keeps keys it does not name: name the ones the new rollout state dropped.
            payload["rollout"] = {**{key: None for key in old_rollout if key not in new_rollout}, **new_rollout}
        if sink is not None:
            sink.update(payload)
            outcome.writes += 1
            return
        if await patch_status(self.client, DM, namespace, name, payload, retry):
            outcome.writes += 1
        else:
            outcome.action = "gone"

    async def _post_events(
        self, body: Mapping[str, Any], previous: Mapping[str, Any], new: Mapping[str, Any], outcome: Outcome
    ) -> None:
        name = (body.get("metadata") or {}).get("name")
        messages = {
            "Created": ("Normal", f"created InferenceService {name}"),
            "Updated": ("Normal", f"updated InferenceService {name} to the new spec"),
            "DriftRepaired": ("Warning", f"InferenceService {name} was changed by hand; restored it to the spec"),
        }
        for reason in outcome.events:
            if reason in messages:
                type_, message = messages[reason]
                await self._event(body, type_, reason, message)
        if new.get("phase") != previous.get("phase"):
            if new["phase"] == "Ready":
                await self._event(body, "Normal", "Ready", f"serving at {new.get('url') or '(no URL yet)'}")
            elif new["phase"] == "Failed" and outcome.action != "invalid":
                await self._event(body, "Warning", "Failed", str(new.get("message") or "the model failed"))
            elif new["phase"] == "Degraded" and outcome.action != "invalid":
                await self._event(body, "Warning", "Degraded", str(new.get("message") or "the model is degraded"))

    async def _event(self, body: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        await post_event(self.client, body, type_, reason, message)

    # ------------------------------------------------------------------------------- rollouts
    async def _rollout(
        self,
        body: Mapping[str, Any],
        dm: DistilledModel,
        live: Mapping[str, Any] | None,
        namespace: str,
        name: str,
        previous: Mapping[str, Any],
        retry: int,
    ) -> tuple[Decision, Mapping[str, Any]]:
        """The rollout decision for this reconcile, with what it needs measured; and the status it was
        made from (re-read when the copy at hand is older than the last rollout state written)."""
        key = served_key(dm, self.settings)
        spec_json = dict(body.get("spec") or {})
        now = parse_time(self.clock()) or datetime.datetime.now(datetime.UTC)
        prev = previous.get("rollout")
        ready = candidate_ready(strip_none(prev), live)
        base = latest_revision(live)  # a rollout starting now takes only a revision created after this one
        decision = decide(dm.spec, prev, key, spec_json, now, Observed(candidate_ready=ready, latest_revision=base))
        if decision.need or strip_none(decision.status) != strip_none(prev):
            # About to act: decide on the model as the API server has it now, not a copy from an event.
            fresh = await self._call(self.client.get(DM, namespace, name), retry)
            fresh_status = (fresh or {}).get("status") or {}
            if fresh is not None and strip_none(fresh_status.get("rollout")) != strip_none(prev):
                previous, prev = fresh_status, fresh_status.get("rollout")
                ready = candidate_ready(strip_none(prev), live)
                decision = decide(dm.spec, prev, key, spec_json, now, Observed(candidate_ready=ready, latest_revision=base))
        state = strip_none(prev)
        if decision.need == "slo":
            measured = await self._measure(dm, state, live, namespace, name)
            decision = decide(dm.spec, prev, key, spec_json, now, Observed(slo=measured, candidate_ready=ready))
        elif decision.need == "evaluation":
            result = await self._evaluate(body, dm, state, live, now, namespace, name, retry)
            if result is not None:
                decision = decide(dm.spec, prev, key, spec_json, now, Observed(evaluation=result, candidate_ready=ready))
        decision.status = strip_none(decision.status)
        if decision.status.get("phase") in IN_PROGRESS or state.get("phase") in IN_PROGRESS:
            decision.status.update(revisions(decision.status, live))  # (also as it ends: a rollback, an abandon)
        if decision.serve == "stable" and restoring(decision.status, live):
            # Knative sends a canary-less service's traffic to its latest *ready* revision: until the
            # restored stable spec's revision is ready that is the failed (or abandoned) candidate, so hold all
            # traffic on the revision rolled out before (KServe's `prev`) with canaryTrafficPercent 0 until then.
            decision.canary_percent = 0
        elif decision.status.get("phase") == RolloutPhase.IDLE.value:
            for restored in ("candidateRevision", "baseRevision"):  # an abandon is over: no more hold
                decision.status.pop(restored, None)
        return decision, previous

    async def _rollout_written(self, body: Mapping[str, Any], namespace: str, name: str, decision: Decision) -> None:
        """The Event and the counter of a rollout decision, after its status write succeeded."""
        if decision.event is not None:
            await self._event(body, *decision.event)
        if decision.outcome == "started":
            for outcome_ in ("promoted", "rolled_back"):  # present at 0, so increase() sees the first
                metrics.ROLLOUTS.labels(namespace, name, outcome_)
        if decision.outcome:
            metrics.ROLLOUTS.labels(namespace, name, decision.outcome).inc()

    def _served_model(self, dm: DistilledModel, decision: Decision) -> DistilledModel:
        """The model the InferenceService serves: the user's (the candidate) or the stable spec kept in
        status, with the canaryTrafficPercent the rollout is at."""
        base = dm
        stable_spec = decision.status.get("stableSpec")
        if decision.serve == "stable" and isinstance(stable_spec, Mapping):
            try:
                base = dm.model_copy(update={"spec": DistilledModelSpec.model_validate(stable_spec)})
            except ValueError:
                log.warning("the stable spec kept in status of %s is unreadable: serving the spec", dm.metadata.name)
        rollout = base.spec.rollout.model_copy(update={"canary_traffic_percent": decision.canary_percent,
                                                       "steps": dm.spec.rollout.steps})
        return base.model_copy(update={"spec": base.spec.model_copy(update={"rollout": rollout})})

    async def _measure(
        self, dm: DistilledModel, state: Mapping[str, Any], live: Mapping[str, Any] | None, namespace: str, name: str
    ) -> SloMeasurement:
        """The candidate revision's own SLO figures over the step (no revision yet: no data, a failed gate)."""
        revision = state.get("candidateRevision") or revisions(state, live).get("candidateRevision")
        if not revision:
            return SloMeasurement(None, None, None, None)
        # Knative names revisions NAME-predictor-0000N; their pods NAME-predictor-0000N-deployment-...
        suffix = str(revision).removeprefix(f"{name}-predictor-")
        selector = promql.Selector(model=name, namespace=namespace, pod_regex=promql.revision_pods(name, suffix))
        window = f"{max(1, round(interval_seconds(dm.spec)))}s"
        try:
            return await measure(self.prometheus, selector, window)
        except PrometheusError as exc:
            # No promotion and no rollback on an outage: try again (a refused query is a bug, logged loudly).
            if not exc.transient:
                log.error("rollout of %s/%s: %s", namespace, name, exc)
            raise kopf.TemporaryError(f"rollout analysis: {exc}", delay=10) from exc

    async def _evaluate(
        self,
        body: Mapping[str, Any],
        dm: DistilledModel,
        state: Mapping[str, Any],
        live: Mapping[str, Any] | None,
        now: datetime.datetime,
        namespace: str,
        name: str,
        retry: int,
    ) -> EvaluationOutcome | None:
        """The evaluation Job's result (None while it runs); the Job is created once the candidate is ready."""
        candidate = str(state.get("candidate"))
        started_at = str(state.get("startedAt"))
        jname = job_name(name, candidate, started_at)
        job = await self._call(self.client.get(JOBS, namespace, jname), retry)
        if job is not None:
            pods = await self._call(self.client.list(PODS, namespace, {LABEL_JOB_NAME: jname}), retry)
            return read_evaluation(job, pods)
        if not candidate_ready(state, live):
            started = parse_time(state.get("stepStartedAt")) or now
            if (now - started).total_seconds() > dm.spec.startup_timeout_seconds:
                return EvaluationOutcome(error=f"the candidate revision was not ready within startupTimeoutSeconds "
                                               f"({dm.spec.startup_timeout_seconds}s)")
            return None  # nothing to evaluate yet
        desired = render_evaluation_job(dm, candidate, started_at, self.settings)
        desired["metadata"]["ownerReferences"] = [owner_reference(body)]
        try:
            await self._call(self.client.create(JOBS, namespace, desired), retry)
        except ApiError as exc:
            if exc.status in REFUSED:
                return EvaluationOutcome(error=f"the API server refused the evaluation Job: {exc}")
            if exc.status != 409:
                raise kopf.TemporaryError(f"creating evaluation Job {jname}: {exc}", delay=backoff(retry)) from exc
        return None

    async def _record_invalid(
        self,
        body: Mapping[str, Any],
        namespace: str,
        name: str,
        invalid: InvalidSpec,
        live: Mapping[str, Any] | None,
        previous: Mapping[str, Any],
        retry: int,
    ) -> NoReturn:
        """Validated=False with every problem, a Warning Event once per generation; the child stays as it is."""
        generation = (body.get("metadata") or {}).get("generation")
        outcome = Outcome("invalid")
        self._seen.pop((namespace, name), None)  # child events must read the model again
        new = compute_status(
            name=name, generation=generation, spec=None, problems=invalid.problems, isvc=live, previous=previous,
            now=self.clock(), lineage=lineage_of(body),
        )
        before = condition(previous, COND_VALIDATED)
        already_reported = (
            before is not None
            and before.get("status") == "False"
            and before.get("observedGeneration") == generation
            and before.get("message") == condition(new, COND_VALIDATED)["message"]  # type: ignore[index]
        )
        if not already_reported:
            await self._event(body, "Warning", "InvalidSpec", f"spec rejected, nothing changed: {invalid}")
            outcome.events.append("InvalidSpec")
        await self._write_status(body, namespace, name, previous, new, retry, outcome)
        outcome.phase = new["phase"]
        raise kopf.PermanentError(f"invalid spec: {invalid}")
