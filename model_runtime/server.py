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
- KServeRoutes: V1 predict, V2 infer (JSON and binary tensors), the health and readiness probes and
  vLLM's `GET /health`, also added before KServe's own, so every route decodes its body through
  request_decoding (size limit, strict UTF-8, depth, tensor checks) and answers a bad request with
  a 4xx in KServe's `{"error": ...}` shape. The model repository's load/unload routes answer 403
  unless enabled (`--enable_model_repository_routes`): unauthenticated, they take the model away.
- Templating and tokenization run in a worker pool, never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import kserve
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from kserve import model_server
from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING
from kserve.protocol.grpc.server import GRPCServer
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse
from kserve.protocol.rest.server import RESTServer
from pydantic import BaseModel
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response, StreamingResponse

from model_runtime.http_timeouts import timed_protocol
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
    Usage,
    V1Request,
    V1Response,
    dump,
)
from model_runtime.request_decoding import (
    DEFAULT_MAX_BODY_BYTES,
    OFFLOAD_BYTES,
    V2_HEADER_LENGTH,
    BodyLimitMiddleware,
    BodyTooLarge,
    V2Prompts,
    check_decoded,
    decode_json,
    decode_v1,
    decode_v2_binary,
    decode_v2_json,
    error_body,
    too_large,
    v2_prompts_from_dict,
    validate,
)
from model_runtime.response_cache import ResponseCacheConfig, create_response_cache, lookup_response
from model_runtime.serving import (
    Delta,
    Job,
    JobGroup,
    Output,
    Serving,
    ServingConfig,
    ServingError,
    gather_or_cancel,
    invalid,
)
from model_runtime.worker_pool import WorkerPool

log = logging.getLogger("model_runtime.server")

OPENAI_PREFIXES = ("/openai/v1", "/v1")


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
    max_num_batched_tokens: int | None = None  # tokens per engine step; None: engine.DEFAULT_MAX_NUM_BATCHED_TOKENS
    request_timeout_s: float | None = 600.0
    default_temperature: float | None = None
    default_top_p: float | None = None
    default_top_k: int | None = None  # None: the model's generation_config, else off
    default_repetition_penalty: float | None = None  # None: the model's generation_config, else 1.0
    default_max_tokens: int | None = None
    think_prefix: bool = False
    separate_reasoning: bool = False
    log_prompts: bool = False
    allow_pickle: bool = False
    trust_remote_code: bool = False
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # every route: a larger body is a 413
    max_prompt_bytes: int | None = None  # None: 32 bytes per token of context, at least 64 KiB
    header_timeout_s: float = 10.0  # a client must send its request headers within this
    body_timeout_s: float = 60.0  # ... and its body within this after the headers
    enable_model_repository_routes: bool = False  # KServe's unauthenticated load/unload
    allow_special_tokens_in_content: bool = False  # trusted clients: control tokens in message text count
    request_workers: int = 2  # threads for templating, tokenization and large-body decoding
    kernel_backend: str | None = None  # plan.KERNEL_CHOICES; None: DISTILLERY_CPU_KERNELS or auto
    compile: bool | None = None  # torch.compile the decode step; None: on for CUDA, DISTILLERY_COMPILE
    gpu_memory_utilization: float = 0.9  # CUDA: the KV cache's share of GPU memory (vLLM's flag)
    response_cache: ResponseCacheConfig = ResponseCacheConfig()  # off unless max_entries > 0
    enable_prefix_caching: bool = True  # reuse the KV of cached prompt prefixes (prefix_cache.py)
    prefix_cache_bytes: int | None = None  # the prefix cache's pool; None: the engine's default


