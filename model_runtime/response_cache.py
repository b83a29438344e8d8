"""An exact-match cache of OpenAI responses for deterministic requests (off by default).

Operators of, say, a support bot see the same deterministic question many times; answering it again from
memory costs nothing. The cache is deliberately narrow:

- Only deterministic requests take part: effective temperature 0 (greedy) or a fixed `seed` (the engine
  reproduces a seeded request's tokens whatever else shares the batch). "Effective" means after the
  defaults (request > runtime flag > generation_config > 1.0, as serving.py applies them): a request
  that leaves temperature unset on a model whose default is 0.6 samples, so it is never looked up, never
  stored, never served a cached answer.
- The key is the canonical JSON of the validated request (every field pydantic parsed, defaults filled,
  keys sorted: `{"temperature": 0}` and `{"temperature": 0.0}` are one key; any sampling field, `n`,
  `best_of`, `logprobs`, `echo`, `stop` that differs is another) plus the route, the served model and the
  server's sampling defaults. Only NOT_IN_KEY is left out (`user` and OpenAI's other bookkeeping, `stream`):
  it does not change a non-streamed answer. A field a later protocol version adds joins the key by itself.
- Bounded by entries (LRU), by bytes (the stored bodies plus keys) and by age (TTL, checked on every
  lookup and swept periodically).
- `Cache-Control: no-cache` (or `Pragma: no-cache`) skips the lookup; the fresh answer is still stored.
  `no-store` skips both.
- Only a complete 200 answer is stored: errors, 429s, timeouts, aborts and client disconnects raise
  before a response exists, and a body whose choices did not finish with stop/length is refused too.
- Streaming requests bypass the cache (neither served nor stored). A replayed stream would arrive as one
  burst, and a second rendering path for chunks (per-token logprobs, usage chunk) would have to follow
  the streaming format forever; a client that wants cached answers asks without `stream`.
- A hit is the stored body with a new `id` and `created`; the `x-distillery-cache` response header says
  hit, miss (looked up, not found: stored when it succeeds) or bypass (not looked up). With the cache
  off the header is absent.

The cache is shared by every client of the model: a client can tell from the header (or the latency)
that someone asked the exact same question within the TTL. Leave it off where that matters.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Final, TypeVar

from pydantic import BaseModel
from starlette.responses import JSONResponse, Response, StreamingResponse

if TYPE_CHECKING:
    from model_runtime.serving import Serving

CACHE_HEADER: Final = "x-distillery-cache"
HIT: Final = "hit"
MISS: Final = "miss"
BYPASS: Final = "bypass"
RESULTS: Final = (HIT, MISS, BYPASS)
EVICT_EXPIRED: Final = "expired"
EVICT_ENTRIES: Final = "entries"
EVICT_BYTES: Final = "bytes"
EVICTION_REASONS: Final = (EVICT_EXPIRED, EVICT_ENTRIES, EVICT_BYTES)

DEFAULT_MAX_BYTES: Final = 64 * 2**20
DEFAULT_TTL_S: Final = 600.0
# request fields that do not change a non-streamed answer (streams bypass the cache): who asks (OpenAI's
# end-user ids) and bookkeeping the runtime accepts and ignores; left in the key they would only split hits
NOT_IN_KEY: Final = frozenset({"user", "safety_identifier", "metadata", "store", "service_tier",
                               "prompt_cache_key", "stream", "stream_options"})
COMPLETE_FINISH_REASONS: Final = frozenset({"stop", "length"})
_SWEEP_EVERY_S: Final = 60.0
T = TypeVar("T")


@dataclass(frozen=True)
class ResponseCacheConfig:
    """The runtime flags --response_cache_max_entries (0: off), _max_bytes and _ttl_s."""

    max_entries: int = 0
    max_bytes: int = DEFAULT_MAX_BYTES
    ttl_s: float = DEFAULT_TTL_S

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0

    def __post_init__(self) -> None:
        if self.max_entries < 0 or self.max_bytes < 1 or not self.ttl_s > 0:
            raise ValueError(f"response cache: need max_entries >= 0, max_bytes >= 1, ttl_s > 0; got {self}")


@dataclass
class _Entry:
    body: bytes
    size: int
    expires: float


class ResponseCache:
    """Response bodies by key: LRU-bounded by entries and bytes, each valid for ttl_s. Thread-safe.

    `metrics` (a RuntimeMetrics, optional) receives lookups, stores, evictions and the size gauges.
    `clock` is injectable so tests can age entries without sleeping.
    """

    def __init__(self, config: ResponseCacheConfig, metrics: Any | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not config.enabled:
            raise ValueError("a ResponseCache needs max_entries >= 1")
        self.config = config
        self.metrics = metrics
        self.clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._bytes = 0
        self._lock = threading.Lock()
        self._next_sweep = clock() + min(config.ttl_s, _SWEEP_EVERY_S)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, key: str) -> bytes | None:
        """The body stored under `key` if it has not expired (and mark it recently used)."""
        with self._lock:
            now = self.clock()
            self._maybe_sweep(now)
            entry = self._entries.get(key)
            if entry is None:
                return None
            if entry.expires <= now:
                self._remove(key, EVICT_EXPIRED)
                self._gauges()
                return None
            self._entries.move_to_end(key)
            return entry.body

    def put(self, key: str, body: bytes) -> bool:
        """Store `body` under `key`, evicting the least recently used entries to fit; False when one body
        alone exceeds max_bytes (not stored)."""
        size = len(body) + len(key)
        if size > self.config.max_bytes:
            return False
        with self._lock:
            now = self.clock()
            self._maybe_sweep(now)
            if key in self._entries:
                self._remove(key, None)
            while self._entries and len(self._entries) >= self.config.max_entries:
                self._remove(next(iter(self._entries)), EVICT_ENTRIES)
            while self._entries and self._bytes + size > self.config.max_bytes:
                self._remove(next(iter(self._entries)), EVICT_BYTES)
            self._entries[key] = _Entry(body, size, now + self.config.ttl_s)
            self._bytes += size
            self._gauges()
        if self.metrics is not None:
            self.metrics.response_cache_stored()
        return True

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0
            self._gauges()

    # ---- internals (called with the lock held)
    def _remove(self, key: str, reason: str | None) -> None:
        entry = self._entries.pop(key)
        self._bytes -= entry.size
        if reason is not None and self.metrics is not None:
            self.metrics.response_cache_evicted(reason)

    def _maybe_sweep(self, now: float) -> None:
        # LRU order is not expiry order (a hit moves an old entry to the end): a periodic full pass keeps
        # expired entries from holding memory and inflating the gauges until they are asked for again.
        if now < self._next_sweep:
            return
        self._next_sweep = now + min(self.config.ttl_s, _SWEEP_EVERY_S)
        for key in [k for k, e in self._entries.items() if e.expires <= now]:
            self._remove(key, EVICT_EXPIRED)
        self._gauges()

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.response_cache_size(len(self._entries), self._bytes)


def create_response_cache(config: ResponseCacheConfig, metrics: Any | None = None) -> ResponseCache | None:
    """The cache the flags ask for, or None when it is off."""
    return ResponseCache(config, metrics) if config.enabled else None


# --------------------------------------------------------------------------- which requests, which key
def effective_temperature(req: BaseModel, serving: Serving) -> float:
    """The temperature the request will sample with: request > runtime flag > generation_config (greedy
    when it says do_sample false) > 1.0, the order serving.py applies (a test holds the two together)."""
    requested = getattr(req, "temperature", None)
    if requested is not None:
        return float(requested)
    if serving.config.default_temperature is not None:
        return float(serving.config.default_temperature)
    defaults = serving.generation_defaults
    if defaults.get("do_sample") is False:
        return 0.0
    value = defaults.get("temperature")
    return 1.0 if value is None else float(value)


def is_deterministic(req: BaseModel, serving: Serving) -> bool:
    """Greedy, or sampling from a fixed seed: the same request gives the same answer."""
    return getattr(req, "seed", None) is not None or effective_temperature(req, serving) <= 0.0


def request_key(endpoint: str, req: BaseModel, serving: Serving) -> str:
    """A digest of everything that decides the answer: the route, the served model and its sampling
    defaults (the runtime flags, generation_config), and the whole validated request."""
    canonical = {
        "endpoint": endpoint,
        "served": serving.model_name,
        "config": asdict(serving.config),
        "generation_defaults": serving.generation_defaults,
        "request": req.model_dump(mode="json", exclude=set(NOT_IN_KEY)),
    }
    text = json.dumps(canonical, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def cache_directives(headers: Mapping[str, str]) -> set[str]:
    """The request's Cache-Control directives (lower case), plus HTTP/1.0's `Pragma: no-cache`."""
    directives = {d.strip().split("=", 1)[0].lower() for d in headers.get("cache-control", "").split(",")}
    if "no-cache" in headers.get("pragma", "").lower():
        directives.add("no-cache")
    directives.discard("")
    return directives


# --------------------------------------------------------------------------- the HTTP hook
class Lookup:
    """One request's way through the cache: `hit` is the cached response (or None); `finish(response)`
    labels the response and stores a fresh complete answer."""

    def __init__(self, cache: ResponseCache | None, result: str | None, key: str | None,
                 hit: Response | None = None, pool: Any | None = None) -> None:
        self.cache = cache
        self.result = result  # None: cache off (no header)
        self.key = key  # set when a fresh answer may be stored
        self.hit = hit
        self.pool = pool

    async def finish(self, response: Response) -> None:
        if self.result is None:
            return
        response.headers[CACHE_HEADER] = self.result
        if self.hit is not None or self.key is None or self.cache is None:
            return
        if response.status_code != 200 or isinstance(response, StreamingResponse):
            return
        body = bytes(response.body)
        if await _off_loop(self.pool, _complete, body):
            self.cache.put(self.key, body)


async def lookup_response(cache: ResponseCache | None, endpoint: str, req: BaseModel, headers: Mapping[str, str],
                          serving: Serving, pool: Any | None = None) -> Lookup:
    """Decide whether this OpenAI request may use the cache, and look it up (before any generation).

    `pool` (the model's WorkerPool) takes the work that grows with the request off the event loop: the key
    serializes and hashes the whole prompt (up to the body limit: it runs before the prompt-size check), a
    hit and a store parse the answer.
    """
    if cache is None:
        return Lookup(None, None, None)
    directives = cache_directives(headers)
    if getattr(req, "stream", False) or "no-store" in directives or not is_deterministic(req, serving):
        return _counted(cache, Lookup(cache, BYPASS, None))
    key = await _off_loop(pool, request_key, endpoint, req, serving)
    if "no-cache" in directives:
        return _counted(cache, Lookup(cache, BYPASS, key, pool=pool))
    body = cache.get(key)
    if body is None:
        return _counted(cache, Lookup(cache, MISS, key, pool=pool))
    return _counted(cache, Lookup(cache, HIT, key, await _off_loop(pool, _replay, body)))


async def _off_loop(pool: Any | None, fn: Callable[..., T], *args: Any) -> T:
    if pool is None:
        return fn(*args)
    result: T = await pool.run(fn, *args)
    return result


def _counted(cache: ResponseCache, result: Lookup) -> Lookup:
    if cache.metrics is not None and result.result is not None:
        cache.metrics.response_cache_lookup(result.result)
    return result


def _replay(body: bytes) -> Response:
    """The stored answer as a new response: a fresh id (same prefix) and creation time."""
    data = json.loads(body)
    if isinstance(data.get("id"), str):
        prefix = data["id"].rsplit("-", 1)[0] if "-" in data["id"] else "cmpl"
        data["id"] = f"{prefix}-{uuid.uuid4().hex}"
    if "created" in data:
        data["created"] = int(time.time())
    return JSONResponse(data)


def _complete(body: bytes) -> bool:
    """A whole answer: every choice finished because of a stop condition or max_tokens."""
    try:
        data = json.loads(body)
    except ValueError:
        return False
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices:
        return False
    return all(isinstance(c, dict) and c.get("finish_reason") in COMPLETE_FINISH_REASONS for c in choices)
