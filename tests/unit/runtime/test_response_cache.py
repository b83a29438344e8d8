"""The response cache (model_runtime/response_cache.py): the bounded store (hits, misses, expiry on an
injected clock, entry and byte bounds, LRU eviction, metrics) and the policy (only deterministic requests
after the server's defaults, every sampling field in the key, Cache-Control, streams bypass).

The hook in server.py's OpenAI routes is tested over ASGI with a scripted engine at the end; the live
server (tests/integration/runtime/test_response_cache_live.py) shows it end to end on the tiny model.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from distillery_contract import metric_names
from model_runtime.metrics import RuntimeMetrics
from model_runtime.protocol import ChatCompletionRequest, CompletionRequest
from model_runtime.response_cache import (
    BYPASS,
    HIT,
    MISS,
    ResponseCache,
    ResponseCacheConfig,
    cache_directives,
    effective_temperature,
    is_deterministic,
    lookup_response,
    request_key,
)
from model_runtime.serving import ServingConfig


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def store(max_entries: int = 4, max_bytes: int = 10_000, ttl_s: float = 60.0,
          registry: CollectorRegistry | None = None) -> tuple[ResponseCache, Clock, CollectorRegistry]:
    registry = registry or CollectorRegistry()
    clock = Clock()
    cache = ResponseCache(ResponseCacheConfig(max_entries=max_entries, max_bytes=max_bytes, ttl_s=ttl_s),
                          metrics=RuntimeMetrics("m", registry), clock=clock)
    return cache, clock, registry


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, {metric_names.METRIC_LABEL_MODEL: "m", **labels})


# ------------------------------------------------------------------ the store
def test_a_stored_body_is_a_hit_and_an_unknown_key_a_miss():
    cache, _, registry = store()
    assert cache.get("a") is None
    assert cache.put("a", b"body-a")
    assert cache.get("a") == b"body-a"
    assert cache.get("b") is None
    assert len(cache) == 1 and cache.nbytes == len(b"body-a") + len("a")
    assert sample(registry, metric_names.METRIC_RESPONSE_CACHE_STORES_TOTAL) == 1
    assert sample(registry, metric_names.METRIC_RESPONSE_CACHE_ENTRIES) == 1
    assert sample(registry, metric_names.METRIC_RESPONSE_CACHE_BYTES) == cache.nbytes


def test_an_entry_expires_after_the_ttl():
    cache, clock, registry = store(ttl_s=30)
    cache.put("a", b"x")
    clock.now += 29.9
    assert cache.get("a") == b"x"  # a hit does not extend the entry's life
    clock.now += 0.1
    assert cache.get("a") is None and len(cache) == 0 and cache.nbytes == 0
    assert sample(registry, metric_names.METRIC_RESPONSE_CACHE_EVICTIONS_TOTAL, reason="expired") == 1


def test_the_periodic_sweep_drops_expired_entries_nobody_asks_for():
    cache, clock, registry = store(ttl_s=10)
    cache.put("a", b"x")
    cache.put("b", b"y")
    clock.now += 11
    cache.put("c", b"z")  # any operation after the sweep period clears what expired
    assert len(cache) == 1 and cache.get("c") == b"z"
    assert sample(registry, metric_names.METRIC_RESPONSE_CACHE_ENTRIES) == 1
    assert sample(registry, metric_names.METRIC_RESPONSE_CACHE_EVICTIONS_TOTAL, reason="expired") == 2


def test_the_entry_bound_evicts_the_least_recently_used():
    cache, _, registry = store(max_entries=2)
    cache.put("a", b"1")
    cache.put("b", b"2")
    assert cache.get("a") == b"1"  # a is now the most recently used
    cache.put("c", b"3")
    assert cache.get("b") is None and cache.get("a") == b"1" and cache.get("c") == b"3"
    assert len(cache) == 2
    assert sample(registry, metric_names.METRIC_RESPONSE_CACHE_EVICTIONS_TOTAL, reason="entries") == 1


def test_the_byte_bound_evicts_until_the_new_body_fits_and_refuses_one_that_never_fits():
    cache, _, registry = store(max_entries=100, max_bytes=100)
    for key in "abcd":
        assert cache.put(key, b"x" * 24)  # 25 bytes each with its key
    assert cache.nbytes == 100
    assert cache.put("e", b"y" * 49)  # 50 bytes: a and b go
    assert [cache.get(k) is not None for k in "abcde"] == [False, False, True, True, True]
    assert cache.nbytes == 100
    assert sample(registry, metric_names.METRIC_RESPONSE_CACHE_EVICTIONS_TOTAL, reason="bytes") == 2
    assert not cache.put("f", b"z" * 100)  # larger than the whole cache: not stored, nothing evicted
    assert cache.get("f") is None and len(cache) == 3


def test_storing_a_key_again_replaces_it_without_double_counting_bytes():
    cache, _, _ = store()
    cache.put("a", b"12345")
    cache.put("a", b"12")
    assert cache.get("a") == b"12" and len(cache) == 1 and cache.nbytes == 3


def test_config_bounds():
    assert not ResponseCacheConfig().enabled  # off by default
    with pytest.raises(ValueError):
        ResponseCacheConfig(max_entries=-1)
    with pytest.raises(ValueError):
        ResponseCacheConfig(max_entries=1, ttl_s=0)
    with pytest.raises(ValueError):
        ResponseCache(ResponseCacheConfig())


# ------------------------------------------------------------------ which requests, which key
def fake_serving(default_temperature: float | None = None, generation_defaults: dict[str, Any] | None = None,
                 **config: Any) -> Any:
    """What the policy reads from a Serving: its config, generation_config defaults and model name."""
    return SimpleNamespace(
        config=ServingConfig(model_name="r1", default_temperature=default_temperature, **config),
        generation_defaults={"temperature": 0.6, "top_p": 0.95} if generation_defaults is None
        else generation_defaults,
        model_name="r1",
    )


def completion(**kw: Any) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "r1", "prompt": "Hello", **kw})


def chat(**kw: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "r1", "messages": [{"role": "user", "content": "Hi"}], **kw})


@pytest.mark.parametrize(("request_kw", "serving_kw", "temperature", "deterministic"), [
    ({}, {}, 0.6, False),  # R1's generation_config samples: no temperature in the request means sampling
    ({"temperature": 0}, {}, 0.0, True),
    ({"temperature": 0.7}, {}, 0.7, False),
    ({"temperature": 0.7, "seed": 3}, {}, 0.7, True),  # a fixed seed reproduces the sample
    ({"seed": 3}, {}, 0.6, True),
    ({}, {"default_temperature": 0.0}, 0.0, True),  # the runtime flag makes unset requests greedy
    ({"temperature": 1.0}, {"default_temperature": 0.0}, 1.0, False),  # ... but the request wins
    ({}, {"generation_defaults": {"do_sample": False, "temperature": 0.6}}, 0.0, True),
    ({}, {"generation_defaults": {}}, 1.0, False),  # OpenAI's default
])
def test_only_requests_that_are_deterministic_after_the_defaults_take_part(request_kw, serving_kw, temperature,
                                                                            deterministic):
    serving = fake_serving(**serving_kw)
    for req in (completion(**request_kw), chat(**request_kw)):
        assert effective_temperature(req, serving) == temperature
        assert is_deterministic(req, serving) is deterministic


class _Tokenizer:
    """Enough of a tokenizer for Serving with token-id prompts (no chat template, no text to encode)."""

    chat_template = None

    def __len__(self) -> int:
        return 1000


def test_the_policy_reads_the_temperature_the_way_serving_applies_it():
    """effective_temperature mirrors Serving's default order: hold them together on the real Serving."""
    from model_runtime.serving import Serving

    cases = [({}, None, {"temperature": 0.6}), ({"temperature": 0}, None, {"temperature": 0.6}),
             ({}, 0.0, {"temperature": 0.6}), ({}, None, {"do_sample": False, "temperature": 0.6}),
             ({}, None, {}), ({"temperature": 1.3}, 0.0, {}), ({"seed": 1}, 0.2, {"temperature": 0.6})]
    for request_kw, flag, defaults in cases:
        loaded = SimpleNamespace(tokenizer=_Tokenizer(), eos_token_ids=[0], max_model_len=256,
                                 generation_defaults=defaults)
        serving = Serving(loaded, engine=None, config=ServingConfig(model_name="r1", default_temperature=flag,
                                                                    allow_special_tokens_in_content=True))
        req = completion(prompt=[1, 2, 3], **request_kw)
        assert effective_temperature(req, serving) == serving.prepare_completion(req).params.temperature


