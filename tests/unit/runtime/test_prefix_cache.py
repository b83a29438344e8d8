"""prefix_cache.py and the engine's automatic prefix caching.

The block store alone: chained keys, exact look-ups (a hash collision is a miss, never another prefix's
keys), at least one prompt token left to compute, reference counts (a parent outlives its cached
children), least-recently-used eviction, copies that are bit-exact. The engine on the tiny model: greedy
tokens identical and first-token logits within float tolerance with the cache on and off, for requests
sharing a prefix alone, in a mixed batch, and with a pool too small for them (evictions); a prompt that
is wholly cached still gets its correct first token.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from model_runtime.engine import Engine, EngineConfig, SamplingParams
from model_runtime.loader import load_model
from model_runtime.prefix_cache import PrefixCache, block_bytes

BS = 4  # tokens per block in the unit tests
LAYERS, KV_HEADS, HEAD_DIM, SLOTS, MAX_LEN = 2, 2, 3, 3, 32


def make_cache(capacity: int) -> PrefixCache:
    return PrefixCache(n_layers=LAYERS, n_kv_heads=KV_HEADS, head_dim=HEAD_DIM, dtype=torch.float32, device="cpu",
                       block_size=BS, capacity_blocks=capacity)


def make_slots(seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Engine-shaped caches ([slots, kv heads, max_len, head dim] per layer) full of distinct values."""
    g = torch.Generator().manual_seed(seed)
    shape = (SLOTS, KV_HEADS, MAX_LEN, HEAD_DIM)
    return ([torch.randn(shape, generator=g) for _ in range(LAYERS)],
            [torch.randn(shape, generator=g) for _ in range(LAYERS)])


def test_stored_blocks_load_bit_exact_into_another_slot():
    pc = make_cache(8)
    k, v = make_slots()
    prompt = list(range(100, 111))  # 11 tokens: 2 full blocks stored, the partial third is not
    assert pc.store(prompt, k, v, slot=0) == 2
    assert pc.stats.blocks == 2
    chain = pc.match(prompt + [7, 7], max_tokens=12)
    assert len(chain) == 2
    assert pc.load(chain, k, v, slot=2) == 2 * BS
    for layer in range(LAYERS):
        assert torch.equal(k[layer][2, :, :8], k[layer][0, :, :8])
        assert torch.equal(v[layer][2, :, :8], v[layer][0, :, :8])
        assert not torch.equal(k[layer][2, :, 8:9], k[layer][0, :, 8:9])  # nothing past the blocks written
    assert pc.store(prompt, k, v, slot=0) == 0  # already cached: nothing copied again


def test_lookup_follows_the_chain_and_leaves_a_token_to_compute():
    pc = make_cache(8)
    k, v = make_slots()
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    pc.store(prompt, k, v, slot=0)
    assert len(pc.match(prompt, max_tokens=len(prompt) - 1)) == 2     # never the whole prompt
    assert len(pc.match(prompt + [13], max_tokens=12)) == 3
    assert len(pc.match([1, 2, 3, 4, 5, 6, 0, 8, 9, 10, 11, 12, 13], max_tokens=12)) == 1  # 2nd block differs
    assert len(pc.match([5, 6, 7, 8, 1, 2, 3, 4, 9], max_tokens=8)) == 0  # same tokens, other position
    assert pc.match([9, 2, 3, 4, 5, 6, 7, 8, 9], max_tokens=8) == []      # the first block differs
    s = pc.stats
    assert (s.queries, s.hits, s.hit_tokens) == (5, 3, 8 + 12 + 4)
    assert s.query_tokens == 12 + 13 + 13 + 9 + 9


