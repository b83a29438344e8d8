"""Continuous-batching generation engine: one thread owns the model and its KV cache.

Each step of the loop:
1. drop aborted / timed-out requests (their slots are free for this very step);
2. admit waiting requests into free KV-cache slots (caps: max_batch_size, max_tokens_in_flight);
3. spend the step's token budget (max_num_batched_tokens): one token per decoding sequence, the rest on
   prompt chunks of the prefilling requests, oldest first, so a long prompt never stalls the running
   batch for long; with nothing decoding, prompts go prefill_chunk tokens a step each (fast TTFT);
4. run ONE decode forward for every sequence that was decoding at the step's start (each at its own
   position), the step's prompt chunks in it (a chunk that ends its prompt gives that request's first token),
   and sample each row with its own parameters and torch.Generator.
Requests join and leave between steps. A request whose logits are NaN/inf, or whose step raised,
fails alone with finish_reason "error"; the thread itself never dies of a step's exception.

The asyncio side (generate()) only enqueues and awaits events: torch never runs on the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor

from model_runtime.compiled_step import compile_decode_step
from model_runtime.device import configure_threads
from model_runtime.gpu_memory import kv_slot_bytes, size_kv_cache
from model_runtime.model import KVCache
from model_runtime.omp_pool import in_own_thread, name_os_thread
from model_runtime.prefix_cache import DEFAULT_BLOCK_SIZE, DEFAULT_POOL_BYTES, PrefixCache, block_bytes
from model_runtime.sampling import (  # noqa: F401 - SamplingParams and _sample re-exported (their old home)
    PROMPT_LOGPROBS_CHUNK,
    PromptLogprobs,
    RequestSampler,
    SamplingParams,
    TopLogprobs,
    _sample,
    one_thread,
    scan_rows,
    token_logprobs,
)

log = logging.getLogger("model_runtime.engine")

RATE_WINDOW_S = 5.0     # tokens/s: the tokens of the last RATE_WINDOW_S seconds over the time since the first
RATE_MIN_SPAN_S = 0.05  # ... but never over less than this: a burst of a few ms would read as an absurd rate

# EngineConfig.max_num_batched_tokens's default: the budget of a step while sequences decode. Prompt rows riding in a
# decode step (model.forward_ragged) cost ~2.7 ms each on the decode kernels (below prefill.PREFILL_MIN_ROWS rows)
# and ~1.4 ms on the prompt GEMM (from 16 rows on, decode rows included), while the decode rows' share is nearly
# fixed (one read of the weights). Under load with real prompt lengths the budget is the server's prompt intake:
# measured in-process (0.5B int8, 2 vCPUs, 8 closed-loop users, 256-token prompts, 128 outputs) 68 output tok/s at
# 15 (TTFT median 5.5 s: prompts queued behind a 7-10-token intake per step), 79 at 32, 106 at 64, 110 at 128
# (1 user: 39). 64 takes most of that; a larger budget lengthens each step that carries a chunk (64 rows ~130 ms,
# 128 ~230 ms, vs ~35 ms for 8 decode rows) for little more throughput. A step with a chunk is slower than one
# without, uniformly while a long prompt is prefilled (bench itl_long_prefill reports both).
DEFAULT_MAX_NUM_BATCHED_TOKENS = 64
# EngineConfig.long_prefill_token_threshold / long_prefill_step_tokens' defaults (vLLM's long_prefill_token_threshold,
# with the cap separate): while sequences decode, a prompt longer than the threshold takes at most the step tokens per
# step, so a long prompt beside decoding streams makes each of their steps a little slower for longer instead of much
# slower (measured on the server, 0.5B int4, 4 streams beside a 2,000-token prompt, budget 64 and no cap: ITL median
# 34 ms before the prompt, 280 ms while it prefilled, its TTFT 9.6 s). Prompts up to the threshold (chat turns,
# guidellm's 256 tokens) keep the whole budget: under load the budget is the server's prompt intake. The step tokens
# are the cap where the plan's kernels have no row tile (Engine._long_prompt_tokens); with one, the prompt's rows fill it.
DEFAULT_LONG_PREFILL_TOKEN_THRESHOLD = 512
DEFAULT_LONG_PREFILL_STEP_TOKENS = 8
# EngineConfig.prefill_chunk's default: with nothing decoding, a prompt goes 512 tokens a forward: the prompt GEMM
# (prefill.py) is at full speed from ~64 rows, and what every forward pays once (reading the weights; for int4,
# requantizing them) is paid once per 512 tokens: a 2,000-token prompt in 4 forwards.
DEFAULT_PREFILL_CHUNK = 512


@dataclass
class EngineConfig:
    max_batch_size: int = 8
    max_queue: int = 32             # waiting requests beyond this => QueueFullError
    max_model_len: int = 4096
    max_tokens_in_flight: int | None = None
    request_timeout_s: float | None = 600
    # Token budget of a step while sequences decode (vLLM's max_num_batched_tokens): every decoding sequence
    # takes 1, prompt chunks of the prefilling requests (oldest first, several may share a step) take what is
    # left, so a long prompt enters the cache a bounded chunk per step while the others keep getting a token
    # every step. DEFAULT_MAX_NUM_BATCHED_TOKENS says why this value.
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS
    # prompt tokens of ONE request per step at most; with nothing decoding (no inter-token latency to protect)
    # the step's budget is max(max_num_batched_tokens, prefill_chunk): a lone prompt goes in big chunks
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    # while sequences decode, a prompt of more than long_prefill_token_threshold tokens takes at most
    # long_prefill_step_tokens of the budget per step (threshold 0: no cap); DEFAULT_LONG_PREFILL_TOKEN_THRESHOLD says why
    long_prefill_token_threshold: int = DEFAULT_LONG_PREFILL_TOKEN_THRESHOLD
    # None: the plan's (Engine._long_prompt_tokens: what fills the batch kernels' row tile where they have one)
    long_prefill_step_tokens: int | None = None
    # torch.compile the decode step (opt-in: ~20-100 s of compiling at start, three graphs: batch 1,
    # batch >= 2, slots with gaps; measured ~1.3x faster single-stream decode on the 0.5B int8 with
    # PyTorch's kernels). Ignored when the fused CPU kernels run the decode step. None: read the
    # DISTILLERY_COMPILE environment variable ("1"/"true" to enable).
    compile: bool | None = None
    # CUDA: the KV cache may take this fraction of the GPU's total memory minus what is in use after
    # loading (vLLM's flag); fewer slots than max_batch_size fit -> a smaller batch, none -> start-up error
    gpu_memory_utilization: float = 0.9
    # automatic prefix caching (prefix_cache.py): KV blocks of prompt prefixes kept for later requests;
    # prefix_cache_bytes None: prefix_cache.DEFAULT_POOL_BYTES (CUDA: at most what the KV cache's budget
    # leaves over)
    enable_prefix_caching: bool = True
    prefix_cache_bytes: int | None = None
    prefix_cache_block_size: int = DEFAULT_BLOCK_SIZE


@dataclass
class TokenEvent:
    token_id: int | None            # None on the final event when nothing new was produced
    finish_reason: str | None       # None while running; "stop" | "length" | "abort" | "timeout" | "error"
    prompt_tokens: int
    completion_tokens: int
    logprob: float | None = None            # of token_id, when params.logprobs is not None
    top_logprobs: TopLogprobs | None = None  # the params.logprobs most likely (id, logprob), descending
    # on the first event of a request only, when params.prompt_logprobs is not None: per prompt token, its
    # logprob given the tokens before it (None for the first) and the params.prompt_logprobs most likely
    prompt_logprobs: PromptLogprobs | None = None


@dataclass
class EngineStats:
    queue_depth: int = 0
    running: int = 0
    kv_cache_usage: float = 0.0
    tokens_per_s: float = 0.0
    generated_tokens: int = 0
    steps: int = 0
    kv_cache_bytes: int = 0          # KV cache memory holding live tokens
    gpu_memory_bytes: int = 0        # CUDA: memory this process's allocator holds (weights, cache, activations)
    # prefix cache: look-ups / prompt tokens looked up, and those served from cached blocks (cumulative)
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    prefix_cache_query_tokens: int = 0
    prefix_cache_hit_tokens: int = 0
    prefix_cache_blocks: int = 0          # KV blocks cached now
    prefix_cache_capacity_blocks: int = 0  # blocks the pool holds (0: prefix caching is off)

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Prompt tokens served from the prefix cache over prompt tokens looked up."""
        return self.prefix_cache_hit_tokens / self.prefix_cache_query_tokens if self.prefix_cache_query_tokens else 0.0


