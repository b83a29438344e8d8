"""The response cache on the real runtime (`python -m model_runtime --response_cache_max_entries=...` on the
tiny model, through tests/live_runtime.py): a deterministic request misses then hits with the same answer
and a new id; a sampling request (the model's generation_config samples at 0.6) is never served from the
cache; Cache-Control: no-cache skips the lookup; streams bypass; /metrics counts every outcome."""

from __future__ import annotations

import time

import httpx
import pytest

from distillery_contract import flags, metric_names
from model_runtime.response_cache import BYPASS, CACHE_HEADER, HIT, MISS
from tests.live_runtime import live_runtime

pytestmark = pytest.mark.integration

MODEL = "tiny-r1-cached"


@pytest.fixture(scope="module")
def base(tiny_qwen2_dir, tmp_path_factory):
    extra = [f"{flags.FLAG_MAX_MODEL_LEN}=256", f"{flags.FLAG_RESPONSE_CACHE_MAX_ENTRIES}=16",
             f"{flags.FLAG_RESPONSE_CACHE_TTL_S}=600"]
    with live_runtime(tiny_qwen2_dir, MODEL, tmp_path_factory.mktemp("runtime") / "server.log", extra) as url:
        yield url


def lookups(base: str, result: str) -> float:
    text = httpx.get(f"{base}{flags.METRICS_PATH}", timeout=5).text
    name = metric_names.METRIC_RESPONSE_CACHE_LOOKUPS_TOTAL
    for line in text.splitlines():
        if line.startswith(name + "{") and f'result="{result}"' in line and f'model_name="{MODEL}"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{{result={result}}} not exported")


def post(base: str, path: str, body: dict, **headers: str) -> httpx.Response:
    response = httpx.post(f"{base}/v1/{path}", json={"model": MODEL, **body}, headers=headers, timeout=60)
    assert response.status_code == 200, response.text
    return response


def test_a_greedy_completion_misses_then_hits_with_the_same_answer(base):
    before = {r: lookups(base, r) for r in (HIT, MISS)}
    body = {"prompt": "The capital of France is", "max_tokens": 24, "temperature": 0}
    started = time.perf_counter()
    first = post(base, "completions", body)
    miss_s = time.perf_counter() - started
    started = time.perf_counter()
    second = post(base, "completions", body)
    hit_s = time.perf_counter() - started
    assert (first.headers[CACHE_HEADER], second.headers[CACHE_HEADER]) == (MISS, HIT)
    a, b = first.json(), second.json()
    assert a["choices"] == b["choices"] and a["usage"] == b["usage"]
    assert a["id"] != b["id"] and b["id"].startswith("cmpl-")
    assert {r: lookups(base, r) - before[r] for r in (HIT, MISS)} == {HIT: 1, MISS: 1}
    print(f"\nresponse cache on the tiny model: miss {miss_s * 1000:.1f} ms, hit {hit_s * 1000:.1f} ms")
    # any sampling field that differs is another answer
    assert post(base, "completions", {**body, "max_tokens": 23}).headers[CACHE_HEADER] == MISS
    assert post(base, "completions", {**body, "stop": ["\n"]}).headers[CACHE_HEADER] == MISS


def test_chat_with_a_seed_is_cached_but_sampling_without_one_never_is(base):
    seeded = {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 16, "temperature": 0.9,
              "seed": 1234}
    first, second = post(base, "chat/completions", seeded), post(base, "chat/completions", seeded)
    assert (first.headers[CACHE_HEADER], second.headers[CACHE_HEADER]) == (MISS, HIT)
    assert first.json()["choices"] == second.json()["choices"]
    # the same conversation without a seed samples (temperature 0.9, or the model's default 0.6): bypass,
    # and the engine answers it every time
    before = lookups(base, BYPASS)
    for body in ({k: v for k, v in seeded.items() if k != "seed"},
                 {k: v for k, v in seeded.items() if k not in ("seed", "temperature")}):
        assert post(base, "chat/completions", body).headers[CACHE_HEADER] == BYPASS
    assert lookups(base, BYPASS) - before == 2


def test_no_cache_skips_the_lookup_and_streams_bypass(base):
    body = {"prompt": "One, two, three,", "max_tokens": 8, "temperature": 0}
    assert post(base, "completions", body).headers[CACHE_HEADER] == MISS
    assert post(base, "completions", body, **{"Cache-Control": "no-cache"}).headers[CACHE_HEADER] == BYPASS
    assert post(base, "completions", body).headers[CACHE_HEADER] == HIT
    with httpx.stream("POST", f"{base}/v1/completions", json={"model": MODEL, **body, "stream": True},
                      timeout=60) as stream:
        assert stream.status_code == 200 and stream.headers[CACHE_HEADER] == BYPASS
        events = [line for line in stream.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    stored = httpx.get(f"{base}{flags.METRICS_PATH}", timeout=5).text
    assert f'{metric_names.METRIC_RESPONSE_CACHE_ENTRIES}{{model_name="{MODEL}"}}' in stored
