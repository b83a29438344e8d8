"""What the OpenAI and the KServe routes share: reading a request's body, answering and counting an
error, and giving up on a request whose client disconnected (499, aborting its engine requests)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

from fastapi import Request
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse

from model_runtime.errors import ServingError
from model_runtime.jobs import Job
from model_runtime.metrics import RuntimeMetrics
from model_runtime.request_decoding import OFFLOAD_BYTES, BodyTooLarge, error_body, too_large
from model_runtime.serving import Serving

if TYPE_CHECKING:
    from model_runtime.server import DistilleryModel

log = logging.getLogger("model_runtime.server")  # the HTTP layer logs under one name

T = TypeVar("T")


def error_response(exc: ServingError, path: str = "/v1/completions") -> JSONResponse:
    """The error in the route's protocol shape (OpenAI's object, or KServe's {"error": ...})."""
    return JSONResponse(error_body(exc, path), status_code=exc.status, headers=exc.headers)


@contextlib.asynccontextmanager
async def abort_on_disconnect(request: Request, serving: Serving, jobs: Sequence[Job]) -> AsyncIterator[None]:
    """While the body is open, a client disconnect aborts the jobs' engine requests at once.

    (Without this a non-streaming request would run to max_tokens for nobody, and a stream would
    only notice at its next write.) The request then ends as 499, nginx's "client closed request".
    """
    gone = asyncio.Event()

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                gone.set()
                log.info("client disconnected", extra={"request_id": jobs[0].request_id if jobs else None})
                for job in jobs:
                    with contextlib.suppress(Exception):
                        serving.engine.abort(job.request_id)
                return

    watcher = asyncio.create_task(watch())
    try:
        yield
    except ServingError as exc:
        if gone.is_set():
            raise ServingError(499, "client closed the request", type="client_closed", code="client_closed") from exc
        raise
    finally:
        watcher.cancel()


async def read_request(request: Request, model: DistilleryModel, decode: Callable[[bytes], T]) -> T:
    """The body, decoded by `decode` (in the worker pool when it is large): every route's one way in."""
    limit = model.options.max_body_bytes
    try:
        raw = await request.body()
    except ClientDisconnect as exc:
        raise client_closed() from exc
    except BodyTooLarge as exc:  # a body with no declared length, cut off by the middleware at the limit
        raise too_large(limit) from exc
    if len(raw) > limit:
        raise too_large(limit)
    if len(raw) > OFFLOAD_BYTES:
        return await model.pool.run(decode, raw)
    return decode(raw)


def client_closed() -> ServingError:
    return ServingError(499, "client closed the request", type="client_closed", code="client_closed")


def record_error(metrics: RuntimeMetrics, exc: ServingError) -> None:
    metrics.error(exc.code or exc.type)
    if exc.status == 429:
        metrics.rejected()  # once per rejected request, however many prompts it carried


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """`work`, cancelled (which aborts its engine requests) as soon as the client disconnects: 499."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        log.info("client disconnected", extra={"path": request.url.path})
        raise client_closed()
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
