"""engine.py's step scheduling: a token budget per step (max_num_batched_tokens) shared by the decoding
sequences (one token each) and prompt chunks (oldest prefilling request first).

A decoding stream gets a token every step while a long prompt prefills beside it; no step spends more than
the budget; with nothing decoding a prompt takes the whole budget; chunked and unchunked prefill give the
same greedy tokens.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from types import SimpleNamespace

import pytest

from model_runtime.engine import Engine, EngineConfig, SamplingParams
from model_runtime.loader import load_model

LONG = [151646] + [100 + (i * 37) % 5000 for i in range(299)]  # 300 prompt tokens
SHORT = [151646, 151644, 9707, 1879, 151645]


@pytest.fixture(scope="module")
def loaded(tiny_qwen2_dir):
    return load_model(tiny_qwen2_dir)


class StepLog:
    """Per engine step: the decode rows (request ids) and the prompt chunks (request id, tokens) it ran."""

    def __init__(self, engine: Engine) -> None:
        self.steps: list[dict] = []
        self.lock = threading.Lock()
        step, prefill, decode, mixed = engine._step, engine._prefill_chunk, engine._decode, engine._decode_with_chunks

        def logged_step():
            with self.lock:
                self.steps.append({"decode": [], "prefill": []})
            step()

        def logged_prefill(req, tokens):
            before = req.pos
            prefill(req, tokens)
            self.steps[-1]["prefill"].append((req.id, req.pos - before))

        def logged_decode(reqs):
            self.steps[-1]["decode"].extend(r.id for r in reqs)
            decode(reqs)

        def logged_mixed(reqs, chunks):  # one forward: decode rows and prompt chunks
            before = [r.pos for r, _ in chunks]
            mixed(reqs, chunks)
            self.steps[-1]["decode"].extend(r.id for r in reqs)
            self.steps[-1]["prefill"].extend((r.id, r.pos - p) for (r, _), p in zip(chunks, before, strict=True))
            self.steps[-1]["riding"] = [r.id for r, _ in chunks]

        engine._step, engine._prefill_chunk, engine._decode = logged_step, logged_prefill, logged_decode
        engine._decode_with_chunks = logged_mixed


def start(loaded, **config) -> tuple[Engine, StepLog]:
    engine = Engine(loaded, EngineConfig(**{"max_batch_size": 4, "max_model_len": 512, **config}))
    log = StepLog(engine)
    engine.start()
    return engine, log


async def tokens_of(engine: Engine, prompt: list[int], params: SamplingParams, rid: str,
                    seen: asyncio.Event | None = None, after: int = 0) -> list[int]:
    out: list[int] = []
    async for ev in engine.generate(prompt, params, rid):
        if ev.token_id is not None:
            out.append(ev.token_id)
        if seen is not None and len(out) >= after:
            seen.set()
    return out


def test_a_decoding_stream_gets_a_token_every_step_while_a_long_prompt_prefills(loaded):
    budget = 16
    engine, log = start(loaded, max_num_batched_tokens=budget)
    try:
        async def main():
            decoding = asyncio.Event()
            stream = asyncio.create_task(tokens_of(
                engine, SHORT, SamplingParams(max_tokens=80, temperature=0.0, ignore_eos=True), "stream",
                decoding, after=2))
            await decoding.wait()
            long = await tokens_of(engine, LONG, SamplingParams(max_tokens=2, temperature=0.0), "long")
            return await stream, long

        stream, long = asyncio.run(main())
    finally:
        engine.stop()
    assert len(stream) == 80 and len(long) >= 1
    long_steps = [s for s in log.steps if any(rid == "long" for rid, _ in s["prefill"])]
    # 300 prompt tokens at (budget - 1 decoding row) per step: not one big forward
    assert len(long_steps) == -(-len(LONG) // (budget - 1))
    for s in long_steps:
        assert "stream" in s["decode"]  # the stream kept getting its token in every one of those steps
        assert len(s["decode"]) + sum(n for _, n in s["prefill"]) <= budget
    assert sum(n for s in long_steps for rid, n in s["prefill"] if rid == "long") == len(LONG)
    # every chunk rode in the stream's decode forward (one read of the weights), the prompt's last too: its first
    # token came from that forward's logits, with no forward of its own
    assert [s.get("riding") for s in long_steps] == [["long"]] * len(long_steps)
    for s in log.steps:
        assert len(s["decode"]) + sum(n for _, n in s["prefill"]) <= budget


@pytest.mark.parametrize("budget", [16, 200])
def test_with_nothing_decoding_a_prompt_goes_prefill_chunk_tokens_a_step(loaded, budget):
    """No inter-token latency to protect: the budget is max(max_num_batched_tokens, prefill_chunk)."""
    engine, log = start(loaded, max_num_batched_tokens=budget, prefill_chunk=128)
    try:
        asyncio.run(tokens_of(engine, LONG, SamplingParams(max_tokens=1, temperature=0.0), "alone"))
    finally:
        engine.stop()
    chunks = [n for s in log.steps for _, n in s["prefill"]]
    assert chunks == [128, 128, 44]


def test_prefill_chunk_still_caps_one_requests_share(loaded):
    engine, log = start(loaded, max_num_batched_tokens=128, prefill_chunk=50)
    try:
        asyncio.run(tokens_of(engine, LONG, SamplingParams(max_tokens=1, temperature=0.0), "capped"))
    finally:
        engine.stop()
    assert [n for s in log.steps for _, n in s["prefill"]] == [50] * 6


def test_prefilling_requests_share_a_step_oldest_first(loaded):
    """The plan itself (no forward): what the decoding rows leave goes to the oldest prompt, then the next."""
    engine = Engine(loaded, EngineConfig(max_batch_size=4, max_model_len=512, max_num_batched_tokens=20,
                                         prefill_chunk=25))
    old, new, newest = (SimpleNamespace(prompt=[1] * n, pos=p) for n, p in ((10, 4), (30, 0), (5, 0)))
    engine._prefilling = [old, new, newest]
    assert engine._prefill_plan(decoding=2) == [(old, 6), (new, 12)]
    assert engine._prefill_plan(decoding=1) == [(old, 6), (new, 13)]
    # nothing decoding: max(budget, prefill_chunk) = 25 tokens in all, each request at most prefill_chunk
    assert engine._prefill_plan(decoding=0) == [(old, 6), (new, 19)]
    engine.config.prefill_chunk = 12
    assert engine._prefill_plan(decoding=0) == [(old, 6), (new, 12), (newest, 2)]
    # decoding rows over the budget: the oldest prompt still moves (one token), nobody waits forever
    assert engine._prefill_plan(decoding=25) == [(old, 1)]


def test_a_long_prompt_takes_a_few_tokens_a_step_beside_decoding_streams(loaded):
    """While sequences decode, a prompt over long_prefill_token_threshold tokens takes at most
    long_prefill_step_tokens a step (their steps stay near decoding alone); a short prompt behind it still gets the
    rest of the budget; with nothing decoding the long prompt goes prefill_chunk tokens; threshold 0: no cap."""
    engine = Engine(loaded, EngineConfig(max_batch_size=4, max_model_len=4096, max_num_batched_tokens=64,
                                         prefill_chunk=512, long_prefill_token_threshold=512,
                                         long_prefill_step_tokens=8))
    long, short = (SimpleNamespace(prompt=[1] * n, pos=0) for n in (2000, 256))
    engine._prefilling = [long, short]
    assert engine._prefill_plan(decoding=4) == [(long, 8), (short, 52)]
    assert engine._prefill_plan(decoding=0) == [(long, 512)]
    engine._prefilling = [short, long]
    assert engine._prefill_plan(decoding=4) == [(short, 60)]
    exactly = SimpleNamespace(prompt=[1] * 512, pos=0)  # at the threshold: not long
    engine._prefilling = [exactly]
    assert engine._prefill_plan(decoding=4) == [(exactly, 60)]
    engine.config.long_prefill_token_threshold = 0
    engine._prefilling = [long, short]
    assert engine._prefill_plan(decoding=4) == [(long, 60)]


def test_a_long_prompt_fills_the_batch_kernels_row_tile_unless_its_step_tokens_are_set(loaded, monkeypatch):
    """long_prefill_step_tokens None: where the plan's batch kernels take rows a tile at a time (decode_row_tile 8),
    a long prompt takes the rows that fill the step's last tile (decode rows and earlier prompts' chunks counted), a
    tile more when that is under half of one, kept below the rows from which the step runs on the prompt GEMM
    (prefill_min_rows); the default 8 where no half tile fits below them, where there is no tile, and with nothing
    decoding no cap; set, long_prefill_step_tokens is the cap."""
    def engine_with(**plan_fields):
        monkeypatch.setattr(loaded, "plan", dataclasses.replace(loaded.plan, **plan_fields))
        return Engine(loaded, EngineConfig(max_batch_size=4, max_model_len=4096, max_num_batched_tokens=64,
                                           prefill_chunk=512, long_prefill_token_threshold=512))

    long, other, short = (SimpleNamespace(prompt=[1] * n, pos=0) for n in (2000, 1500, 20))

    def taken(engine, decoding, prompts=(long,)):
        engine._prefilling = list(prompts)
        return [n for _, n in engine._prefill_plan(decoding=decoding)]

    tiles = engine_with(decode_row_tile=8, prefill_kernel="none", prefill_min_rows=0)
    assert {d: taken(tiles, d)[0] for d in (1, 3, 4, 5, 7, 8, 13)} == {1: 7, 3: 5, 4: 4, 5: 11, 7: 9, 8: 8, 13: 11}
    assert taken(tiles, 4, (long, other)) == [4, 8]  # the second fills a tile of its own
    assert taken(tiles, 0) == [512]  # nothing decoding: no cap
    gemm = engine_with(decode_row_tile=8, prefill_kernel="int8vnni", prefill_min_rows=16)
    assert {d: taken(gemm, d)[0] for d in (1, 4, 5, 7, 8, 12, 15, 20)} == \
        {1: 7, 4: 4, 5: 10, 7: 8, 8: 7, 12: 8, 15: 8, 20: 8}
    assert taken(gemm, 4, (long, other)) == [4, 7]
    assert taken(gemm, 4, (short, long)) == [20, 8]  # 24 rows: on the prompt GEMM whatever the long prompt takes
    assert taken(engine_with(decode_row_tile=0, prefill_kernel="none", prefill_min_rows=0), 4) == [8]
    explicit = engine_with(decode_row_tile=8, prefill_kernel="none", prefill_min_rows=0)
    explicit.config.long_prefill_step_tokens = 6
    assert taken(explicit, 4) == [6]


def test_chunked_and_unchunked_prefill_give_the_same_greedy_tokens(loaded):
    outputs = []
    for budget in (7, 512):  # 7: every prompt in 7-token chunks (riding with decode rows when there are some)
        engine, _ = start(loaded, max_num_batched_tokens=budget, prefill_chunk=budget)
        try:
            async def main(engine: Engine):
                params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
                return await asyncio.gather(tokens_of(engine, LONG, params, "a"),
                                            tokens_of(engine, SHORT, params, "b"),
                                            tokens_of(engine, LONG[:97], params, "c"))

            outputs.append(asyncio.run(main(engine)))
        finally:
            engine.stop()
    assert outputs[0] == outputs[1]
    assert all(len(t) == 12 for t in outputs[0])