def test_a_hash_collision_is_a_miss_never_another_prefix(monkeypatch):
    monkeypatch.setattr(PrefixCache, "_key", staticmethod(lambda parent, tokens: 42))  # every key collides
    pc = make_cache(8)
    k, v = make_slots()
    pc.store([1, 2, 3, 4, 9], k, v, slot=0)
    assert pc.match([5, 6, 7, 8, 9], max_tokens=4) == []          # same key, other tokens
    assert len(pc.match([1, 2, 3, 4, 9], max_tokens=4)) == 1
    # storing a different prefix under the taken key leaves the cached block alone
    assert pc.store([5, 6, 7, 8, 9], k, v, slot=1) == 0
    chain = pc.match([1, 2, 3, 4, 0], max_tokens=4)
    pc.load(chain, k, v, slot=2)
    assert torch.equal(k[0][2, :, :4], k[0][0, :, :4])


def test_a_child_under_a_colliding_key_of_another_parent_is_a_miss(monkeypatch):
    """Same tokens, same key, but a different parent: a prefix differing only in an earlier block."""
    real_key = PrefixCache._key
    monkeypatch.setattr(PrefixCache, "_key", staticmethod(
        lambda parent, tokens: 7 if tokens == (9, 9, 9, 9) else real_key(parent, tokens)))
    pc = make_cache(8)
    k, v = make_slots()
    pc.store([1, 1, 1, 1, 9, 9, 9, 9], k, v, slot=0)
    pc.store([2, 2, 2, 2], k, v, slot=1)
    assert len(pc.match([2, 2, 2, 2, 9, 9, 9, 9, 0], max_tokens=8)) == 1  # [9,9,9,9] is 1111's child, not 2222's


def test_lru_eviction_spares_recently_used_and_parents_of_cached_children():
    pc = make_cache(3)
    k, v = make_slots()
    a, b, c = [1, 1, 1, 1, 2, 2, 2, 2], [3, 3, 3, 3], [4, 4, 4, 4]
    assert pc.store(a, k, v, 0) == 2
    assert pc.store(b, k, v, 1) == 1                 # full now
    assert len(pc.match(a + [0], 8)) == 2            # a is the most recently used
    assert pc.store(c, k, v, 2) == 1                 # evicts b, the least recently used
    assert pc.match(b + [0], 4) == []
    assert len(pc.match(a + [0], 8)) == 2 and len(pc.match(c + [0], 4)) == 1
    # a's first block is older than c, but it has a cached child: a's leaf goes first, then a's root
    pc.match(c + [0], 4)
    assert pc.store([5, 5, 5, 5], k, v, 0) == 1
    assert len(pc.match(a + [0], 8)) == 1
    assert pc.stats.blocks == 3


def test_a_store_never_evicts_the_chain_it_extends():
    pc = make_cache(2)
    k, v = make_slots()
    pc.store([1, 1, 1, 1], k, v, 0)
    # 3 more blocks wanted, 1 free row: the cached parent is pinned, the new blocks pin each other
    assert pc.store([1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4], k, v, 0) == 1
    chain = pc.match([1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 0], 12)
    assert [b.tokens for b in chain] == [(1, 1, 1, 1), (2, 2, 2, 2)]
    assert pc.load(chain, k, v, 1) == 8 and torch.equal(v[1][1, :, :8], v[1][0, :, :8])


def test_cached_blocks_neither_counts_nor_touches():
    pc = make_cache(2)
    k, v = make_slots()
    pc.store([1, 1, 1, 1], k, v, 0)
    pc.store([2, 2, 2, 2], k, v, 0)
    assert pc.cached_blocks([1, 1, 1, 1, 5], 4) == 1 and pc.cached_blocks([1, 1, 1, 1, 5], 3) == 0
    assert pc.stats.queries == 0
    pc.store([3, 3, 3, 3], k, v, 0)  # [1,1,1,1] stays the least recently used: it goes
    assert pc.cached_blocks([1, 1, 1, 1], 4) == 0 and pc.cached_blocks([2, 2, 2, 2], 4) == 1


def test_block_bytes_and_clear():
    assert block_bytes(24, 2, 64, torch.float32, 16) == 2 * 24 * 2 * 16 * 64 * 4
    pc = make_cache(2)
    k, v = make_slots()
    pc.store([1, 2, 3, 4], k, v, 0)
    pc.clear()
    assert pc.stats.blocks == 0 and pc.match([1, 2, 3, 4, 5], 4) == []
    assert pc.store([1, 2, 3, 4, 5, 6, 7, 8], k, v, 0) == 2


