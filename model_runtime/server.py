"""The runtime's model server on KServe's ModelServer: what runs the model, and which routes serve it.

- RuntimeOptions: what the CLI flags configure (__main__.py), one object validated at start-up.
- DistilleryModel (a kserve.Model): load() loads the weights (loader.load_model), starts the
  engine's thread, warms the path up and sets ready; predict() serves KServe V1 (`instances` of text)
  and V2 (a BYTES tensor of text) on KServe's dataplane (e.g. gRPC) through the same Serving path as
  the HTTP routes.
- add_openai_routes(): every HTTP route on the ModelServer's FastAPI app, before KServe's own: the
  OpenAI ones (openai_routes.py), the KServe V1/V2 ones and the probes (kserve_routes.py), and the
  body size limit (request_decoding.BodyLimitMiddleware).
- RuntimeModelServer: KServe's ModelServer, single-process, on a chosen host, with header/body timeouts.
Templating and tokenization run in a worker pool, never on the event loop.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import kserve
from fastapi import FastAPI
from kserve import model_server
from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING
from kserve.protocol.grpc.server import GRPCServer
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse
from kserve.protocol.rest.server import RESTServer

from model_runtime.errors import ServingError
from model_runtime.fanout import gather_or_cancel
from model_runtime.http_timeouts import timed_protocol
from model_runtime.jobs import Job
from model_runtime.kserve_routes import KServeRoutes, infer_request_dict, new_request_id
from model_runtime.metrics import RuntimeMetrics
from model_runtime.openai_routes import OpenAIRoutes
from model_runtime.protocol import GenerationParameters, V1Request, V1Response
from model_runtime.request_decoding import (
    DEFAULT_MAX_BODY_BYTES,
    BodyLimitMiddleware,
    decode_v1,
    v2_prompts_from_dict,
)
from model_runtime.response_cache import ResponseCacheConfig, create_response_cache
from model_runtime.serving import Serving, ServingConfig
from model_runtime.worker_pool import WorkerPool

log = logging.getLogger("model_runtime.server")


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
    long_prefill_token_threshold: int | None = None  # None: engine.DEFAULT_LONG_PREFILL_TOKEN_THRESHOLD
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
        from model_runtime.engine import (
            DEFAULT_LONG_PREFILL_TOKEN_THRESHOLD,
            DEFAULT_MAX_NUM_BATCHED_TOKENS,
            Engine,
            EngineConfig,
        )
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
                long_prefill_token_threshold=(DEFAULT_LONG_PREFILL_TOKEN_THRESHOLD if o.long_prefill_token_threshold
                                              is None else o.long_prefill_token_threshold),
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
        # what load and warm-up left (model modules, tokenizer, the app: ~330,000 tracked objects once the 0.5B is
        # loaded) out of the cyclic collector's full passes, which otherwise traverse them all every ~70,000
        # allocations, on the engine thread mid-step (a prompt chunk's forward allocates hundreds of tensors): 0.5B
        # int8, a 7 + 57-row step alternating frozen / not in one process, mean 122.6 -> 120.8 ms
        gc.freeze()
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
            decoded = v2_prompts_from_dict(infer_request_dict(payload), self.max_instances)
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