class QueueFullError(Exception):
    def __init__(self, message: str = "queue full", retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestTimeoutError(Exception):
    pass


class GenerationError(Exception):
    """This request failed (e.g. NaN logits, or a bad prompt); other requests are unaffected."""


class _Request:
    def __init__(self, request_id: str, prompt: list[int], params: SamplingParams, stop_ids: set[int],
                 eos_ids: set[int], deliver: Callable[[TokenEvent], None], deadline: float | None,
                 sampler: RequestSampler) -> None:
        self.id = request_id
        self.prompt = prompt
        self.params = params
        self.stop_ids = stop_ids
        self.eos_ids = eos_ids
        self.deliver = deliver
        self.deadline = deadline
        self.slot: int | None = None
        self.pos = 0                   # tokens already in the KV cache
        self.next_token: int | None = None  # sampled, not yet fed back
        self.generated = 0
        self.done = False
        self.sampler = sampler
        self.generator = sampler.generator
        # filled chunk by chunk during the prefill, sent on the first event
        self.prompt_logprobs: PromptLogprobs | None = [] if params.prompt_logprobs is not None else None

    @property
    def prefilling(self) -> bool:
        return self.pos < len(self.prompt)

    def event(self, token: int | None, reason: str | None, logprob: float | None = None,
              top_logprobs: TopLogprobs | None = None) -> TokenEvent:
        """The next event; the first one after the prefill carries the prompt's log-probabilities."""
        prompt_logprobs = None
        if self.prompt_logprobs is not None and not self.prefilling:
            prompt_logprobs, self.prompt_logprobs = self.prompt_logprobs, None
        return TokenEvent(token, reason, len(self.prompt), self.generated, logprob, top_logprobs, prompt_logprobs)

    def budget(self) -> int:
        return len(self.prompt) + self.params.max_tokens


def _lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """Zeros whose pages are only committed when written (calloc -> fresh zero pages for big sizes),
    so a large reserved KV cache costs memory only for the positions actually used."""
    nbytes_per = torch.empty((), dtype=dtype).element_size()
    np_dtype = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}[nbytes_per]
    return torch.from_numpy(np.zeros(shape, dtype=np_dtype)).view(dtype)


