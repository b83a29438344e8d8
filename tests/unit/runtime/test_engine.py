"""engine.py: continuous batching on the tiny model (bf16, the serving default).

Batched and one-at-a-time greedy generation agree; joining a running batch changes nobody's
output; cancelled/timed-out requests free their slots; a full queue raises QueueFullError; a
request with NaN logits (or whose step raises) fails alone and the engine keeps serving.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from model_runtime import engine as engine_module
from model_runtime import sampling
from model_runtime.engine import Engine, EngineConfig, GenerationError, QueueFullError, SamplingParams
from model_runtime.loader import load_model
from tests.cpu_kernels import needs_cpu_kernels

PROMPTS = [[151646, 151644, 9707, 1879, 151645], [151646, 100, 200, 300, 400, 500, 600, 700], [151646, 42]]


@pytest.fixture(scope="module")
def loaded(tiny_qwen2_dir):
    return load_model(tiny_qwen2_dir)


@pytest.fixture
def make_engine(loaded):
    engines = []

    def make(**kw) -> Engine:
        engine = Engine(loaded, EngineConfig(**{"max_batch_size": 4, "max_model_len": 256, **kw}))
        engine.start()
        engines.append(engine)
        return engine

    yield make
    for e in engines:
        e.stop()


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


async def collect(engine: Engine, prompt, params, rid: str, events: list | None = None):
    tokens, last = [], None
    async for ev in engine.generate(prompt, params, rid):
        if events is not None:
            events.append(ev)
        if ev.token_id is not None:
            tokens.append(ev.token_id)
        last = ev
    return tokens, last.finish_reason


async def wait_for(pred, limit_s: float = 10.0) -> None:
    deadline = time.monotonic() + limit_s
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def test_batched_greedy_equals_one_at_a_time(make_engine):
    engine = make_engine()

    async def main():
        single = [await collect(engine, p, greedy(16), f"s{i}") for i, p in enumerate(PROMPTS)]
        batched = await asyncio.gather(*(collect(engine, p, greedy(16), f"b{i}") for i, p in enumerate(PROMPTS)))
        return single, batched

    single, batched = asyncio.run(main())
    assert single == list(batched)
    assert all(reason == "length" and len(toks) == 16 for toks, reason in single)
    assert engine.stats.running == 0 and engine.stats.queue_depth == 0


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_batched_greedy_equals_one_at_a_time_on_quantized_weights(tiny_qwen2_dir, method):
    """The serving path for int8/int4 on CPU (integer kernels, fused decode): a batch changes no one's tokens."""
    quantized = load_model(tiny_qwen2_dir, quantization=method, group_size=32)
    engine = Engine(quantized, EngineConfig(max_batch_size=4, max_model_len=256))
    engine.start()
    try:
        async def main():
            single = [await collect(engine, p, greedy(12), f"s{i}") for i, p in enumerate(PROMPTS)]
            batched = await asyncio.gather(*(collect(engine, p, greedy(12), f"b{i}") for i, p in enumerate(PROMPTS)))
            return single, batched

        single, batched = asyncio.run(main())
    finally:
        engine.stop()
    assert single == list(batched)
    assert all(len(toks) == 12 for toks, _ in single)


@needs_cpu_kernels
def test_compile_is_not_applied_to_the_fused_cpu_decode_step(tiny_qwen2_dir):
    quantized = load_model(tiny_qwen2_dir, quantization="int8")
    assert quantized.model.fused_decode
    assert Engine(quantized, EngineConfig(compile=True)).compiled is False


def test_joining_a_running_batch_changes_no_output(make_engine):
    engine = make_engine()

    async def main():
        alone_a = await collect(engine, PROMPTS[0], greedy(24), "a0")
        alone_b = await collect(engine, PROMPTS[1], greedy(8), "b0")
        events: list = []
        task_a = asyncio.create_task(collect(engine, PROMPTS[0], greedy(24), "a1", events))
        await wait_for(lambda: len(events) >= 6)  # b joins while a is mid-generation
        b = await collect(engine, PROMPTS[1], greedy(8), "b1")
        return alone_a, alone_b, await task_a, b

    alone_a, alone_b, a, b = asyncio.run(main())
    assert a == alone_a and b == alone_b