SAMPLING_VARIANTS: dict[str, Any] = {
    # field -> a value other than the base request's; fields this protocol version lacks are skipped
    "prompt": "Hello!", "max_tokens": 9, "temperature": 0.5, "top_p": 0.5, "seed": 8, "stop": ["x"],
    "n": 2, "best_of": 3, "logprobs": 2, "echo": True, "top_k": 5, "min_p": 0.1, "presence_penalty": 0.5,
    "frequency_penalty": 0.5, "repetition_penalty": 1.2, "logit_bias": {"11": 5.0}, "min_tokens": 2,
    "ignore_eos": True, "stop_token_ids": [13], "prompt_logprobs": 1, "model": "other",
    "include_stop_str_in_output": True, "skip_special_tokens": False, "add_special_tokens": False,
    "truncate_prompt_tokens": 2, "spaces_between_special_tokens": False,
}
CHAT_VARIANTS: dict[str, Any] = {
    "messages": [{"role": "user", "content": "Hi!"}], "max_completion_tokens": 3, "top_logprobs": 2,
    "add_generation_prompt": False, "continue_final_message": True, "response_format": {"type": "text"},
}


def test_a_request_differing_in_any_sampling_field_has_another_key():
    serving = fake_serving()
    base = {"max_tokens": 8, "temperature": 0.0, "seed": 7}
    key = request_key("completions", completion(**base), serving)
    assert request_key("completions", completion(**base), serving) == key
    assert request_key("completions", completion(max_tokens=8, temperature=0, seed=7), serving) == key  # 0 == 0.0
    assert request_key("completions", completion(**base, user="alice", stream_options=None), serving) == key
    assert request_key("chat", completion(**base), serving) != key  # another route
    tried = 0
    for field, value in SAMPLING_VARIANTS.items():
        if field not in CompletionRequest.model_fields:
            continue
        try:
            variant = completion(**{**base, field: value})
        except ValueError:  # a combination this protocol version refuses (e.g. n without best_of rules)
            continue
        tried += 1
        assert request_key("completions", variant, serving) != key, field
    assert tried >= 5
    # the server's own defaults are part of the key (a restart with other flags never reuses an answer)
    assert request_key("completions", completion(**base), fake_serving(default_temperature=0.0)) != key
    assert request_key("completions", completion(**base), fake_serving(generation_defaults={})) != key


