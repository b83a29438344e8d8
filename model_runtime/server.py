"""The HTTP face of the runtime on KServe's ModelServer.

- DistilleryModel (a kserve.Model): load() loads the weights (loader.load_model), starts the
  engine's thread and sets ready; predict() serves KServe V1 (`instances` of text) and V2 (a BYTES
  tensor of text) through the same Serving path as the OpenAI routes.
- add_openai_routes(): /openai/v1/{chat/completions,completions,models} and the same under /v1/,
  added to the ModelServer's FastAPI app *before* KServe registers its own routes, so our
  GET /v1/models (OpenAI list + KServe's {"models": [...]}) answers both kinds of client, while
  /v1/models/{name} (readiness) and /v1/models/{name}:predict stay KServe's.
  Bodies are parsed here (not by FastAPI) so every malformed or invalid request is a 400 with an
  OpenAI error body; a full engine queue is a 429 with Retry-After; a client that disconnects
  aborts its engine request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import kserve
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from kserve import model_server
from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING
from kserve.protocol.grpc.server import GRPCServer
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse
from kserve.protocol.rest.server import RESTServer
from pydantic import BaseModel, ValidationError
from starlette.responses import JSONResponse, Response, StreamingResponse

from model_runtime.metrics import RuntimeMetrics
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
    GenerationParameters,
    ModelCard,
    ModelList,
    V1Request,
    V1Response,
    V2Request,
    dump,
    validation_error_param,
)
from model_runtime.serving import Delta, Job, Serving, ServingConfig, ServingError, invalid

log = logging.getLogger("model_runtime.server")

OPENAI_PREFIXES = ("/openai/v1", "/v1")
MAX_BODY_BYTES = 16 * 2**20  # far beyond any context window; bounds the tokenizer's work per request


@dataclass
class RuntimeOptions:
    """What the CLI flags configure (see __main__.py); one object, validated at start-up."""

    model_name: str
    model_dir: str
    model_format: str = "auto"
    quantization: str = "none"
    group_size: int = 128
    prequantized: bool | None = None
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    max_batch_size: int = 8
    max_queue: int = 32
    request_timeout_s: float | None = 600.0
    default_temperature: float | None = None
    default_top_p: float | None = None
    default_max_tokens: int | None = None
    think_prefix: bool = False
    separate_reasoning: bool = False
    log_prompts: bool = False
    allow_pickle: bool = False
    trust_remote_code: bool = False


class DistilleryModel(kserve.Model):
    """One served model. `self.generator` is the engine (kserve.Model already uses `self.engine`)."""

    def __init__(self, options: RuntimeOptions, metrics: RuntimeMetrics | None = None) -> None:
        super().__init__(options.model_name)
        self.options = options
        self.metrics = metrics or RuntimeMetrics(options.model_name)
        self.serving: Serving | None = None
        self.generator: Any = None

    def load(self) -> bool:
        from model_runtime.engine import Engine, EngineConfig
        from model_runtime.loader import load_model

        o = self.options
        started = time.monotonic()
        loaded = load_model(
            o.model_dir, quantization=o.quantization, group_size=o.group_size, prequantized=o.prequantized,
            dtype=o.dtype, device=o.device, max_model_len=o.max_model_len, allow_pickle=o.allow_pickle,
            trust_remote_code=o.trust_remote_code,
        )
        engine = Engine(
            loaded,
            EngineConfig(
                max_batch_size=o.max_batch_size, max_queue=o.max_queue, max_model_len=loaded.max_model_len,
                request_timeout_s=o.request_timeout_s,
            ),
            metrics=self.metrics,
        )
        engine.start()
        self.attach(loaded, engine)
        # Not asyncio.run(): it unsets the main thread's event loop, which KServe's start() then asks for.
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._warmup())
        finally:
            loop.close()
        log.info("model loaded", extra={"model_name": self.name, "quantization": loaded.quantization,
                                        "device": str(loaded.device), "max_model_len": loaded.max_model_len,
                                        "load_s": round(time.monotonic() - started, 2)})
        return self.ready

    async def _warmup(self) -> None:
        """One greedy token through the whole path (chat template, engine, detokenizer) before the
        model reports ready: first-use costs land in the load, not in the first user's TTFT, and a
        checkpoint that cannot generate fails the start-up instead of every request."""
        assert self.serving is not None
        serving, metrics = self.serving, self.serving.metrics
        serving.metrics = None  # not a user request: keep it out of the request metrics
        try:
            await serving.complete(serving.prepare_text("Hello", GenerationParameters(max_tokens=1, temperature=0,
                                                                                      chat=True)))
        finally:
            serving.metrics = metrics

    def attach(self, loaded: Any, engine: Any) -> None:
        """Serve `loaded` through a started `engine` (load() uses it; tests may call it directly)."""
        o = self.options
        self.generator = engine
        self.serving = Serving(
            loaded, engine,
            ServingConfig(
                model_name=self.name, default_temperature=o.default_temperature, default_top_p=o.default_top_p,
                default_max_tokens=o.default_max_tokens, think_prefix=o.think_prefix,
                separate_reasoning=o.separate_reasoning, log_prompts=o.log_prompts,
            ),
            self.metrics,
        )
        self.ready = True

    def stop(self) -> None:
        self.ready = False
        if self.generator is not None:
            self.generator.stop()
            self.generator = None

    # ---- KServe V1 / V2
    async def predict(self, payload: Any, headers: dict[str, str] | None = None,
                      response_headers: dict[str, str] | None = None) -> Any:
        serving = self._serving()
        if isinstance(payload, InferRequest):
            return await self._infer_v2(serving, payload)
        if isinstance(payload, bytes | str):
            try:
                payload = json.loads(payload)
            except ValueError as exc:
                raise invalid("request body is not valid JSON") from exc
        req = _validate(V1Request, payload)
        jobs = []
        for i, inst in enumerate(req.instances):
            params = req.parameters if isinstance(inst, str) else inst
            prompt = inst if isinstance(inst, str) else inst.prompt
            try:
                jobs.append(serving.prepare_text(prompt, params))
            except ServingError as exc:
                exc.param = f"instances.{i}.{exc.param or 'prompt'}"
                raise
        texts = await _gather_or_cancel([self._text(serving, job) for job in jobs])
        return V1Response(predictions=list(texts)).model_dump()

    async def _infer_v2(self, serving: Serving, request: InferRequest) -> InferResponse:
        tensor = request.inputs[0] if request.inputs else None
        data = list(tensor.data) if tensor is not None and tensor.data is not None else []
        body = {
            "id": request.id,
            "inputs": [{
                "name": tensor.name if tensor else "", "shape": list(tensor.shape) if tensor else [],
                "datatype": tensor.datatype if tensor else "",
                "data": [d.decode() if isinstance(d, bytes) else d for d in data],
            }] if tensor is not None else [],
            "parameters": _plain_parameters(request.parameters),
        }
        req = _validate(V2Request, body)
        jobs = [serving.prepare_text(text, req.parameters) for text in req.inputs[0].data]
        texts = await _gather_or_cancel([self._text(serving, job) for job in jobs])
        output = InferOutput(name="text_output", shape=[len(texts)], datatype="BYTES", data=list(texts))
        return InferResponse(response_id=request.id or jobs[0].request_id, model_name=self.name,
                             infer_outputs=[output])

    @staticmethod
    async def _text(serving: Serving, job: Job) -> str:
        out = await serving.complete(job)
        return out.content or ""

    def _serving(self) -> Serving:
        if not self.ready or self.serving is None:
            raise ServingError(503, f"The model '{self.name}' is not ready yet (loading weights).",
                               type="service_unavailable", code="model_not_ready", headers={"Retry-After": "5"})
        return self.serving


async def _gather_or_cancel(coros: list[Any]) -> list[Any]:
    """asyncio.gather, but one failure (e.g. a 429) cancels the siblings instead of leaving them
    generating for a response nobody will read."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _plain_parameters(parameters: Any) -> dict[str, Any]:
    if not parameters:
        return {}
    out = {}
    for key, value in dict(parameters).items():
        if hasattr(value, "WhichOneof"):  # gRPC InferParameter
            value = getattr(value, value.WhichOneof("parameter_choice"))
        out[key] = value
    return out