def test_cancelled_request_frees_its_slot(make_engine):
    engine = make_engine(max_batch_size=1)

    async def main():
        agen = engine.generate(PROMPTS[0], greedy(200), "long")
        first = await agen.__anext__()
        assert first.token_id is not None and engine.stats.running == 1
        await agen.aclose()  # the client went away
        # the only slot is free again: the next request runs to completion
        toks, reason = await asyncio.wait_for(collect(engine, PROMPTS[1], greedy(4), "next"), 20)
        assert reason == "length" and len(toks) == 4
        engine.abort("unknown-id")  # harmless

    asyncio.run(main())
    assert engine.stats.running == 0 and engine._free_slots == [0]


def test_abort_by_id_and_timeout_free_slots(make_engine):
    engine = make_engine(max_batch_size=2, request_timeout_s=0.5)
    engine.logits_hook = lambda logits, ids: time.sleep(0.02)  # ~50 tokens/s: the timeout hits first

    async def main():
        task = asyncio.create_task(collect(engine, PROMPTS[0], greedy(200), "victim"))
        timed = asyncio.create_task(collect(engine, PROMPTS[1], greedy(200), "slow"))
        await wait_for(lambda: engine.stats.running == 2)
        engine.abort("victim")
        return await task, await timed

    (victim_toks, victim_reason), (slow_toks, slow_reason) = asyncio.run(main())
    assert victim_reason == "abort"
    assert slow_reason == "timeout" and 0 < len(slow_toks) < 200
    assert engine.stats.running == 0 and sorted(engine._free_slots) == [0, 1]


def test_full_queue_raises_queue_full_error(make_engine):
    engine = make_engine(max_batch_size=1, max_queue=1)
    engine.logits_hook = lambda logits, ids: time.sleep(0.01)

    async def main():
        running = asyncio.create_task(collect(engine, PROMPTS[0], greedy(50), "r"))
        await wait_for(lambda: engine.stats.running == 1)
        waiting = asyncio.create_task(collect(engine, PROMPTS[1], greedy(3), "w"))
        await wait_for(lambda: len(engine._waiting) == 1)
        with pytest.raises(QueueFullError) as info:
            await collect(engine, PROMPTS[2], greedy(3), "rejected")
        assert info.value.retry_after_s >= 1.0
        return await running, await waiting

    (r, r_reason), (w, w_reason) = asyncio.run(main())
    assert (r_reason, w_reason) == ("length", "length") and len(r) == 50 and len(w) == 3


def test_requests_arriving_together_at_free_slots_are_not_counted_as_queued(make_engine):
    """Batch 1 + queue 1 holds two requests even when both arrive before the engine thread admits the
    first (it cannot while the test holds the engine's lock); the third is refused."""
    engine = make_engine(max_batch_size=1, max_queue=1)
    events: dict[str, list] = {"a": [], "b": []}
    with engine._lock:
        engine.submit(PROMPTS[0], greedy(3), "a", events["a"].append)
        engine.submit(PROMPTS[1], greedy(3), "b", events["b"].append)
        with pytest.raises(QueueFullError):
            engine.submit(PROMPTS[2], greedy(3), "c", lambda ev: None)
    deadline = time.monotonic() + 10
    while not all(evs and evs[-1].finish_reason for evs in events.values()):
        assert time.monotonic() < deadline, events
        time.sleep(0.01)
    assert [evs[-1].finish_reason for evs in events.values()] == ["length", "length"]


