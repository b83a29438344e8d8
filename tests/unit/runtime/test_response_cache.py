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
    lookup,
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


def test_chat_messages_are_in_the_key():
    serving = fake_serving()
    one = request_key("chat", chat(temperature=0), serving)
    other = ChatCompletionRequest.model_validate(
        {"model": "r1", "temperature": 0, "messages": [{"role": "user", "content": "Hi!"}]})
    assert request_key("chat", other, serving) != one
    assert request_key("chat", chat(temperature=0, max_completion_tokens=3), serving) != one


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


def test_lookup_miss_then_store_then_hit_with_a_new_id():
    from starlette.responses import Response

    cache, _, registry = store()
    serving = fake_serving()
    req = completion(temperature=0)
    first = lookup(cache, "completions", req, {}, serving)
    assert first.result == MISS and first.hit is None
    response = Response(response_body(), media_type="application/json")
    first.finish(response)
    assert response.headers["x-distillery-cache"] == MISS and len(cache) == 1
    second = lookup(cache, "completions", req, {}, serving)
    assert second.result == HIT and second.hit is not None
    import json

    replay = json.loads(bytes(second.hit.body))
    assert replay["choices"] == json.loads(response_body())["choices"]
    assert replay["id"].startswith("cmpl-") and replay["id"] != "cmpl-abc" and replay["created"] > 1
    second.finish(second.hit)
    assert second.hit.headers["x-distillery-cache"] == HIT and len(cache) == 1
    for result in (HIT, MISS):
        assert sample(registry, metric_names.METRIC_RESPONSE_CACHE_LOOKUPS_TOTAL, result=result) == 1


def test_a_sampling_request_is_never_served_nor_stored():
    from starlette.responses import Response

    cache, _, registry = store()
    serving = fake_serving()
    greedy = completion(temperature=0)
    lookup(cache, "completions", greedy, {}, serving).finish(Response(response_body(), media_type="application/json"))
    assert len(cache) == 1
    # the same prompt with the default (sampling) temperature, or an explicit one: not served, not stored
    for req in (completion(), completion(temperature=0.6), completion(temperature=1e-3)):
        decision = lookup(cache, "completions", req, {}, serving)
        assert decision.result == BYPASS and decision.hit is None and decision.key is None
        decision.finish(Response(response_body(text="sampled"), media_type="application/json"))
    assert len(cache) == 1
    assert sample(registry, metric_names.METRIC_RESPONSE_CACHE_LOOKUPS_TOTAL, result=BYPASS) == 3


def test_no_cache_skips_the_lookup_but_stores_and_no_store_does_neither():
    from starlette.responses import Response

    cache, _, _ = store()
    serving = fake_serving()
    req = completion(temperature=0)
    lookup(cache, "completions", req, {}, serving).finish(Response(response_body("stop", "old"),
                                                                   media_type="application/json"))
    fresh = lookup(cache, "completions", req, {"cache-control": "no-cache"}, serving)
    assert fresh.result == BYPASS and fresh.hit is None
    fresh.finish(Response(response_body("stop", "new"), media_type="application/json"))
    assert b'"new"' in bytes(lookup(cache, "completions", req, {}, serving).hit.body)  # refreshed
    nostore = lookup(cache, "completions", req, {"cache-control": "no-store"}, serving)
    assert nostore.result == BYPASS and nostore.hit is None
    nostore.finish(Response(response_body("stop", "never"), media_type="application/json"))
    assert b'"new"' in bytes(lookup(cache, "completions", req, {}, serving).hit.body)


def test_streams_bypass_and_incomplete_or_failed_answers_are_not_stored():
    from starlette.responses import JSONResponse, Response, StreamingResponse

    cache, _, _ = store()
    serving = fake_serving()
    stream = lookup(cache, "completions", completion(temperature=0, stream=True), {}, serving)
    assert stream.result == BYPASS
    req = completion(temperature=0)
    for response in (JSONResponse({"error": {"message": "busy"}}, status_code=429),
                     Response(response_body(finish_reason="abort"), media_type="application/json"),
                     Response(b"not json", media_type="application/json"),
                     StreamingResponse(iter([b"data: [DONE]\n\n"]))):
        decision = lookup(cache, "completions", req, {}, serving)
        assert decision.result == MISS
        decision.finish(response)
        assert response.headers["x-distillery-cache"] == MISS
    assert len(cache) == 0


def test_with_the_cache_off_nothing_is_labelled():
    from starlette.responses import Response

    decision = lookup(None, "completions", completion(temperature=0), {}, fake_serving())
    response = Response(response_body(), media_type="application/json")
    decision.finish(response)
    assert decision.hit is None and "x-distillery-cache" not in response.headers