def _validate(cls: type[BaseModel], data: Any) -> Any:
    if not isinstance(data, dict):
        raise invalid("request body must be a JSON object")
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        message, param = validation_error_param(exc)
        raise invalid(message, param=param) from exc


def error_response(exc: ServingError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def serving_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServingError)
    return error_response(exc)


async def request_validation_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    loc = ".".join(str(p) for p in (errors[0].get("loc", ()) if errors else ()) if p != "body") or None
    msg = errors[0].get("msg", "invalid request") if errors else "invalid request"
    return error_response(invalid(f"{loc}: {msg}" if loc else msg, param=loc))


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


@contextlib.asynccontextmanager
async def abort_on_disconnect(request: Request, serving: Serving, job: Job) -> AsyncIterator[None]:
    """While the body is open, a client disconnect aborts the job's engine request at once.

    (Without this a non-streaming request would run to max_tokens for nobody, and a stream would
    only notice at its next write.) The request then ends as 499, nginx's "client closed request".
    """
    gone = asyncio.Event()

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                gone.set()
                log.info("client disconnected", extra={"request_id": job.request_id})
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


class OpenAIRoutes:
    """The OpenAI-compatible endpoints, bound to one DistilleryModel."""

    def __init__(self, model: DistilleryModel) -> None:
        self.model = model

    def register(self, app: FastAPI, prefixes: tuple[str, ...] = OPENAI_PREFIXES) -> None:
        for prefix in prefixes:
            app.add_api_route(f"{prefix}/chat/completions", self.chat, methods=["POST"], response_model=None)
            app.add_api_route(f"{prefix}/completions", self.completions, methods=["POST"], response_model=None)
            app.add_api_route(f"{prefix}/models", self.models, methods=["GET"], response_model=None)
        # GET /v1/models/{name} stays KServe's readiness probe; the OpenAI "retrieve model" lives
        # under the /openai prefix only.
        app.add_api_route(f"{OPENAI_PREFIXES[0]}/models/{{model_id}}", self.retrieve_model, methods=["GET"],
                          response_model=None)
        app.add_exception_handler(ServingError, serving_error_handler)
        app.add_exception_handler(RequestValidationError, request_validation_handler)

    async def models(self) -> Response:
        card = ModelCard(id=self.model.name,
                         max_model_len=self.model.serving.max_model_len if self.model.serving else None)
        return JSONResponse(dump(ModelList(data=[card], models=[self.model.name])))

    async def retrieve_model(self, model_id: str) -> Response:
        if model_id != self.model.name:
            return error_response(ServingError(404, f"The model '{model_id}' does not exist", param="model",
                                               code="model_not_found"))
        card = ModelCard(id=self.model.name,
                         max_model_len=self.model.serving.max_model_len if self.model.serving else None)
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
            raw = await request.body()
            if len(raw) > MAX_BODY_BYTES:
                raise ServingError(413, f"request body over {MAX_BODY_BYTES // 2**20} MiB", code="body_too_large")
            try:
                data = json.loads(raw)
            except ValueError as exc:
                raise invalid(f"request body is not valid JSON: {exc}") from exc
            req = _validate(cls, data)
            response = await run(request, serving, req, finish)
            if not isinstance(response, StreamingResponse):
                finish(response.status_code)
            return response
        except ServingError as exc:
            metrics.error(exc.code or exc.type)
            finish(exc.status)
            return error_response(exc)
        except Exception:
            log.exception("unexpected error", extra={"endpoint": endpoint})
            metrics.error("server_error")
            finish(500)
            return error_response(ServingError(500, "Internal server error.", type="server_error"))

    async def _complete(self, request: Request, serving: Serving, job: Job) -> Any:
        async with abort_on_disconnect(request, serving, job):
            return await serving.complete(job)

    async def _chat(self, request: Request, serving: Serving, req: ChatCompletionRequest,
                    finish: Callable[[int], None]) -> Response:
        job = serving.prepare_chat(req)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return await self._stream(request, serving, job, finish, include_usage, chat=True)
        out = await self._complete(request, serving, job)
        body = ChatCompletionResponse(
            id=job.request_id, model=serving.model_name, usage=out.usage,
            choices=[ChatChoice(message=ChatResponseMessage(content=out.content, reasoning_content=out.reasoning),
                                finish_reason=out.finish_reason)],
        )
        return JSONResponse(dump(body))

    async def _completion(self, request: Request, serving: Serving, req: CompletionRequest,
                          finish: Callable[[int], None]) -> Response:
        job = serving.prepare_completion(req)
        echo = req.prompt if req.echo and isinstance(req.prompt, str) else ""
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return await self._stream(request, serving, job, finish, include_usage, chat=False, echo=echo)
        out = await self._complete(request, serving, job)
        body = CompletionResponse(
            id=job.request_id, model=serving.model_name, usage=out.usage,
            choices=[CompletionChoice(text=echo + (out.content or ""), finish_reason=out.finish_reason)],
        )
        return JSONResponse(dump(body))

    async def _stream(self, request: Request, serving: Serving, job: Job, finish: Callable[[int], None],
                      include_usage: bool, *, chat: bool, echo: str = "") -> Response:
        deltas = serving.stream(job)
        # The first delta arrives once the engine took the request: a full queue is still an HTTP 429.
        try:
            first = await deltas.__anext__()
        except BaseException:
            await deltas.aclose()
            raise

        def chunk(delta: Delta | None, role: bool = False) -> dict[str, Any]:
            if chat:
                if role:
                    d = ChatDelta(role="assistant", content="")
                else:
                    d = ChatDelta(content=(delta.content or None) if delta else None,
                                  reasoning_content=(delta.reasoning or None) if delta else None)
                body: BaseModel = ChatCompletionChunk(
                    id=job.request_id, model=serving.model_name,
                    choices=[ChatChunkChoice(delta=d, finish_reason=delta.finish_reason if delta else None)],
                )
            else:
                body = CompletionResponse(
                    id=job.request_id, model=serving.model_name,
                    choices=[CompletionChoice(text=delta.content if delta else "",
                                              finish_reason=delta.finish_reason if delta else None)],
                )
            return dump(body)

        async def events() -> AsyncIterator[str]:
            status = 200
            try:
                async with abort_on_disconnect(request, serving, job):
                    if chat:
                        yield _sse(chunk(None, role=True))
                    elif echo:
                        yield _sse(chunk(Delta(content=echo)))
                    delta: Delta | None = first
                    while delta is not None:
                        if delta.content or delta.reasoning or delta.finish_reason:
                            yield _sse(chunk(delta))
                        if delta.finish_reason is not None:
                            if include_usage and delta.usage is not None:
                                cls = ChatCompletionChunk if chat else CompletionResponse
                                usage_chunk = cls(id=job.request_id, model=serving.model_name, choices=[],
                                                  usage=delta.usage)
                                yield _sse(dump(usage_chunk))
                            break
                        delta = await deltas.__anext__()
                    yield _sse("[DONE]")
            except ServingError as exc:
                status = exc.status
                self.model.metrics.error(exc.code or exc.type)
                yield _sse(exc.body())
                yield _sse("[DONE]")
            finally:
                await deltas.aclose()
                finish(status)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def add_openai_routes(app: FastAPI, model: DistilleryModel) -> OpenAIRoutes:
    routes = OpenAIRoutes(model)
    routes.register(app)
    return routes