class DistilleryModel(kserve.Model):  # type: ignore[misc]  # kserve ships no type information (no py.typed)
    """One served model. `self.generator` is the engine (kserve.Model already uses `self.engine`)."""

    def __init__(self, options: RuntimeOptions, metrics: RuntimeMetrics | None = None) -> None:
        super().__init__(options.model_name)
        self.options = options
        self.metrics = metrics or RuntimeMetrics(options.model_name)
        self.serving: Serving | None = None
        self.generator: Any = None
        self.pool = WorkerPool(options.request_workers)
        self.response_cache = create_response_cache(options.response_cache, self.metrics)

    def load(self) -> bool:
        from model_runtime.engine import DEFAULT_MAX_NUM_BATCHED_TOKENS, Engine, EngineConfig
        from model_runtime.loader import load_model

        o = self.options
        started = time.monotonic()
        loaded = load_model(
            o.model_dir, quantization=o.quantization, group_size=o.group_size, prequantized=o.prequantized,
            dtype=o.dtype, device=o.device, max_model_len=o.max_model_len, allow_pickle=o.allow_pickle,
            trust_remote_code=o.trust_remote_code, model_format=o.model_format, kernels=o.kernel_backend,
            compile=o.compile,
        )
        engine = Engine(
            loaded,
            EngineConfig(
                max_batch_size=o.max_batch_size, max_queue=o.max_queue, max_model_len=loaded.max_model_len,
                request_timeout_s=o.request_timeout_s, gpu_memory_utilization=o.gpu_memory_utilization,
                max_num_batched_tokens=o.max_num_batched_tokens or DEFAULT_MAX_NUM_BATCHED_TOKENS,
                enable_prefix_caching=o.enable_prefix_caching, prefix_cache_bytes=o.prefix_cache_bytes,
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

    def kernel_plan(self) -> dict[str, Any] | None:
        """The loaded model's KernelPlan (device, dtypes, backends) for /v1/models; None before loading."""
        plan = getattr(getattr(self.generator, "loaded", None), "plan", None)
        if plan is None:
            return None
        described: dict[str, Any] = plan.describe()
        return described

    def attach(self, loaded: Any, engine: Any) -> None:
        """Serve `loaded` through a started `engine` (load() uses it; tests may call it directly)."""
        o = self.options
        self.generator = engine
        self.serving = Serving(
            loaded, engine,
            ServingConfig(
                model_name=self.name, default_temperature=o.default_temperature, default_top_p=o.default_top_p,
                default_top_k=o.default_top_k, default_repetition_penalty=o.default_repetition_penalty,
                default_max_tokens=o.default_max_tokens, think_prefix=o.think_prefix,
                separate_reasoning=o.separate_reasoning, log_prompts=o.log_prompts,
                max_prompt_bytes=o.max_prompt_bytes,
                allow_special_tokens_in_content=o.allow_special_tokens_in_content,
            ),
            self.metrics,
        )
        self.ready = True

    def stop(self) -> None:
        self.ready = False
        if self.generator is not None:
            self.generator.stop()
            self.generator = None

    @property
    def max_instances(self) -> int:
        """Requests the engine can ever hold at once: one V1/V2 request with more prompts never fits."""
        return self.options.max_batch_size + self.options.max_queue

    # ---- KServe V1 / V2 (the HTTP routes are KServeRoutes'; this is KServe's dataplane path, e.g. gRPC)
    async def predict(self, payload: Any, headers: dict[str, str] | None = None,
                      response_headers: dict[str, str] | None = None) -> Any:
        serving = self._serving()
        if isinstance(payload, InferRequest):
            decoded = v2_prompts_from_dict(_infer_request_dict(payload), self.max_instances)
            texts = await self.generate(serving, decoded.prompts, decoded.parameters)
            output = InferOutput(name="text_output", shape=[len(texts)], datatype="BYTES", data=list(texts))
            return InferResponse(response_id=payload.id or new_request_id(), model_name=self.name,
                                 infer_outputs=[output])
        if isinstance(payload, str):
            raw = payload.encode("utf-8", "surrogatepass")  # a lone surrogate then fails strict decoding: 400
        elif isinstance(payload, bytes):
            raw = payload
        else:
            raw = json.dumps(payload, ensure_ascii=False).encode("utf-8", "surrogatepass")
        req = decode_v1(raw, self.max_instances)
        return V1Response(predictions=await self.v1_texts(serving, req)).model_dump()

    async def v1_texts(self, serving: Serving, req: V1Request) -> list[str]:
        prompts: list[tuple[str, GenerationParameters, str]] = []
        for i, inst in enumerate(req.instances):
            if isinstance(inst, str):
                prompts.append((inst, req.parameters, f"instances.{i}"))
            else:
                prompts.append((inst.prompt, inst, f"instances.{i}"))
        jobs = []
        for prompt, params, where in prompts:
            try:
                jobs.append(await self.pool.run(serving.prepare_text, prompt, params))
            except ServingError as exc:
                exc.param = f"{where}.{exc.param or 'prompt'}"
                raise
        return list(await gather_or_cancel([self._text(serving, job) for job in jobs]))

    async def generate(self, serving: Serving, prompts: list[str], params: GenerationParameters) -> list[str]:
        jobs = [await self.pool.run(serving.prepare_text, text, params) for text in prompts]
        return list(await gather_or_cancel([self._text(serving, job) for job in jobs]))

    @staticmethod
    async def _text(serving: Serving, job: Job) -> str:
        out = await serving.complete(job)
        return out.content or ""

    def _serving(self) -> Serving:
        if not self.ready or self.serving is None:
            raise ServingError(503, f"The model '{self.name}' is not ready yet (loading weights).",
                               type="service_unavailable", code="model_not_ready", headers={"Retry-After": "5"})
        return self.serving


def new_request_id() -> str:
    return f"gen-{uuid.uuid4().hex}"


def _infer_request_dict(request: InferRequest) -> dict[str, Any]:
    """A dataplane InferRequest back into the V2 JSON shape, for the one V2 decoder."""
    inputs = []
    for tensor in request.inputs or []:
        data = list(tensor.data) if tensor.data is not None else []
        try:
            data = [d.decode("utf-8") if isinstance(d, bytes) else d for d in data]
        except UnicodeDecodeError as exc:
            raise invalid("inputs.0: a BYTES element is not valid UTF-8", param="inputs.0") from exc
        inputs.append({"name": tensor.name, "shape": list(tensor.shape), "datatype": tensor.datatype, "data": data})
    body = {"id": request.id, "inputs": inputs, "parameters": _plain_parameters(request.parameters)}
    check_decoded(body)
    return body


def _plain_parameters(parameters: Any) -> dict[str, Any]:
    if not parameters:
        return {}
    out = {}
    for key, value in dict(parameters).items():
        if hasattr(value, "WhichOneof"):  # gRPC InferParameter
            value = getattr(value, value.WhichOneof("parameter_choice"))
        out[key] = value
    return out


def error_response(exc: ServingError, path: str = "/v1/completions") -> JSONResponse:
    """The error in the route's protocol shape (OpenAI's object, or KServe's {"error": ...})."""
    return JSONResponse(error_body(exc, path), status_code=exc.status, headers=exc.headers)


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


def document_request_bodies(app: FastAPI, models: Sequence[type[BaseModel]]) -> None:
    """Put the request models' JSON schemas into the app's OpenAPI components, where the routes'
    `openapi_extra` request bodies point: the routes read raw bodies (request_decoding) so FastAPI
    cannot derive them."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for cls in models:
                described = cls.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(described.pop("$defs", {}))
                components[cls.__name__] = described
        document: dict[str, Any] = app.openapi_schema or {}
        return document

    app.openapi = openapi  # type: ignore[method-assign]


def _request_body(cls: type[BaseModel]) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{cls.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


class OpenAIRoutes:
    """The OpenAI-compatible endpoints, bound to one DistilleryModel."""

    def __init__(self, model: DistilleryModel) -> None:
        self.model = model

    def register(self, app: FastAPI, prefixes: tuple[str, ...] = OPENAI_PREFIXES) -> None:
        for prefix in prefixes:
            app.add_api_route(f"{prefix}/chat/completions", self.chat, methods=["POST"], response_model=None,
                              openapi_extra=_request_body(ChatCompletionRequest),
                              responses={200: {"model": ChatCompletionResponse}})
            app.add_api_route(f"{prefix}/completions", self.completions, methods=["POST"], response_model=None,
                              openapi_extra=_request_body(CompletionRequest),
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


T = TypeVar("T")


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


class KServeRoutes:
    """KServe V1/V2 inference, the probes and `GET /health`, bound to one DistilleryModel."""

    def __init__(self, model: DistilleryModel) -> None:
        self.model = model

    def register(self, app: FastAPI) -> None:
        app.add_api_route("/v1/models/{model_name}:predict", self.v1_predict, methods=["POST"], response_model=None)
        for path in ("/v2/models/{model_name}/infer", "/v2/models/{model_name}/versions/{model_version}/infer"):
            app.add_api_route(path, self.v2_infer, methods=["POST"], response_model=None)
        app.add_api_route("/health", self.health, methods=["GET"], response_model=None)
        app.add_api_route("/v2/health/ready", self.server_ready, methods=["GET"], response_model=None)
        for path in ("/v1/models/{model_name}", "/v2/models/{model_name}/ready"):
            app.add_api_route(path, self.model_ready, methods=["GET"], response_model=None)
        if not self.model.options.enable_model_repository_routes:
            for action in ("load", "unload"):
                app.add_api_route(f"/v2/repository/models/{{model_name}}/{action}", self.repository_disabled,
                                  methods=["POST"], response_model=None)

    async def health(self) -> Response:
        """vLLM's probe path (load tools such as guidellm wait for it): 200 while the server is up."""
        return Response(status_code=200)

    async def server_ready(self) -> Response:
        ready = bool(self.model.ready)
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    async def model_ready(self, model_name: str) -> Response:
        """Readiness follows the model: false whenever it is not loaded (so Kubernetes takes the pod out)."""
        if model_name != self.model.name:
            return JSONResponse({"error": f"Model with name {model_name} does not exist."}, status_code=404)
        if not self.model.ready or self.model.serving is None:
            return JSONResponse({"error": f"Model with name {model_name} is not ready."}, status_code=503)
        return JSONResponse({"name": model_name, "ready": True})

    async def repository_disabled(self, model_name: str) -> Response:
        return JSONResponse({"error": "the model repository's load/unload routes are disabled on this server "
                                      "(start it with --enable_model_repository_routes to allow them)"},
                            status_code=403)

    async def v1_predict(self, model_name: str, request: Request) -> Response:
        model = self.model

        def decode(raw: bytes) -> V1Request:
            return decode_v1(raw, model.max_instances)

        async def run(serving: Serving, req: V1Request) -> dict[str, Any]:
            return V1Response(predictions=await model.v1_texts(serving, req)).model_dump()

        return await self._handle(request, "v1_predict", model_name, decode, run)

    async def v2_infer(self, model_name: str, request: Request, model_version: str | None = None) -> Response:
        model = self.model
        header = request.headers.get(V2_HEADER_LENGTH)

        def decode(raw: bytes) -> V2Prompts:
            if header is not None:
                return decode_v2_binary(raw, header, model.max_instances)
            return decode_v2_json(raw, model.max_instances)

        async def run(serving: Serving, req: V2Prompts) -> dict[str, Any]:
            texts = await model.generate(serving, req.prompts, req.parameters)
            return {"model_name": model.name, "id": req.id or new_request_id(),
                    "outputs": [{"name": "text_output", "shape": [len(texts)], "datatype": "BYTES", "data": texts}]}

        return await self._handle(request, "v2_infer", model_name, decode, run)

    async def _handle(self, request: Request, endpoint: str, model_name: str, decode: Callable[[bytes], T],
                      run: Callable[[Serving, T], Awaitable[dict[str, Any]]]) -> Response:
        metrics = self.model.metrics
        started = time.monotonic()
        metrics.request_started()
        status = 499  # unless it ends otherwise: cancelled with its client
        try:
            if model_name != self.model.name:
                raise ServingError(404, f"Model with name {model_name} does not exist.", code="model_not_found")
            serving = self.model._serving()
            req = await read_request(request, self.model, decode)
            body = await until_disconnect(request, run(serving, req))
            status = 200
            return JSONResponse(body)
        except ServingError as exc:
            record_error(metrics, exc)
            status = exc.status
            return error_response(exc, request.url.path)
        except Exception:
            log.exception("unexpected error", extra={"endpoint": endpoint})
            metrics.error("server_error")
            status = 500
            return JSONResponse({"error": "Internal server error."}, status_code=500)
        finally:
            metrics.request_finished(endpoint, status, time.monotonic() - started)


def add_openai_routes(app: FastAPI, model: DistilleryModel) -> OpenAIRoutes:
    """All of the runtime's routes (OpenAI, KServe V1/V2, probes) and the body limit, on `app`."""
    routes = OpenAIRoutes(model)
    routes.register(app)
    KServeRoutes(model).register(app)
    app.add_middleware(BodyLimitMiddleware, limit=model.options.max_body_bytes)
    return routes


add_routes = add_openai_routes


class RuntimeModelServer(model_server.ModelServer):  # type: ignore[misc]  # kserve: untyped (no py.typed)
    """KServe's ModelServer, single-process, listening on a chosen host.

    KServe binds 0.0.0.0 unconditionally; in a pod that is right (the default here too), but tests
    and the demo bind 127.0.0.1. Otherwise this is ModelServer.start() for one worker.
    """

    def __init__(self, *, http_host: str = "0.0.0.0", header_timeout_s: float = 10.0, body_timeout_s: float = 60.0,
                 **kwargs: Any) -> None:
        kwargs["workers"] = 1  # the model and its engine live in this process
        super().__init__(**kwargs)
        self.http_host = http_host
        self.header_timeout_s = header_timeout_s
        self.body_timeout_s = body_timeout_s

    def start(self, models: list[Any]) -> None:
        self._register_and_check_atleast_one_model_is_ready(models)
        self._rest_server = RESTServer(
            FASTAPI_APP_IMPORT_STRING, self.dataplane, self.model_repository_extension, self.http_port,
            access_log_format=self.access_log_format, workers=1, grace_period=self.grace_period,
            event_loop=self.event_loop, timeout_keep_alive=self.timeout_keep_alive,
            ssl_certfile=self.ssl_certfile, ssl_keyfile=self.ssl_keyfile,
        )
        self._rest_server.config.host = self.http_host
        self._rest_server.config.http = timed_protocol(self.header_timeout_s, self.body_timeout_s)
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
