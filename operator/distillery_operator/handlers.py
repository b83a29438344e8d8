"""kopf handlers: thin glue between kopf's events and the Reconciler (reconcile.py does the work).

`register()` puts every handler into a kopf registry, so each operator run (and each test) gets its own:
- DistilledModel create / update / resume -> reconcile; delete -> forget (ownerReferences let the garbage
  collector remove the InferenceService, so no finalizer is needed);
- any change of a child InferenceService (label distillery.dev/model) -> mirror its status, restore it
  when it was edited or deleted by hand;
- a timer per DistilledModel -> periodic resync, the backstop for missed events;
- a timer per DistilledModel in a rollout (status.rollout.phase Evaluating/Progressing) -> judge its step;
- DistillationJob create / update / resume / a timer -> DistillationReconciler; any change of a child
  TrainJob (label distillery.dev/distillation-job) -> reconcile its job;
- startup: kopf settings, the API client, the metrics endpoint; cleanup: a log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from typing import Any

import kopf

from . import constants, metrics
from .distillation_reconcile import DistillationReconciler
from .reconcile import KopfClient, Reconciler
from .rollout import IN_PROGRESS
from .settings import OperatorSettings

Logger = logging.Logger | logging.LoggerAdapter[Any]
DM = (constants.GROUP, constants.VERSION, constants.PLURAL)
ISVC = (constants.KSERVE_GROUP, constants.KSERVE_VERSION, constants.ISVC_PLURAL)
DJ = (constants.GROUP, constants.VERSION, constants.DJ_PLURAL)
TRAINJOB = (constants.TRAINER_GROUP, constants.TRAINER_VERSION, constants.TRAINJOB_PLURAL)
CHILD_EVENT_ATTEMPTS = 4  # kopf never retries event handlers; a child event retries transient errors itself


async def on_startup(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: Logger, **_: Any) -> None:
    config: OperatorSettings = memo.config
    settings.posting.level = logging.WARNING  # kopf's own "handler succeeded" chatter is no Event
    settings.networking.request_timeout = 60.0
    settings.networking.connect_timeout = 10.0
    settings.watching.server_timeout = 600
    settings.persistence.finalizer = f"{constants.GROUP}/finalizer"
    # After its own patch kopf waits for the watch to deliver that version before it trusts the object's
    # state again; past the timeout it handles a stale copy and re-runs `create` (one extra write). A busy
    # API server delivers watch events late, so wait longer than kopf's default 5 s.
    settings.persistence.consistency_timeout = 30.0
    # kopf's bookkeeping (the last handled spec, retry progress) in status, beside ours: one status patch
    # per handled change carries both, instead of an annotation patch plus a status patch.
    settings.persistence.diffbase_storage = kopf.StatusDiffBaseStorage(field="status.kopf.lastHandledConfiguration")
    settings.persistence.progress_storage = kopf.StatusProgressStorage(field="status.kopf.progress")
    client = KopfClient(settings, logger)
    memo.reconciler = Reconciler(client, config.render_settings())
    memo.jobs = DistillationReconciler(client, config.render_settings())
    metrics.serve(config.metrics_port)
    logger.info("distillery operator started (resync every %ss)", config.resync_seconds)


async def on_cleanup(logger: Logger, **_: Any) -> None:
    logger.info("distillery operator stopped")


async def on_model(
    body: kopf.Body, reason: str, retry: int, patch: kopf.Patch, memo: kopf.Memo, **_: Any
) -> None:
    """create / update / resume of a DistilledModel; a changed status rides along in kopf's own patch."""
    reconciler: Reconciler = memo.reconciler
    await reconciler.reconcile(
        body, trigger=str(reason), retry=retry, assume_absent=reason == "create", status_sink=patch.status
    )


async def on_model_deleted(name: str, namespace: str | None, memo: kopf.Memo, **_: Any) -> None:
    reconciler: Reconciler = memo.reconciler
    reconciler.forget(namespace or "default", name)
    metrics.forget_model(namespace or "default", name)