def test_poisoned_request_fails_alone(make_engine):
    engine = make_engine()

    def poison(logits, ids):
        if "bad" in ids:
            logits[ids.index("bad")] = float("nan")

    async def main():
        clean = await asyncio.gather(*(collect(engine, p, greedy(10), f"c{i}") for i, p in enumerate(PROMPTS)))
        engine.logits_hook = poison
        results = await asyncio.gather(
            collect(engine, PROMPTS[0], greedy(10), "ok0"), collect(engine, PROMPTS[1], greedy(10), "bad"),
            collect(engine, PROMPTS[2], greedy(10), "ok2"))
        engine.logits_hook = None
        after = await collect(engine, PROMPTS[1], greedy(10), "after")  # the slot was cleaned
        return clean, results, after

    clean, (ok0, bad, ok2), after = asyncio.run(main())
    assert bad == ([], "error")
    assert ok0 == clean[0] and ok2 == clean[2] and after == clean[1]


def test_an_exception_in_a_step_fails_that_batch_and_the_engine_survives(make_engine):
    engine = make_engine()
    calls = {"n": 0}

    def explode_once(logits, ids):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")

    engine.logits_hook = explode_once

    async def main():
        failed = await collect(engine, PROMPTS[0], greedy(5), "x")
        ok = await collect(engine, PROMPTS[0], greedy(5), "y")
        return failed, ok

    failed, ok = asyncio.run(main())
    assert failed == ([], "error") and ok[1] == "length" and len(ok[0]) == 5
    assert engine._thread is not None and engine._thread.is_alive()


def test_stop_tokens_seeds_and_bad_prompts(make_engine, loaded):
    engine = make_engine()

    async def main():
        ref, _ = await collect(engine, PROMPTS[1], greedy(6), "ref")
        cut = next(i for i in range(1, 6) if ref[i] not in ref[:i])  # first new token after the first
        stopped = await collect(engine, PROMPTS[1], greedy(6, stop_token_ids=[ref[cut]]), "stop")
        sampled = [await collect(engine, PROMPTS[1], SamplingParams(8, temperature=1.0, top_p=0.9, seed=7), f"s{i}")
                   for i in range(2)]
        other = await collect(engine, PROMPTS[1], SamplingParams(8, temperature=1.0, top_p=0.9, seed=8), "s8")
        with pytest.raises(GenerationError, match="empty"):
            await collect(engine, [], greedy(3), "empty")
        with pytest.raises(GenerationError, match="context"):
            await collect(engine, [1] * 300, greedy(3), "long")
        near_end = await collect(engine, [151646] * 250, greedy(50), "edge")
        return (ref, cut), stopped, sampled, other, near_end

    (ref, cut), stopped, sampled, other, near_end = asyncio.run(main())
    # a user stop id ends the request with "stop" and is not emitted (eos ids are)
    assert stopped == (ref[:cut], "stop")
    assert sampled[0] == sampled[1] and sampled[0] != other
    assert near_end[1] == "length" and len(near_end[0]) == 256 - 250
    assert engine.eos_ids == set(loaded.eos_token_ids)


def test_stats_and_metrics(loaded):
    seen = []

    class Metrics:
        def observe_step(self, stats):
            seen.append((stats.running, stats.kv_cache_usage))

    engine = Engine(loaded, EngineConfig(max_batch_size=2, max_model_len=128), metrics=Metrics())
    engine.start()
    try:
        toks, _ = asyncio.run(collect(engine, PROMPTS[0], greedy(20), "m"))
    finally:
        engine.stop()
    assert len(toks) == 20 and seen and max(r for r, _ in seen) == 1
    assert 0 < max(u for _, u in seen) <= (len(PROMPTS[0]) + 20) / (2 * 128)
    assert engine.stats.tokens_per_s > 0  # also right after a burst shorter than RATE_MIN_SPAN_S
    assert torch.get_num_threads() >= 1