# ---------------------------------------------------------------------------------------- engine level

SHARED = [151646] + [(i * 7919) % 150000 + 100 for i in range(70)]   # 71 tokens: 4 blocks of 16 + 7
TAILS = [[11, 12, 13], [21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38], [41]]


@pytest.fixture(scope="module")
def loaded(tiny_qwen2_dir):
    return load_model(tiny_qwen2_dir)


async def _generate(engine: Engine, prompt: list[int], rid: str, max_tokens: int = 8) -> list[int]:
    tokens = []
    async for ev in engine.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0), rid):
        if ev.token_id is not None:
            tokens.append(ev.token_id)
    return tokens


def _run(loaded, scenario, **config):
    """Run `scenario(engine)` on a fresh engine; returns its result, each request's first-token logits and the
    engine's stats."""
    engine = Engine(loaded, EngineConfig(**{"max_batch_size": 4, "max_model_len": 256, "prefill_chunk": 24,
                                            **config}))
    first_logits: dict[str, torch.Tensor] = {}

    def hook(logits, ids):
        for row, rid in zip(logits, ids, strict=True):
            first_logits.setdefault(rid, row.clone())

    engine.logits_hook = hook
    engine.start()
    try:
        result = asyncio.run(scenario(engine))
    finally:
        engine.stop()
    return result, first_logits, engine.stats


def _same(on, off):
    (res_on, logits_on, stats_on), (res_off, logits_off, _) = on, off
    assert res_on == res_off
    assert logits_on.keys() == logits_off.keys()
    for rid in logits_on:
        torch.testing.assert_close(logits_on[rid], logits_off[rid], rtol=1e-4, atol=1e-4)
    return stats_on


def test_shared_prefix_requests_match_the_cache_off_output(loaded):
    async def scenario(engine):
        return [await _generate(engine, SHARED + tail, f"r{i}") for i, tail in enumerate(TAILS)]

    on = _run(loaded, scenario)
    off = _run(loaded, scenario, enable_prefix_caching=False)
    stats = _same(on, off)
    assert off[2].prefix_cache_capacity_blocks == 0 and off[2].prefix_cache_queries == 0
    # the 2nd and 3rd requests reuse the 4 cached blocks of SHARED
    assert stats.prefix_cache_hits == 2 and stats.prefix_cache_hit_tokens == 2 * 64
    assert stats.prefix_cache_query_tokens == sum(len(SHARED) + len(t) for t in TAILS)
    assert stats.prefix_cache_blocks >= 4 and 0 < stats.prefix_cache_hit_rate < 1


def test_shared_prefix_requests_in_a_mixed_batch_match_the_cache_off_output(loaded):
    other = [151646, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]

    async def scenario(engine):
        first = await _generate(engine, SHARED + TAILS[0], "warm")  # SHARED cached
        # the cached-prefix requests join a batch with an unrelated one that is decoding
        rest = await asyncio.gather(_generate(engine, other, "other", max_tokens=24),
                                    *(_generate(engine, SHARED + t, f"r{i}") for i, t in enumerate(TAILS[1:])))
        return first, rest

    stats = _same(_run(loaded, scenario), _run(loaded, scenario, enable_prefix_caching=False))
    assert stats.prefix_cache_hit_tokens >= 2 * 64


def test_a_prompt_prefilled_beside_a_decoding_request_is_kept_and_reused(loaded):
    """Every chunk of these prompts rides in the decoding request's forward, the last one too (engine._step): its
    prompt is kept from there."""
    other = [151646, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]

    async def scenario(engine):
        decoding = asyncio.Event()

        async def background():
            tokens = []
            params = SamplingParams(max_tokens=150, temperature=0.0, ignore_eos=True)
            async for ev in engine.generate(other, params, "other"):
                if ev.token_id is not None:
                    tokens.append(ev.token_id)
                    decoding.set()
            return tokens

        task = asyncio.create_task(background())
        await decoding.wait()
        first = await _generate(engine, SHARED + TAILS[0], "first")
        second = await _generate(engine, SHARED + TAILS[1], "second")
        assert not task.done()  # both prefilled beside it
        return first, second, await task

    on = _run(loaded, scenario)
    stats = _same(on, _run(loaded, scenario, enable_prefix_caching=False))
    assert stats.prefix_cache_hits == 1 and stats.prefix_cache_hit_tokens == 64