async def on_resync(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    reconciler: Reconciler = memo.reconciler
    with contextlib.suppress(kopf.PermanentError):  # recorded on the model already; the timer keeps running
        await reconciler.reconcile(body, trigger="resync")


async def on_rollout_tick(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """A model in a rollout: judge its step once the interval has passed (the state is in its status)."""
    reconciler: Reconciler = memo.reconciler
    with contextlib.suppress(kopf.PermanentError):
        await reconciler.reconcile(body, trigger="rollout")


def in_rollout(body: kopf.Body, **_: Any) -> bool:
    return ((body.get("status") or {}).get("rollout") or {}).get("phase") in IN_PROGRESS


async def on_child(type: str, body: kopf.Body, memo: kopf.Memo, logger: Logger, **_: Any) -> None:
    """Any event of a child InferenceService (None: seen in the initial listing)."""
    reconciler: Reconciler = memo.reconciler
    for attempt in range(CHILD_EVENT_ATTEMPTS):
        try:
            await reconciler.reconcile_child(type or "ADDED", body)
            return
        except kopf.TemporaryError as exc:
            logger.warning("child %s: %s (attempt %d/%d)", body.get("metadata", {}).get("name"), exc, attempt + 1,
                           CHILD_EVENT_ATTEMPTS)
            await asyncio.sleep(min(exc.delay or 1.0, 5.0))


async def on_job(body: kopf.Body, reason: str, retry: int, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    """create / update / resume of a DistillationJob."""
    jobs: DistillationReconciler = memo.jobs
    await jobs.reconcile(body, trigger=str(reason), retry=retry, status_sink=patch.status)


async def on_job_deleted(name: str, namespace: str | None, memo: kopf.Memo, **_: Any) -> None:
    jobs: DistillationReconciler = memo.jobs
    jobs.forget(namespace or "default", name)


async def on_job_resync(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    jobs: DistillationReconciler = memo.jobs
    with contextlib.suppress(kopf.PermanentError):
        await jobs.reconcile(body, trigger="resync")


async def on_train_job(body: kopf.Body, memo: kopf.Memo, logger: Logger, **_: Any) -> None:
    """Any event of a child TrainJob."""
    jobs: DistillationReconciler = memo.jobs
    for attempt in range(CHILD_EVENT_ATTEMPTS):
        try:
            await jobs.reconcile_child(body)
            return
        except kopf.TemporaryError as exc:
            logger.warning("TrainJob %s: %s (attempt %d/%d)", body.get("metadata", {}).get("name"), exc, attempt + 1,
                           CHILD_EVENT_ATTEMPTS)
            await asyncio.sleep(min(exc.delay or 1.0, 5.0))


def register(registry: kopf.OperatorRegistry, config: OperatorSettings) -> kopf.OperatorRegistry:
    """Register every handler of the operator into `registry`."""
    kopf.on.startup(registry=registry)(on_startup)
    kopf.on.cleanup(registry=registry)(on_cleanup)
    kopf.on.create(*DM, id="reconcile-create", registry=registry)(on_model)
    kopf.on.update(*DM, id="reconcile-update", registry=registry)(on_model)
    kopf.on.resume(*DM, id="reconcile-resume", registry=registry)(on_model)
    kopf.on.delete(*DM, id="forget", optional=True, registry=registry)(on_model_deleted)
    kopf.on.event(*ISVC, labels={constants.LABEL_MODEL: kopf.PRESENT}, registry=registry)(on_child)
    kopf.timer(
        *DM, id="resync", interval=config.resync_seconds, initial_delay=config.resync_seconds, registry=registry
    )(on_resync)
    kopf.timer(
        *DM, id="rollout", interval=config.rollout_tick_seconds, when=in_rollout, registry=registry
    )(on_rollout_tick)
    kopf.on.create(*DJ, id="job-create", registry=registry)(on_job)
    kopf.on.update(*DJ, id="job-update", registry=registry)(on_job)
    kopf.on.resume(*DJ, id="job-resume", registry=registry)(on_job)
    kopf.on.delete(*DJ, id="job-forget", optional=True, registry=registry)(on_job_deleted)
    kopf.on.event(*TRAINJOB, labels={constants.LABEL_JOB: kopf.PRESENT}, registry=registry)(on_train_job)
    kopf.timer(
        *DJ, id="job-resync", interval=config.resync_seconds, initial_delay=config.resync_seconds, registry=registry
    )(on_job_resync)
    # kopf puts a finalizer on objects with timers so it can stop them gracefully; the resync is stateless
    # and idempotent, so a deleted model can simply drop it: no finalizer, no extra write per model.
    spawning = registry._spawning
    spawning._handlers = [dataclasses.replace(h, requires_finalizer=False) for h in spawning._handlers]
    return registry