class Engine:
    def __init__(self, loaded: Any, config: EngineConfig, metrics: Any | None = None) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.config = config
        self.metrics = metrics
        self.max_len = min(int(config.max_model_len), int(loaded.max_model_len))
        self.device = self.model.device
        spare_bytes: int | None = None  # CUDA: what the KV cache's budget leaves over (for the prefix cache)
        if self.device.type == "cuda":
            # the KV cache sized from free GPU memory, at start-up (a GpuMemoryError names the numbers)
            free, total = torch.cuda.mem_get_info(self.device)
            budget = size_kv_cache(self.model.config, max_len=self.max_len, max_batch=config.max_batch_size,
                                   dtype=self.model.kv_cache_dtype(), total_bytes=int(total), free_bytes=int(free),
                                   utilization=config.gpu_memory_utilization)
            config = replace(config, max_batch_size=budget.slots)
            self.config = config
            spare_bytes = budget.budget_bytes - budget.slots * budget.slot_bytes
        self._token_bytes = kv_slot_bytes(self.model.config, 1, self.model.kv_cache_dtype())
        self.eos_ids = set(int(e) for e in (loaded.eos_token_ids or []))
        self._lock = threading.Condition()
        self._waiting: collections.deque[_Request] = collections.deque()
        self._running: list[_Request] = []
        self._prefilling: list[_Request] = []  # running requests whose prompt is not all in the cache, oldest first
        self._aborts: set[str] = set()
        self._by_id: dict[str, _Request] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._cache: KVCache | None = None
        self._free_slots: list[int] = list(range(config.max_batch_size))
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._stats = EngineStats()
        self._ids = itertools.count()
        # test hook: called with (logits [B, V], request ids) before sampling; may edit logits in place
        self.logits_hook: Callable[[Tensor, list[str]], None] | None = None
        self.prefix_cache = self._make_prefix_cache(config, spare_bytes)
        plan = getattr(loaded, "plan", None)
        # rows from which a step's linears run on the prompt GEMM (a prompt chunk and the decode rows it rides with);
        # 0: never
        self._gemm_rows = (max(1, int(getattr(plan, "prefill_min_rows", 0) or 0))
                           if getattr(plan, "prefill_kernel", "none") != "none" else 0)
        # prompt tokens a cache hit still computes: at least the last one (its logits give the first token),
        # and as many as make a chunk take the same prefill kernel as a whole prompt (prompt chunks of >=
        # prefill_min_rows rows run on the matrix engine, fewer on the decode kernels; int4 differs between
        # the two), so a prompt's positions come out as a prefill of the whole of it would compute them
        self._prefix_recompute = self._gemm_rows or 1
        self._row_tile = int(getattr(plan, "decode_row_tile", 0) or 0)  # _long_prompt_tokens
        use_compile = config.compile
        if use_compile is None and plan is not None:
            use_compile = plan.compile  # the KernelPlan decided it (flag, environment, device)
        if use_compile is None:
            use_compile = os.environ.get("DISTILLERY_COMPILE", "").lower() in ("1", "true", "yes")
        self._decode_fn: Callable[..., Any] = self.model.forward
        if use_compile and getattr(self.model, "fused_decode", False):
            # the fused CPU decode step already removed the per-op overhead compiling was for, and
            # its C calls cannot be traced (every one would be a graph break)
            log.info("DISTILLERY_COMPILE ignored: the decode step runs on the fused CPU kernels")
            use_compile = False
        self.compiled = bool(use_compile)
        # a step's rows of logits scanned (max, argmax, plain-temperature draws) in one C call: the plan's choice
        self._fused_sampler = getattr(plan, "sampler", "torch") == "dq"
        # CUDA: static shapes per (batch, KV-length bucket), each captured as a CUDA graph (compiled_step.py)
        self.cuda_graphs = self.compiled and self.device.type == "cuda"
        if self.compiled:
            self._decode_fn = compile_decode_step(self.model.forward, self.device, config.max_batch_size)

    def _make_prefix_cache(self, config: EngineConfig, spare_bytes: int | None) -> PrefixCache | None:
        """The block pool of automatic prefix caching, or None when it is off or not one block fits."""
        if not config.enable_prefix_caching:
            return None
        cfg, dtype, bs = self.model.config, self.model.kv_cache_dtype(), config.prefix_cache_block_size
        per_block = block_bytes(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, dtype, bs)
        want = DEFAULT_POOL_BYTES if config.prefix_cache_bytes is None else config.prefix_cache_bytes
        pool_bytes = min(want, spare_bytes) if spare_bytes is not None else want
        blocks = pool_bytes // per_block
        if blocks < 1:
            log.warning("prefix caching off: %d bytes hold no block of %d tokens (%d bytes)", pool_bytes, bs,
                        per_block)
            return None
        log.info("prefix cache: %d blocks of %d tokens (%.0f MiB)", blocks, bs, blocks * per_block / 2**20)
        return PrefixCache(n_layers=cfg.n_layers, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, dtype=dtype,
                           device=self.device, block_size=bs, capacity_blocks=int(blocks))

    def _warm_up(self) -> None:
        """Compile the decode graphs (batch 1 and batch >= 2) before serving, then wipe the cache."""
        assert self._cache is not None
        device = self.model.device
        started = time.monotonic()
        with torch.inference_mode():
            if self.cuda_graphs:
                # batch 1 and 2 at the smallest KV bucket, run thrice (warm-up, recording, replay);
                # other shapes are captured on first use
                for batch in sorted({1, min(2, self.config.max_batch_size)}):
                    ids = torch.zeros((batch, 1), dtype=torch.long, device=device)
                    pos = torch.full((batch, 1), 3, dtype=torch.long, device=device)
                    slot_t = torch.arange(batch, device=device)
                    for _ in range(3):
                        self._decode_fn(ids, pos, self._cache, slot_t, kv_len=kv_bucket(4, self.max_len),
                                        logits="last")
                for t in itertools.chain(self._cache.k, self._cache.v):
                    t[:, :, :4].zero_()
                log.info("captured the decode step's CUDA graphs in %.1f s", time.monotonic() - started)
                return
            shapes: list[Tensor | slice] = [slice(0, 1)]
            if self.config.max_batch_size >= 2:  # contiguous slots, and slots with gaps
                shapes += [slice(0, 2), torch.tensor([0, 1], device=device)]
            for slots in shapes:
                batch = 1 if isinstance(slots, slice) and slots.stop == 1 else 2
                # sizes 0 and 1 get specialised by the compiler: warm up at positions 2..3 so that
                # the graphs taken later (any position) are the dynamic ones compiled here
                ids = torch.zeros((batch, 1), dtype=torch.long, device=device)
                pos = torch.full((batch, 1), 3, dtype=torch.long, device=device)
                self._decode_fn(ids, pos, self._cache, slots, kv_len=4, logits="last")
                self._decode_fn(ids, pos - 1, self._cache, slots, kv_len=3, logits="last")
            for t in itertools.chain(self._cache.k, self._cache.v):
                t[:, :, :4].zero_()
        log.info("compiled the decode step in %.1f s", time.monotonic() - started)

    # ------------------------------------------------------------------ lifecycle
    def _allocate_cache(self) -> KVCache:
        cfg = self.model.config
        dtype = self.model.kv_cache_dtype()
        device = self.model.device
        cache = KVCache.__new__(KVCache)
        shape = (self.config.max_batch_size, cfg.n_kv_heads, self.max_len, cfg.head_dim)
        if device.type == "cpu":
            cache.k = [_lazy_zeros(shape, dtype) for _ in range(cfg.n_layers)]
            cache.v = [_lazy_zeros(shape, dtype) for _ in range(cfg.n_layers)]
        else:
            cache.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
            cache.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        cache.max_batch, cache.max_len = self.config.max_batch_size, self.max_len
        return cache

    def start(self) -> None:
        if self._thread is not None:
            return
        if self.max_len > getattr(self.model, "rope_len", self.max_len):
            self.model.set_rope(self.max_len, self.model.device)
        self._cache = self._allocate_cache()
        if self.cuda_graphs:
            import torch._dynamo as dynamo

            # the cache is written in place inside the captured graphs: fixed addresses, as gpt-fast's
            # module-buffer cache (a mutated input without one makes cudagraphs skip the graph)
            for t in itertools.chain(self._cache.k, self._cache.v):
                dynamo.mark_static_address(t)
        if self.compiled:
            in_own_thread(self._warm_up, "distillery-warm-up")  # no OpenMP pool left behind (omp_pool.py)
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    # ------------------------------------------------------------------ public API
    @property
    def stats(self) -> EngineStats:
        """Live counts (a finished request is gone from `running` before its last event is sent)."""
        s = self._stats
        running = list(self._running)
        capacity = self.config.max_batch_size * self.max_len
        return EngineStats(queue_depth=len(self._waiting), running=len(running),
                           kv_cache_usage=sum(r.pos for r in running) / capacity if capacity else 0.0,
                           tokens_per_s=s.tokens_per_s, generated_tokens=s.generated_tokens, steps=s.steps,
                           **self._prefix_stats())

    def _prefix_stats(self) -> dict[str, int]:
        if self.prefix_cache is None:
            return {}
        p = self.prefix_cache.stats
        return {"prefix_cache_queries": p.queries, "prefix_cache_hits": p.hits,
                "prefix_cache_query_tokens": p.query_tokens, "prefix_cache_hit_tokens": p.hit_tokens,
                "prefix_cache_blocks": p.blocks, "prefix_cache_capacity_blocks": p.capacity}

    def abort(self, request_id: str) -> None:
        with self._lock:
            if request_id in self._by_id:
                self._aborts.add(request_id)
                self._lock.notify_all()

    def _retry_after(self) -> float:
        rate = max(self._stats.tokens_per_s, 1.0)
        pending = sum(r.params.max_tokens - r.generated for r in self._running) + sum(
            r.params.max_tokens for r in self._waiting)
        return float(min(60.0, max(1.0, pending / rate / max(1, self.config.max_batch_size))))

    def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
               deliver: Callable[[TokenEvent], None]) -> None:
        """Thread-safe enqueue; `deliver` is called from the engine thread with each event."""
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise GenerationError("the prompt is empty (at least one token is needed)")
        if len(prompt) >= self.max_len:
            raise GenerationError(f"the prompt has {len(prompt)} tokens; the context is {self.max_len}")
        vocab = self.model.config.vocab_size
        problem = params.problem(vocab)
        if problem is not None:
            raise GenerationError(problem)
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise GenerationError(f"prompt token ids must be in [0, {vocab})")
        timeout = self.config.request_timeout_s
        deadline = time.monotonic() + timeout if timeout else None
        eos_ids = set() if params.ignore_eos else self.eos_ids  # ignore_eos: eos is a token like any other
        stop_ids = set(params.stop_token_ids) | eos_ids
        sampler = RequestSampler(params, prompt, stop_ids, self.device)
        req = _Request(request_id, prompt, params, stop_ids, eos_ids, deliver, deadline, sampler)
        with self._lock:
            if self._stopping or self._thread is None:
                raise GenerationError("the engine is not running")
            # as many waiting requests as there are free batch slots are about to run, not queued: without
            # this, two requests arriving together at an idle batch-1 engine would see the first one still
            # waiting and refuse the second. (When max_tokens_in_flight holds requests back, slots stay
            # free and up to max_queue + free slots wait: the bound is still fixed.)
            queued = len(self._waiting) - len(self._free_slots)
            if queued >= self.config.max_queue:
                raise QueueFullError(f"{queued} requests are waiting for a batch slot (max_queue "
                                     f"{self.config.max_queue})", retry_after_s=self._retry_after())
            if request_id in self._by_id:
                raise GenerationError(f"request id {request_id!r} is already in use")
            self._by_id[request_id] = req
            self._waiting.append(req)
            self._stats.queue_depth = len(self._waiting)
            self._lock.notify_all()

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[TokenEvent]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[TokenEvent] = asyncio.Queue()

        def deliver(event: TokenEvent) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                self.abort(request_id)

        self.submit(prompt_ids, params, request_id, deliver)
        finished = False
        try:
            while True:
                event = await queue.get()
                if event.finish_reason is not None:
                    finished = True
                yield event
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    # ------------------------------------------------------------------ engine thread
    def _loop(self) -> None:
        name_os_thread("engine")
        if self.model.device.type == "cpu":
            configure_threads()  # the loader's choice (its thread has exited: omp_pool.py), on this thread
        with torch.inference_mode():
            while True:
                with self._lock:
                    while not self._stopping and not self._waiting and not self._running:
                        if not self._lock.wait(timeout=1.0) and self._recent:
                            self._update_stats(step=False)  # idle: the tokens/s window drains to 0
                    if self._stopping:
                        break
                try:
                    self._step()
                except Exception:  # noqa: BLE001 - the thread must survive anything a step throws
                    log.exception("engine step failed outside a forward; continuing")
                    time.sleep(0.01)
        for req in list(self._running) + list(self._waiting):
            self._finish(req, None, "abort")
        self._running.clear()
        self._waiting.clear()

    def _step(self) -> None:
        now = time.monotonic()
        with self._lock:
            aborts, self._aborts = self._aborts, set()
            for req in [r for r in self._waiting if r.id in aborts or (r.deadline and now > r.deadline)]:
                self._waiting.remove(req)
                self._finish(req, None, "abort" if req.id in aborts else "timeout")
            admitted = self._admit()
        for req in [r for r in self._running if r.id in aborts or (r.deadline and now > r.deadline)]:
            self._finish(req, None, "abort" if req.id in aborts else "timeout")
        # the sequences decoding at the step's start get their token; one whose prefill completes in this
        # step got its first token from the prefill and decodes from the next step on (the budget holds)
        decoding = [r for r in self._running if not r.prefilling and not r.done]
        self._prefilling = [r for r in self._prefilling + admitted if r.prefilling and not r.done]
        plan = self._prefill_plan(len(decoding))
        # prompt chunks ride in the decode rows' forward (model.forward_ragged): one read of the weights for both
        # instead of a forward each, so a step with a chunk costs a decode step plus the chunk's own compute; a
        # chunk that ends its prompt gets its last row's logits there (its first token). Not a chunk that scores
        # every prompt position (prompt logprobs: all its rows' logits), nor with a compiled decode step.
        riding = [(r, n) for r, n in plan if r.prompt_logprobs is None] if decoding and not self.compiled else []
        for req, tokens in plan:
            if (req, tokens) not in riding:
                self._guarded([req], self._prefill_chunk, req, tokens)
        decoding = [r for r in decoding if not r.done]
        if decoding and riding:
            self._guarded(decoding + [r for r, _ in riding], self._decode_with_chunks, decoding, riding)
        elif decoding:
            self._guarded(decoding, self._decode, decoding)
        self._update_stats()

    def _prefill_plan(self, decoding: int) -> list[tuple[_Request, int]]:
        """(request, prompt tokens) to prefill in this step: the budget left after one token per decoding
        sequence, oldest request first, each at most prefill_chunk; with nothing decoding, the budget is
        max(max_num_batched_tokens, prefill_chunk); while sequences decode, a long prompt (more than
        long_prefill_token_threshold tokens) at most long_prefill_step_tokens. At least one prompt token runs even when
        decoding sequences take the whole budget (max_batch_size above it), so no prompt waits forever."""
        cap = self.config.prefill_chunk
        budget = self.config.max_num_batched_tokens if decoding else max(self.config.max_num_batched_tokens, cap)
        left = max(1, budget - decoding)
        plan: list[tuple[_Request, int]] = []
        long_at = self.config.long_prefill_token_threshold
        rows = decoding  # the step's rows so far
        for req in self._prefilling:
            if left <= 0:
                break
            req_cap = cap
            if decoding and long_at > 0 and len(req.prompt) > long_at:
                req_cap = min(cap, self._long_prompt_tokens(rows))
            tokens = min(len(req.prompt) - req.pos, req_cap, left)
            plan.append((req, tokens))
            left -= tokens
            rows += tokens
        return plan

    def _long_prompt_tokens(self, rows: int) -> int:
        """A long prompt's tokens in a step that already has `rows` rows (decode rows, earlier prompts' chunks):
        long_prefill_step_tokens when set; else, where the plan's batch kernels take activation rows a tile at a time
        (KernelPlan.decode_row_tile), the rows that fill the last tile, or a tile more when that is under half a tile,
        kept below the rows from which the step would run on the prompt GEMM instead: the step then costs what its
        other rows' tiles cost, or one tile more, as DEFAULT_LONG_PREFILL_STEP_TOKENS' 8 rows would (measured on the
        Zen 4, 0.5B int4, 4 streams beside a 2,000-token prompt: 8 tokens a step made 12-row steps of 58-66 ms
        against 24 ms for the 4 rows alone; 4 tokens fill their tile). DEFAULT_LONG_PREFILL_STEP_TOKENS where there is
        no tile, where any prompt row puts the step on the prompt GEMM, and where less than half a tile would fit
        below it (a long prompt still moves at least that fast)."""
        if self.config.long_prefill_step_tokens is not None:
            return max(1, self.config.long_prefill_step_tokens)
        tile, gemm = self._row_tile, self._gemm_rows
        if tile <= 1 or (gemm and rows + 1 >= gemm):
            return DEFAULT_LONG_PREFILL_STEP_TOKENS
        fill = -rows % tile
        tokens = fill if fill >= tile // 2 else fill + tile
        if gemm:
            tokens = min(tokens, gemm - 1 - rows)
        return tokens if tokens >= tile // 2 else DEFAULT_LONG_PREFILL_STEP_TOKENS

    def _admit(self) -> list[_Request]:
        admitted = []
        in_flight = sum(r.budget() for r in self._running)
        cap = self.config.max_tokens_in_flight
        while self._waiting and self._free_slots:
            req = self._waiting[0]
            if cap is not None and self._running and in_flight + req.budget() > cap:
                break
            if self._awaits_shared_prefix(req):
                break
            self._waiting.popleft()
            self._free_slots.sort()
            req.slot = self._free_slots.pop(0)
            self._load_prefix(req)
            self._running.append(req)
            in_flight += req.budget()
            admitted.append(req)
        self._running.sort(key=lambda r: cast(int, r.slot))  # running requests all hold a slot
        return admitted

    def _awaits_shared_prefix(self, req: _Request) -> bool:
        """Whether `req` should wait for a prompt being prefilled now that shares more whole blocks with it
        than the cache holds (the n choices of one prompt, a question's answer options sent together):
        admitted a few steps later it copies them instead of computing them again."""
        pc = self.prefix_cache
        if pc is None or req.params.prompt_logprobs is not None:
            return False
        bs, usable = pc.block_size, (len(req.prompt) - self._prefix_recompute) // pc.block_size
        shared = 0
        for other in self._running:
            if other.prefilling and not other.done:
                n = 0
                while n < usable and req.prompt[n * bs:(n + 1) * bs] == other.prompt[n * bs:(n + 1) * bs]:
                    n += 1
                shared = max(shared, n)
        return shared > 0 and shared > pc.cached_blocks(req.prompt, shared * bs)

    def _load_prefix(self, req: _Request) -> None:
        """Copy the longest cached block-aligned prefix of the prompt into the request's fresh slot; its
        prefill starts after it. At least the last prompt token is left to compute (its logits give the
        first token; see _prefix_recompute); a request that wants every prompt token's logprobs computes
        them all."""
        pc = self.prefix_cache
        if pc is None or self._cache is None or req.slot is None or req.params.prompt_logprobs is not None:
            return
        try:
            chain = pc.match(req.prompt, len(req.prompt) - self._prefix_recompute)
            req.pos = pc.load(chain, self._cache.k, self._cache.v, req.slot)
        except Exception:  # noqa: BLE001 - the cache is an optimisation: compute the whole prompt instead
            log.exception("prefix cache look-up failed for %s; prefilling the whole prompt", req.id)
            req.pos = 0

    def _store_prefix(self, req: _Request) -> None:
        """Keep the full blocks of a just-prefilled prompt (its slot holds their keys/values)."""
        pc = self.prefix_cache
        if pc is None or self._cache is None or req.slot is None:
            return
        try:
            pc.store(req.prompt, self._cache.k, self._cache.v, req.slot)
        except Exception:  # noqa: BLE001 - never fail a request over the cache
            log.exception("prefix cache store failed for %s", req.id)

    def _guarded(self, reqs: list[_Request], fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - fail these requests, keep serving the others
            log.exception("engine step failed for %d request(s): %s", len(reqs), exc)
            for r in reqs:
                if not r.done:
                    self._finish(r, None, "error")

    def _prefill_chunk(self, req: _Request, tokens: int) -> None:
        assert self._cache is not None and req.slot is not None
        start = req.pos
        end = min(len(req.prompt), start + tokens)
        if req.prompt_logprobs is not None:  # its chunk's logits are [T, vocab] float32: bounded (~155 MB)
            end = min(end, start + PROMPT_LOGPROBS_CHUNK)
        device = self.model.device
        ids = torch.tensor([req.prompt[start:end]], device=device)
        positions = torch.arange(start, end, device=device)[None]
        last = end == len(req.prompt)
        scored = req.prompt_logprobs is not None  # echo: every position's logits, not just the last one's
        logits = self.model(ids, positions, self._cache, slice(req.slot, req.slot + 1), kv_len=end,
                            logits="all" if scored else "last" if last else "none")
        req.pos = end
        if scored:
            logits = self._score_prompt(req, start, end, logits)
        if last:
            self._store_prefix(req)  # before sampling: a request that finishes now wipes its slot
            if req.params.max_tokens == 0:
                self._finish(req, None, "length")  # the prompt scored, nothing to generate
            else:
                self._sample_and_emit([req], logits)

    def _score_prompt(self, req: _Request, start: int, end: int, logits: Tensor) -> Tensor | None:
        """Record the log-probabilities of prompt tokens start+1..end from this chunk's logits [1, T, V] (position
        p predicts token p + 1); returns the raw last row [1, V] when the prompt is complete, to sample from."""
        assert req.prompt_logprobs is not None and req.params.prompt_logprobs is not None
        rows = logits[0]
        last_row = rows[-1:].clone() if end == len(req.prompt) else None  # before the rows are normalised in place
        if start == 0:
            req.prompt_logprobs.append((None, []))  # nothing predicts the first token
        n = min(end, len(req.prompt) - 1) - start    # positions whose next token is in the prompt
        if n > 0:
            req.prompt_logprobs += token_logprobs(rows[:n], req.prompt[start + 1:start + 1 + n],
                                                  req.params.prompt_logprobs, in_place=True)
        return last_row

    def _decode_with_chunks(self, reqs: list[_Request], chunks: list[tuple[_Request, int]]) -> None:
        """One decode step for reqs and, in the same forward, prompt chunks (request, tokens): a chunk that ends
        its prompt also gives the logits of its last row, its first token sampled from them with the decode rows'
        tokens (its prefix kept first, as _prefill_chunk does); the others write the cache only."""
        assert self._cache is not None
        ids = [cast(int, r.next_token) for r in reqs]
        positions = [r.pos for r in reqs]
        seqs = [(cast(int, r.slot), 1) for r in reqs]
        logit_rows = list(range(len(reqs)))
        ending: list[_Request] = []
        for r, n in chunks:
            ids += r.prompt[r.pos:r.pos + n]
            positions += range(r.pos, r.pos + n)
            seqs.append((cast(int, r.slot), n))
            if r.pos + n == len(r.prompt):
                ending.append(r)
                logit_rows.append(len(ids) - 1)
        device = self.model.device
        logits = self.model.forward_ragged(torch.tensor(ids, device=device), torch.tensor(positions, device=device),
                                           self._cache, seqs, logit_rows=logit_rows)
        assert logits is not None  # at least one decode row
        for r, n in chunks:
            r.pos += n
        for r in reqs:
            r.pos += 1
        for r in ending:  # (max_tokens >= 1: only prompt-logprobs requests may ask for 0, and they do not ride)
            self._store_prefix(r)  # before sampling: a request that finishes now wipes its slot
        self._sample_and_emit(reqs + ending, logits)

    def _decode(self, reqs: list[_Request]) -> None:
        assert self._cache is not None
        device = self.model.device
        ids = torch.tensor([[r.next_token] for r in reqs], device=device)          # [B, 1]
        positions = torch.tensor([[r.pos] for r in reqs], device=device)           # [B, 1]
        slot_list = [cast(int, r.slot) for r in reqs]  # decoding requests all hold a slot
        if slot_list == list(range(slot_list[0], slot_list[0] + len(slot_list))):
            slots: Tensor | slice = slice(slot_list[0], slot_list[0] + len(slot_list))  # a view of the cache
        else:
            slots = torch.tensor(slot_list, device=device)
        kv_len = max(r.pos for r in reqs) + 1
        if self.cuda_graphs:
            # a few static shapes: slots as a tensor, the attended length rounded up to a power of two
            # (the mask hides positions past each row's own)
            slots = torch.tensor(slot_list, device=device)
            kv_len = kv_bucket(kv_len, self.max_len)
        logits = self._decode_fn(ids, positions, self._cache, slots, kv_len=kv_len, logits="last")  # [B, V]
        for r in reqs:
            r.pos += 1
        self._sample_and_emit(reqs, logits)

    def _sample_and_emit(self, reqs: list[_Request], logits: Tensor) -> None:
        if self.logits_hook is not None:
            self.logits_hook(logits, [r.id for r in reqs])
        finite, argmax, drawn = scan_rows(logits, [r.sampler for r in reqs], self._fused_sampler)
        tokens: list[int | None] = []
        with one_thread(logits.device):
            for i, r in enumerate(reqs):
                if not finite[i]:
                    log.error("request %s produced non-finite logits; failing it alone", r.id)
                    self._finish(r, None, "error")
                    tokens.append(None)
                    continue
                chosen = drawn[i]  # a plain-temperature row scan_rows drew; else argmax or _sample
                if chosen is None:
                    chosen = r.sampler.choose(logits[i], argmax[i], r.generated)
                r.sampler.observe(chosen)
                tokens.append(chosen)
        logprobs = self._logprobs(reqs, logits, tokens)
        for i, r in enumerate(reqs):
            tok = tokens[i]
            if tok is None:
                continue
            lp, top = logprobs.get(i, (None, None))
            r.generated += 1
            self._stats.generated_tokens += 1
            self._recent.append((time.monotonic(), 1))
            if tok in r.stop_ids:
                if tok in r.eos_ids:
                    self._finish(r, tok, "stop", lp, top)
                else:  # a user's stop id is not emitted
                    self._finish(r, None, "stop")
            elif r.generated >= r.params.max_tokens or len(r.prompt) + r.generated >= self.max_len:
                self._finish(r, tok, "length", lp, top)
            else:
                r.next_token = tok
                r.deliver(r.event(tok, None, lp, top))

    @staticmethod
    def _logprobs(reqs: list[_Request], logits: Tensor, tokens: list[int | None]
                  ) -> dict[int, tuple[float, TopLogprobs]]:
        """The raw log-probabilities of the sampled tokens (and top alternatives) of the rows that asked,
        in one log_softmax over just those rows."""
        rows = [i for i, r in enumerate(reqs) if r.params.logprobs is not None and tokens[i] is not None]
        if not rows:
            return {}
        k = max(cast(int, reqs[i].params.logprobs) for i in rows)
        picked = logits if len(rows) == len(reqs) else logits[rows]
        scored = token_logprobs(picked, [cast(int, tokens[i]) for i in rows], k)
        return {i: (lp, top[:cast(int, reqs[i].params.logprobs)]) for i, (lp, top) in zip(rows, scored, strict=True)}

    def _finish(self, req: _Request, token: int | None, reason: str, logprob: float | None = None,
                top_logprobs: TopLogprobs | None = None) -> None:
        if req.done:
            return
        req.done = True
        if req in self._running:
            self._running.remove(req)
        if req.slot is not None:
            self._release_slot(req)
        with self._lock:
            self._by_id.pop(req.id, None)
        try:
            req.deliver(req.event(token, reason, logprob, top_logprobs))
        except Exception:  # noqa: BLE001 - a dead consumer must not hurt the engine
            log.debug("could not deliver the final event of %s", req.id)

    def _release_slot(self, req: _Request) -> None:
        slot, used = req.slot, min(req.pos + 1, self.max_len)
        req.slot = None
        if self._cache is not None and used > 0:
            # wipe what this request wrote (a NaN left behind would poison the slot's next user)
            for t in itertools.chain(self._cache.k, self._cache.v):
                t[slot, :, :used].zero_()
        with self._lock:
            self._free_slots.append(slot)  # type: ignore[arg-type]

    def _update_stats(self, step: bool = True) -> None:
        now = time.monotonic()
        while self._recent and now - self._recent[0][0] > RATE_WINDOW_S:
            self._recent.popleft()
        n = sum(c for _, c in self._recent)
        span = now - self._recent[0][0] if self._recent else 0.0
        s = self._stats
        s.tokens_per_s = n / max(span, RATE_MIN_SPAN_S) if n else 0.0
        s.queue_depth = len(self._waiting)
        s.running = len(self._running)
        capacity = self.config.max_batch_size * self.max_len
        live = sum(r.pos for r in self._running)
        s.kv_cache_usage = live / capacity if capacity else 0.0
        s.kv_cache_bytes = live * self._token_bytes
        if self.device.type == "cuda":
            s.gpu_memory_bytes = int(torch.cuda.memory_reserved(self.device))
        s.steps += step
        for name, value in self._prefix_stats().items():
            setattr(s, name, value)
        if self.metrics is not None:
            try:
                self.metrics.observe_step(s)
            except Exception:  # noqa: BLE001
                log.debug("metrics.observe_step failed", exc_info=True)


def kv_bucket(kv_len: int, max_len: int, smallest: int = 64) -> int:
    """The attended KV length for a captured decode graph: the next power of two >= kv_len (>= smallest),
    at most max_len, so a context of 32k needs ~10 graphs per batch size, not one per length."""
    b = smallest
    while b < kv_len:
        b *= 2
    return min(b, max_len)