def test_requests_sent_together_wait_for_the_shared_prefix_and_match_the_cache_off_output(loaded):
    """n choices of one prompt, or a question's options, arrive at once: the later ones are admitted once the
    first has prefilled their shared blocks, and copy them."""
    async def scenario(engine):
        return await asyncio.gather(*(_generate(engine, SHARED + t, f"r{i}") for i, t in enumerate(TAILS)),
                                    _generate(engine, SHARED + TAILS[0], "again"))

    stats = _same(_run(loaded, scenario), _run(loaded, scenario, enable_prefix_caching=False))
    assert stats.prefix_cache_hits == 3 and stats.prefix_cache_hit_tokens == 3 * 64


def test_a_pool_too_small_for_the_prompts_evicts_and_stays_correct(loaded):
    prompts = [[151646, 900 + i] + SHARED[2:40] + [i] * 20 for i in range(3)] + [SHARED + TAILS[0]]

    async def scenario(engine):
        out = []
        for round_ in range(2):
            for i, p in enumerate(prompts):
                out.append(await _generate(engine, p, f"r{round_}-{i}", max_tokens=4))
        return out

    cfg = loaded.model.config
    per_block = block_bytes(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, torch.float32, 16)
    on = _run(loaded, scenario, prefix_cache_bytes=5 * per_block)  # 5 blocks; each prompt has 3-4
    stats = _same(on, _run(loaded, scenario, enable_prefix_caching=False))
    assert stats.prefix_cache_capacity_blocks == 5 and stats.prefix_cache_blocks == 5


def test_a_wholly_cached_prompt_still_gets_its_first_token(loaded):
    prompt = SHARED[:64]  # exactly 4 blocks

    async def scenario(engine):
        longer = await _generate(engine, prompt + [5, 6, 7], "longer")  # caches all 4 blocks of `prompt`
        again = await _generate(engine, prompt, "same")               # 3 blocks copied, the 4th computed
        short = await _generate(engine, prompt[:17], "short")         # 1 block copied, 1 token computed
        return longer, again, short

    on = _run(loaded, scenario)
    stats = _same(on, _run(loaded, scenario, enable_prefix_caching=False))
    assert stats.prefix_cache_hit_tokens == 48 + 16


def test_prompt_logprobs_requests_skip_the_lookup(loaded):
    async def scenario(engine):
        await _generate(engine, SHARED, "a")
        params = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=0)
        async for _ in engine.generate(SHARED + [3], params, "scored"):
            pass

    _, _, stats = _run(loaded, scenario)
    assert stats.prefix_cache_queries == 1


def test_the_serving_flags_reach_the_engine(tiny_qwen2_dir, loaded):
    from prometheus_client import CollectorRegistry

    from distillery_contract import metric_names
    from model_runtime.__main__ import build_parser, options_from_args
    from model_runtime.metrics import RuntimeMetrics
    from model_runtime.server import DistilleryModel

    base = ["--model_name", "m", "--model_dir", str(tiny_qwen2_dir), "--max_model_len", "128"]
    o = options_from_args(build_parser().parse_args(base))
    assert (o.enable_prefix_caching, o.prefix_cache_bytes) == (True, None)
    with pytest.raises(SystemExit):
        build_parser().parse_args([*base, "--prefix_cache_bytes", "0"])
    off = options_from_args(build_parser().parse_args([*base, "--enable_prefix_caching=false"]))
    assert off.enable_prefix_caching is False
    cfg = loaded.model.config
    per_block = block_bytes(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, torch.float32, 16)
    o = options_from_args(build_parser().parse_args([*base, "--prefix_cache_bytes", str(10 * per_block + 1)]))
    registry = CollectorRegistry()
    served = DistilleryModel(o, metrics=RuntimeMetrics("m", registry))
    try:
        assert served.load()  # its warm-up request went through the engine
        assert served.generator.prefix_cache.capacity == 10
        served.generator._update_stats(step=False)
        sample = registry.get_sample_value
        assert sample(metric_names.METRIC_PREFIX_CACHE_CAPACITY_BLOCKS, {"model_name": "m"}) == 10
        assert sample(metric_names.METRIC_PREFIX_CACHE_QUERIES_TOTAL, {"model_name": "m"}) > 0
    finally:
        served.stop()
    assert Engine(loaded, EngineConfig(enable_prefix_caching=False)).prefix_cache is None