class RuntimeModelServer(model_server.ModelServer):
    """KServe's ModelServer, single-process, listening on a chosen host.

    KServe binds 0.0.0.0 unconditionally; in a pod that is right (the default here too), but tests
    and the demo bind 127.0.0.1. Otherwise this is ModelServer.start() for one worker.
    """

    def __init__(self, *, http_host: str = "0.0.0.0", **kwargs: Any) -> None:
        kwargs["workers"] = 1  # the model and its engine live in this process
        super().__init__(**kwargs)
        self.http_host = http_host

    def start(self, models: list[Any]) -> None:
        self._register_and_check_atleast_one_model_is_ready(models)
        self._rest_server = RESTServer(
            FASTAPI_APP_IMPORT_STRING, self.dataplane, self.model_repository_extension, self.http_port,
            access_log_format=self.access_log_format, workers=1, grace_period=self.grace_period,
            event_loop=self.event_loop, timeout_keep_alive=self.timeout_keep_alive,
            ssl_certfile=self.ssl_certfile, ssl_keyfile=self.ssl_keyfile,
        )
        self._rest_server.config.host = self.http_host
        self.servers.append(self._rest_server.start())
        if self.enable_grpc:
            self._grpc_server = GRPCServer(
                self.grpc_port, self.dataplane, self.model_repository_extension,
                kwargs=vars(model_server.args), grace_period=self.grace_period,
            )
            self.servers.append(self._grpc_server.start(self.max_threads))
        self.setup_event_loop()
        self.register_signal_handler()
        asyncio.run(self._serve())