def test_tokens_per_second_drains_to_zero_when_idle(loaded, monkeypatch):
    """The autoscaler reads tokens/s: an idle engine must not keep reporting its last busy rate."""
    monkeypatch.setattr(engine_module, "RATE_WINDOW_S", 0.3)
    engine = Engine(loaded, EngineConfig(max_batch_size=2, max_model_len=128))
    engine.start()
    try:
        asyncio.run(collect(engine, PROMPTS[0], greedy(10), "busy"))
        assert engine.stats.tokens_per_s > 0
        deadline = time.monotonic() + 5  # the idle engine wakes once a second
        while engine.stats.tokens_per_s > 0:
            assert time.monotonic() < deadline, engine.stats
            time.sleep(0.05)
    finally:
        engine.stop()


def test_tokens_in_flight_cap_holds_requests_back(make_engine):
    """Two requests of 5 + 20 tokens each under a 30-token cap run one after the other."""
    engine = make_engine(max_tokens_in_flight=30)
    peak = {"running": 0}

    def watch(logits, ids):
        peak["running"] = max(peak["running"], len(ids))

    engine.logits_hook = watch

    async def main():
        return await asyncio.gather(*(collect(engine, PROMPTS[0], greedy(20), f"cap{i}") for i in range(2)))

    (a, ra), (b, rb) = asyncio.run(main())
    assert ra == rb == "length" and a == b and peak["running"] == 1


# ratio 1: only the most likely token passes _likely's test (too little mass), so the nucleus is looked for by top-k:
# 4: the nucleus (3 tokens) found among fewer candidates than the vocabulary (6): the top-k path;
# 2: the nucleus is wider than the candidates: the full-sort fallback; 1024: more candidates than tokens;
# ratio 1e-6: every token is likely enough, and (candidates 1024) few enough: _likely's path; (candidates 2) too many.
# Draw block 1: a draw over the 6 tokens goes block by block (_draw's two steps); 128: one cumulative sum
@pytest.mark.parametrize(("candidates", "ratio", "block"), [(4, 1.0, 128), (2, 1.0, 128), (1024, 1.0, 128),
                                                           (1024, 1e-6, 128), (2, 1e-6, 128), (1024, 1e-6, 1)])
def test_sampling_draws_from_the_exact_nucleus_distribution(monkeypatch, candidates, ratio, block):
    """Temperature + top_p: tokens outside the nucleus never come up, the others at their renormalised
    probabilities (20,000 draws, 4 sigma), whichever way the nucleus is found and the number drawn against."""
    monkeypatch.setattr(sampling, "NUCLEUS_CANDIDATES", candidates)
    monkeypatch.setattr(sampling, "NUCLEUS_RATIO", ratio)
    monkeypatch.setattr(sampling, "DRAW_BLOCK", block)
    logits = torch.tensor([2.0, 0.5, 3.0, -1.0, 1.0, 0.0])
    temperature, top_p = 0.8, 0.9
    probs = torch.softmax(logits / temperature, dim=-1)
    order = torch.argsort(probs, descending=True)
    cum = torch.cumsum(probs[order], dim=0)
    nucleus = order[: int((cum - probs[order] < top_p).sum())].tolist()
    expected = torch.zeros_like(probs)
    expected[nucleus] = probs[nucleus] / probs[nucleus].sum()
    assert 2 < len(nucleus) < len(logits)  # the case is not trivial
    g = torch.Generator().manual_seed(0)
    n = 20_000
    counts = torch.bincount(torch.tensor([sampling._sample(logits, temperature, top_p, g) for _ in range(n)]),
                            minlength=len(logits)).double()
    assert all(counts[i] == 0 for i in range(len(logits)) if i not in nucleus)
    sigma = (expected * (1 - expected) / n).sqrt()
    assert ((counts / n - expected).abs() <= 4 * sigma + 1e-9).all(), (counts / n, expected)
    # top_p = 1: the whole softmax
    full = torch.bincount(torch.tensor([sampling._sample(logits, temperature, 1.0, g) for _ in range(n)]),
                          minlength=len(logits)).double() / n
    assert ((full - probs).abs() <= 4 * (probs * (1 - probs) / n).sqrt() + 1e-9).all()