@pytest.mark.parametrize(("method", "prefill_kernel"), [("int8", None), ("int4", "none"), ("int4", None)])
def test_quantized_weights_on_the_fused_decode_path_match_the_cache_off_output(tiny_qwen2_dir, monkeypatch,
                                                                               method, prefill_kernel):
    """int4 prompt chunks of >= prefill_min_rows rows run on the matrix engine with the weights requantized
    per channel (prefill.py), fewer rows on the decode kernels: the logits depend on which one computed each
    position (up to 0.15 on the tiny model between prefill_chunk 24 and 7, no cache involved). A cache hit
    therefore recomputes at least prefill_min_rows tokens, so a whole prompt's positions go through the same
    kernel with the cache or without (prompts in one chunk: the default token budget)."""
    if prefill_kernel is not None:
        monkeypatch.setenv("DISTILLERY_PREFILL", prefill_kernel)
    quantized = load_model(tiny_qwen2_dir, quantization=method, group_size=32)

    async def scenario(engine):
        return await asyncio.gather(*(_generate(engine, SHARED + t, f"r{i}") for i, t in enumerate(TAILS)))

    # every prompt in one chunk and no chunk riding a decode step: each prompt row on the same kernel either way
    one_chunk = {"prefill_chunk": 256, "max_num_batched_tokens": 512}
    on = _run(quantized, scenario, **one_chunk)
    _same(on, _run(quantized, scenario, enable_prefix_caching=False, **one_chunk))
    engine = Engine(quantized, EngineConfig())
    min_rows = quantized.plan.prefill_min_rows if quantized.plan.prefill_kernel != "none" else 1
    assert engine._prefix_recompute == max(1, min_rows)
    # r1 (89 tokens) and r2 (72) find SHARED's 4 blocks, less what keeps >= _prefix_recompute tokens to compute
    expected = sum(min(4, (len(SHARED) + len(t) - engine._prefix_recompute) // 16) * 16 for t in TAILS[1:])
    assert on[2].prefix_cache_hit_tokens == expected > 0


def test_the_pool_is_sized_from_the_budget_and_what_the_gpu_leaves(loaded):
    cfg = loaded.model.config
    per_block = block_bytes(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, torch.float32, 16)
    engine = Engine(loaded, EngineConfig(prefix_cache_bytes=100 * per_block))
    assert engine.prefix_cache is not None and engine.prefix_cache.capacity == 100
    # CUDA: no more than the KV cache's budget leaves over; nothing left -> prefix caching off
    assert engine._make_prefix_cache(engine.config, 7 * per_block + 5).capacity == 7
    assert engine._make_prefix_cache(engine.config, per_block - 1) is None
    small = Engine(loaded, EngineConfig(prefix_cache_bytes=per_block - 1))
    assert small.prefix_cache is None and small.stats.prefix_cache_capacity_blocks == 0


def test_a_store_that_fails_mid_copy_leaves_no_block_behind():
    pc = make_cache(4)
    k, v = make_slots()
    pc.store([1, 1, 1, 1], k, v, 0)
    broken_k = [k[0], "not a tensor"]  # layer 1 fails after layer 0 was copied
    with pytest.raises(TypeError):
        pc.store([1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3], broken_k, v, 0)
    assert pc.stats.blocks == 1 and pc.cached_blocks([1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3], 12) == 1
    assert pc.store([1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4], k, v, 0) == 3  # the rows are free again
    assert pc.stats.blocks == 4
