"""The OpenAI-compatible routes: /openai/v1/{chat/completions,completions,models} and the same under /v1/.

Added to the ModelServer's FastAPI app *before* KServe registers its own routes, so our GET /v1/models
(OpenAI list + KServe's {"models": [...]}) answers both kinds of client, while /v1/models/{name}
(readiness) and /v1/models/{name}:predict stay KServe's. Bodies are parsed here (not by FastAPI) so every
malformed or invalid request is a 400 with an OpenAI error body; a full engine queue is a 429 with
Retry-After; a client that disconnects aborts its engine requests. The work is Serving's (serving.py);
this layer parses, plans in the worker pool, and writes JSON or server-sent events.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from starlette.responses import JSONResponse, Response, StreamingResponse

from model_runtime.errors import ServingError, invalid
from model_runtime.http_common import abort_on_disconnect, error_response, read_request, record_error
from model_runtime.jobs import Delta, JobGroup, Output
from model_runtime.openapi_docs import document_request_bodies, request_body
from model_runtime.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatResponseMessage,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    Usage,
    dump,
)
from model_runtime.request_decoding import decode_json, validate
from model_runtime.response_cache import lookup_response
from model_runtime.serving import Serving

if TYPE_CHECKING:
    from model_runtime.server import DistilleryModel

log = logging.getLogger("model_runtime.server")  # the HTTP layer logs under one name

OPENAI_PREFIXES = ("/openai/v1", "/v1")


async def serving_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServingError)
    return error_response(exc, request.url.path)


async def request_validation_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    loc = ".".join(str(p) for p in (errors[0].get("loc", ()) if errors else ()) if p != "body") or None
    msg = errors[0].get("msg", "invalid request") if errors else "invalid request"
    return error_response(invalid(f"{loc}: {msg}" if loc else msg, param=loc), request.url.path)


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


class OpenAIRoutes:
    """The OpenAI-compatible endpoints, bound to one DistilleryModel."""

    def __init__(self, model: DistilleryModel) -> None:
        self.model = model

    def register(self, app: FastAPI, prefixes: tuple[str, ...] = OPENAI_PREFIXES) -> None:
        for prefix in prefixes:
            app.add_api_route(f"{prefix}/chat/completions", self.chat, methods=["POST"], response_model=None,
                              openapi_extra=request_body(ChatCompletionRequest),
                              responses={200: {"model": ChatCompletionResponse}})
            app.add_api_route(f"{prefix}/completions", self.completions, methods=["POST"], response_model=None,
                              openapi_extra=request_body(CompletionRequest),
                              responses={200: {"model": CompletionResponse}})
            app.add_api_route(f"{prefix}/models", self.models, methods=["GET"], response_model=None)
        document_request_bodies(app, [ChatCompletionRequest, CompletionRequest])
        # GET /v1/models/{name} stays KServe's readiness probe; the OpenAI "retrieve model" lives
        # under the /openai prefix only.
        app.add_api_route(f"{OPENAI_PREFIXES[0]}/models/{{model_id}}", self.retrieve_model, methods=["GET"],
                          response_model=None)
        app.add_exception_handler(ServingError, serving_error_handler)
        app.add_exception_handler(RequestValidationError, request_validation_handler)

    async def models(self) -> Response:
        card = ModelCard(id=self.model.name,
                         max_model_len=self.model.serving.max_model_len if self.model.serving else None,
                         lineage=self.model.serving.lineage if self.model.serving else None,
                         kernel_plan=self.model.kernel_plan())
        return JSONResponse(dump(ModelList(data=[card], models=[self.model.name])))

    async def retrieve_model(self, model_id: str) -> Response:
        if model_id != self.model.name:
            return error_response(ServingError(404, f"The model '{model_id}' does not exist", param="model",
                                               code="model_not_found"))
        card = ModelCard(id=self.model.name,
                         max_model_len=self.model.serving.max_model_len if self.model.serving else None,
                         lineage=self.model.serving.lineage if self.model.serving else None,
                         kernel_plan=self.model.kernel_plan())
        return JSONResponse(dump(card))

    async def chat(self, request: Request) -> Response:
        return await self._handle(request, "chat", ChatCompletionRequest, self._chat)

    async def completions(self, request: Request) -> Response:
        return await self._handle(request, "completions", CompletionRequest, self._completion)

    async def _handle(
        self, request: Request, endpoint: str, cls: type[BaseModel],
        run: Callable[[Request, Serving, Any, Callable[[int], None]], Awaitable[Response]],
    ) -> Response:
        metrics = self.model.metrics
        started = time.monotonic()
        metrics.request_started()
        finished = False

        def finish(status: int) -> None:
            nonlocal finished
            if not finished:
                finished = True
                metrics.request_finished(endpoint, status, time.monotonic() - started)

        try:
            serving = self.model._serving()
            req = await read_request(request, self.model, lambda raw: validate(cls, decode_json(raw)))
            cached = await lookup_response(self.model.response_cache, endpoint, req, request.headers, serving,
                                           self.model.pool)
            response = cached.hit or await run(request, serving, req, finish)
            await cached.finish(response)  # labels it (x-distillery-cache); stores a complete deterministic answer
            if not isinstance(response, StreamingResponse):
                finish(response.status_code)
            return response
        except ServingError as exc:
            record_error(metrics, exc)
            finish(exc.status)
            return error_response(exc)
        except Exception:
            log.exception("unexpected error", extra={"endpoint": endpoint})
            metrics.error("server_error")
            finish(500)
            return error_response(ServingError(500, "Internal server error.", type="server_error"))

    async def _complete(self, request: Request, serving: Serving, group: JobGroup) -> tuple[list[Output], Usage]:
        async with abort_on_disconnect(request, serving, group.jobs):
            return await serving.complete_group(group)

    def _check_fanout(self, group: JobGroup) -> None:
        limit = self.model.max_instances
        if len(group.jobs) > limit:
            raise invalid(f"this request needs {len(group.jobs)} generations (prompts x n, or best_of), but this server "
                          f"holds at most {limit} requests at once (max_batch_size + max_queue); send fewer",
                          param="n")

    async def _chat(self, request: Request, serving: Serving, req: ChatCompletionRequest,
                    finish: Callable[[int], None]) -> Response:
        group = await self.model.pool.run(serving.plan_chat, req)
        self._check_fanout(group)
        if req.stream:
            return await self._stream(request, serving, group, finish, req.include_usage(), req.continuous_usage(),
                                      chat=True)
        outs, usage = await self._complete(request, serving, group)
        k = group.top_logprobs
        body = ChatCompletionResponse(
            id=group.request_id, model=serving.model_name, usage=usage,
            choices=[ChatChoice(index=o.index,
                                message=ChatResponseMessage(content=o.content, reasoning_content=o.reasoning),
                                finish_reason=o.finish_reason,
                                logprobs=serving.chat_logprobs(o.logprobs or [], k) if k is not None else None)
                     for o in outs],
        )
        return JSONResponse(dump(body))

    async def _completion(self, request: Request, serving: Serving, req: CompletionRequest,
                          finish: Callable[[int], None]) -> Response:
        group = await self.model.pool.run(serving.plan_completion, req)
        self._check_fanout(group)
        if req.stream:
            return await self._stream(request, serving, group, finish, req.include_usage(), req.continuous_usage(),
                                      chat=False)
        outs, usage = await self._complete(request, serving, group)
        k = group.top_logprobs
        body = CompletionResponse(
            id=group.request_id, model=serving.model_name, usage=usage,
            choices=[CompletionChoice(index=o.index, text=o.content or "", finish_reason=o.finish_reason,
                                      logprobs=serving.completion_logprobs(o.logprobs or [], k)[0] if k is not None
                                      else None)
                     for o in outs],
        )
        return JSONResponse(dump(body))

    async def _stream(self, request: Request, serving: Serving, group: JobGroup, finish: Callable[[int], None],
                      include_usage: bool, continuous_usage: bool, *, chat: bool) -> Response:
        deltas = serving.stream_group(group)
        # The first delta arrives once the engine took every request: a full queue is still an HTTP 429.
        try:
            first = await deltas.__anext__()
        except BaseException:
            await deltas.aclose()
            raise
        k = group.top_logprobs
        text_offset: dict[int, int] = {}  # completions: each choice's text_offset so far
        generated: dict[int, int] = {}  # tokens of each choice so far

        def usage_so_far() -> Usage:
            done = sum(generated.values())
            return Usage(prompt_tokens=group.prompt_tokens, completion_tokens=done,
                         total_tokens=group.prompt_tokens + done)

        def chunk(index: int, delta: Delta | None) -> dict[str, Any]:
            body: ChatCompletionChunk | CompletionResponse
            if chat:
                if delta is None:  # the role comes first, once per choice
                    choice = ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""))
                else:
                    choice = ChatChunkChoice(
                        index=index, finish_reason=delta.finish_reason,
                        delta=ChatDelta(content=delta.content or None, reasoning_content=delta.reasoning or None),
                        logprobs=serving.chat_logprobs(delta.logprobs, k) if k is not None else None)
                body = ChatCompletionChunk(id=group.request_id, model=serving.model_name, choices=[choice])
            else:
                assert delta is not None
                logprobs = None
                if k is not None:
                    logprobs, text_offset[index] = serving.completion_logprobs(delta.logprobs, k,
                                                                               text_offset.get(index, 0))
                body = CompletionResponse(id=group.request_id, model=serving.model_name, choices=[CompletionChoice(
                    index=index, text=delta.content, finish_reason=delta.finish_reason, logprobs=logprobs)])
            if continuous_usage:
                body.usage = usage_so_far()
            return dump(body)

        async def events() -> AsyncIterator[str]:
            status = 499  # until the answer is complete: a stream closed early is the client's leaving
            try:
                async with abort_on_disconnect(request, serving, group.jobs):
                    if chat:
                        for job in group.jobs:
                            yield _sse(chunk(job.index, None))
                    finished = 0
                    item: tuple[int, Delta] | None = first
                    while item is not None:
                        index, delta = item
                        generated[index] = delta.completion_tokens
                        if delta.content or delta.reasoning or delta.finish_reason or delta.logprobs:
                            yield _sse(chunk(index, delta))
                        if delta.finish_reason is not None:
                            finished += 1
                            if finished == len(group.jobs):
                                break
                        item = await anext(deltas, None)
                    if include_usage:
                        cls = ChatCompletionChunk if chat else CompletionResponse
                        yield _sse(dump(cls(id=group.request_id, model=serving.model_name, choices=[],
                                            usage=usage_so_far())))
                    status = 200
                    yield _sse("[DONE]")
            except ServingError as exc:
                status = exc.status
                record_error(self.model.metrics, exc)
                yield _sse(exc.body())
                yield _sse("[DONE]")
            finally:
                await deltas.aclose()
                finish(status)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