def test_a_chat_request_differing_in_any_field_has_another_key():
    serving = fake_serving()
    base = {"max_tokens": 8, "temperature": 0.0, "logprobs": True}
    key = request_key("chat", chat(**base), serving)
    assert request_key("chat", chat(**base, user="bob"), serving) == key
    tried = 0
    for field, value in {**SAMPLING_VARIANTS, **CHAT_VARIANTS}.items():
        if field not in ChatCompletionRequest.model_fields or field == "prompt":
            continue
        try:
            variant = chat(**{**base, field: value})
        except ValueError:
            continue
        tried += 1
        assert request_key("chat", variant, serving) != key, field
    assert tried >= 5


def test_cache_control_directives():
    assert cache_directives({"cache-control": "No-Cache, max-age=0"}) == {"no-cache", "max-age"}
    assert cache_directives({"cache-control": "no-store"}) == {"no-store"}
    assert cache_directives({"pragma": "no-cache"}) == {"no-cache"}
    assert cache_directives({}) == set()


# ------------------------------------------------------------------ the lookup decision
def response_body(finish_reason: str = "stop", text: str = "hi") -> bytes:
    import json

    return json.dumps({"id": "cmpl-abc", "object": "text_completion", "created": 1, "model": "r1",
                       "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}],
                       "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()


async def test_lookup_miss_then_store_then_hit_with_a_new_id():
    import json

    from starlette.responses import Response

    cache, _, registry = store()
    serving = fake_serving()
    req = completion(temperature=0)
    first = await lookup_response(cache, "completions", req, {}, serving)
    assert first.result == MISS and first.hit is None
    response = Response(response_body(), media_type="application/json")
    await first.finish(response)
    assert response.headers["x-distillery-cache"] == MISS and len(cache) == 1
    second = await lookup_response(cache, "completions", req, {}, serving)
    assert second.result == HIT and second.hit is not None
    replay = json.loads(bytes(second.hit.body))
    assert replay["choices"] == json.loads(response_body())["choices"]
    assert replay["id"].startswith("cmpl-") and replay["id"] != "cmpl-abc" and replay["created"] > 1
    await second.finish(second.hit)
    assert second.hit.headers["x-distillery-cache"] == HIT and len(cache) == 1
    for result in (HIT, MISS):
        assert sample(registry, metric_names.METRIC_RESPONSE_CACHE_LOOKUPS_TOTAL, result=result) == 1


async def store_answer(cache: ResponseCache, req: Any, serving: Any, body: bytes, **headers: str) -> str | None:
    """Look `req` up and finish it with `body` as the fresh answer; the header it got."""
    from starlette.responses import Response

    decision = await lookup_response(cache, "completions", req, headers, serving)
    response = decision.hit or Response(body, media_type="application/json")
    await decision.finish(response)
    return response.headers.get("x-distillery-cache")


async def test_a_sampling_request_is_never_served_nor_stored():
    cache, _, registry = store()
    serving = fake_serving()
    assert await store_answer(cache, completion(temperature=0), serving, response_body()) == MISS
    assert len(cache) == 1
    # the same prompt with the default (sampling) temperature, or an explicit one: not served, not stored
    for req in (completion(), completion(temperature=0.6), completion(temperature=1e-3)):
        decision = await lookup_response(cache, "completions", req, {}, serving)
        assert decision.result == BYPASS and decision.hit is None and decision.key is None
        assert await store_answer(cache, req, serving, response_body(text="sampled")) == BYPASS
    assert len(cache) == 1
    assert sample(registry, metric_names.METRIC_RESPONSE_CACHE_LOOKUPS_TOTAL, result=BYPASS) == 6


async def test_no_cache_skips_the_lookup_but_stores_and_no_store_does_neither():
    cache, _, _ = store()
    serving = fake_serving()
    req = completion(temperature=0)

    async def cached_text() -> bytes:
        hit = (await lookup_response(cache, "completions", req, {}, serving)).hit
        assert hit is not None
        return bytes(hit.body)

    await store_answer(cache, req, serving, response_body("stop", "old"))
    fresh = await lookup_response(cache, "completions", req, {"cache-control": "no-cache"}, serving)
    assert fresh.result == BYPASS and fresh.hit is None
    assert await store_answer(cache, req, serving, response_body("stop", "new"), **{"cache-control": "no-cache"}) \
        == BYPASS
    assert b'"new"' in await cached_text()  # refreshed
    nostore = await lookup_response(cache, "completions", req, {"cache-control": "no-store"}, serving)
    assert nostore.result == BYPASS and nostore.hit is None
    assert await store_answer(cache, req, serving, response_body("stop", "never"), **{"cache-control": "no-store"}) \
        == BYPASS
    assert b'"new"' in await cached_text()


async def test_streams_bypass_and_incomplete_or_failed_answers_are_not_stored():
    from starlette.responses import JSONResponse, Response, StreamingResponse

    cache, _, _ = store()
    serving = fake_serving()
    stream = await lookup_response(cache, "completions", completion(temperature=0, stream=True), {}, serving)
    assert stream.result == BYPASS
    req = completion(temperature=0)
    for response in (JSONResponse({"error": {"message": "busy"}}, status_code=429),
                     Response(response_body(finish_reason="abort"), media_type="application/json"),
                     Response(b"not json", media_type="application/json"),
                     StreamingResponse(iter([b"data: [DONE]\n\n"]))):
        decision = await lookup_response(cache, "completions", req, {}, serving)
        assert decision.result == MISS
        await decision.finish(response)
        assert response.headers["x-distillery-cache"] == MISS
    assert len(cache) == 0


async def test_the_worker_pool_does_the_hashing_and_parsing():
    """With a pool (the model's WorkerPool), the key, the replay and the completeness check run there."""
    from model_runtime.worker_pool import WorkerPool

    class CountingPool(WorkerPool):
        def __init__(self) -> None:
            super().__init__(1)
            self.ran: list[str] = []

        async def run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
            self.ran.append(fn.__name__)
            return await super().run(fn, *args, **kwargs)

    from starlette.responses import Response

    pool = CountingPool()
    cache, _, _ = store()
    serving = fake_serving()
    req = completion(temperature=0)
    try:
        miss = await lookup_response(cache, "completions", req, {}, serving, pool)
        await miss.finish(Response(response_body(), media_type="application/json"))
        hit = await lookup_response(cache, "completions", req, {}, serving, pool)
        assert hit.result == HIT
    finally:
        pool.shutdown()
    assert pool.ran == ["request_key", "_complete", "request_key", "_replay"]


async def test_with_the_cache_off_nothing_is_labelled():
    from starlette.responses import Response

    decision = await lookup_response(None, "completions", completion(temperature=0), {}, fake_serving())
    response = Response(response_body(), media_type="application/json")
    await decision.finish(response)
    assert decision.hit is None and "x-distillery-cache" not in response.headers


# ------------------------------------------------------------------ the hook in server.py's OpenAI routes
class _TextTokenizer(_Tokenizer):
    """One token per character (ids < 1000), decoded back to the same characters."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) % 1000 for c in text]}

    def decode(self, ids: list[int], skip_special_tokens: bool = True, clean_up_tokenization_spaces: bool = False
               ) -> str:
        return "".join(chr(i) for i in ids)


class _Engine:
    """engine.py's generate() interface, replaying fixed tokens; counts the requests it was given."""

    def __init__(self, text: str = "four") -> None:
        self.tokens = [ord(c) for c in text]
        self.calls = 0
        self.queue_full = False

    async def generate(self, prompt_ids: list[int], params: Any, request_id: str) -> Any:
        from model_runtime.engine import QueueFullError, TokenEvent

        if self.queue_full:
            raise QueueFullError("queue full")
        self.calls += 1
        tokens = self.tokens[: params.max_tokens]
        for i, token in enumerate(tokens):
            last = i == len(tokens) - 1
            yield TokenEvent(token_id=token, finish_reason=("length" if len(tokens) < len(self.tokens) else "stop")
                             if last else None, prompt_tokens=len(prompt_ids), completion_tokens=i + 1)

    def abort(self, request_id: str) -> None:
        pass

    def stop(self) -> None:
        pass


def routes_app(max_entries: int = 8) -> tuple[Any, _Engine, CollectorRegistry]:
    from fastapi import FastAPI

    from model_runtime.server import DistilleryModel, RuntimeOptions, add_openai_routes

    registry = CollectorRegistry()
    model = DistilleryModel(RuntimeOptions(model_name="r1", model_dir="/nowhere", allow_special_tokens_in_content=True,
                                           response_cache=ResponseCacheConfig(max_entries=max_entries)),
                            metrics=RuntimeMetrics("r1", registry))
    engine = _Engine()
    loaded = SimpleNamespace(tokenizer=_TextTokenizer(), eos_token_ids=[0], max_model_len=256,
                             generation_defaults={"temperature": 0.6, "top_p": 0.95})
    model.attach(loaded, engine)
    app = FastAPI()
    add_openai_routes(app, model)
    return app, engine, registry


def client(app: Any) -> Any:
    import httpx

    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://runtime")


async def test_the_routes_answer_a_repeated_greedy_request_without_the_engine():
    app, engine, registry = routes_app()
    async with client(app) as http:
        body = {"model": "r1", "prompt": "2+2=", "temperature": 0, "max_tokens": 8}
        first = await http.post("/v1/completions", json=body)
        second = await http.post("/v1/completions", json=body)
        assert (first.status_code, second.status_code) == (200, 200)
        assert (first.headers["x-distillery-cache"], second.headers["x-distillery-cache"]) == (MISS, HIT)
        assert first.json()["choices"] == second.json()["choices"] and first.json()["choices"][0]["text"] == "four"
        assert engine.calls == 1  # the hit never reached the engine
        chat = {"model": "r1", "messages": [{"role": "user", "content": "2+2?"}], "temperature": 0}
        assert [(await http.post("/openai/v1/chat/completions", json=chat)).headers["x-distillery-cache"]
                for _ in range(2)] == [MISS, HIT]
        assert engine.calls == 2
        # a differing sampling field, a sampling request, no-cache, a stream: the engine answers each
        for extra, headers, result in (({"max_tokens": 3}, {}, MISS), ({"temperature": 0.5}, {}, BYPASS),
                                       ({}, {"Cache-Control": "no-cache"}, BYPASS), ({"stream": True}, {}, BYPASS)):
            response = await http.post("/v1/completions", json={**body, **extra}, headers=headers)
            assert response.status_code == 200 and response.headers["x-distillery-cache"] == result, extra
        assert engine.calls == 6
    value = lambda result: registry.get_sample_value(  # noqa: E731
        metric_names.METRIC_RESPONSE_CACHE_LOOKUPS_TOTAL, {"model_name": "r1", "result": result})
    assert (value(HIT), value(MISS), value(BYPASS)) == (2, 3, 3)
    assert registry.get_sample_value("distillery_requests_total",
                                     {"model_name": "r1", "endpoint": "completions", "status": "200"}) == 6


async def test_a_failed_request_is_not_stored_and_the_next_one_generates():
    app, engine, _ = routes_app()
    async with client(app) as http:
        body = {"model": "r1", "prompt": "2+2=", "temperature": 0, "max_tokens": 8}
        engine.queue_full = True
        busy = await http.post("/v1/completions", json=body)
        assert busy.status_code == 429 and busy.headers.get("x-distillery-cache") is None
        engine.queue_full = False
        again = await http.post("/v1/completions", json=body)
        assert again.status_code == 200 and again.headers["x-distillery-cache"] == MISS and engine.calls == 1


async def test_with_the_cache_off_the_routes_add_no_header():
    app, engine, _ = routes_app(max_entries=0)
    async with client(app) as http:
        body = {"model": "r1", "prompt": "2+2=", "temperature": 0, "max_tokens": 8}
        for _ in range(2):
            response = await http.post("/v1/completions", json=body)
            assert response.status_code == 200 and "x-distillery-cache" not in response.headers
        assert engine.calls == 2
