"""sampling.py and the engine's sampling controls and log-probabilities.

Each control is checked twice: on crafted rows against its definition (vLLM's), and through the engine on the
tiny model, where ignoring the control would change the tokens. Log-probabilities (of the completion and of the
prompt, over a chunked prefill) are compared with transformers' log_softmax of the same checkpoint in float32.
Seeded requests give the same tokens alone, in a batch with other requests, and run after run.
"""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

from model_runtime import engine as engine_module
from model_runtime import sampling
from model_runtime.engine import Engine, EngineConfig, GenerationError, SamplingParams
from model_runtime.loader import load_model
from model_runtime.sampling import RequestSampler, token_logprobs
from tests.cpu_kernels import needs_cpu_kernels

PROMPT = [151646, 100, 200, 300, 400, 500, 600, 700]
EOS = 151643
V = 8


# ---------------------------------------------------------------- crafted rows (no model)
def sampler(prompt: list[int] | None = None, stop: set[int] | None = None, **kw) -> RequestSampler:
    params = SamplingParams(max_tokens=16, **{"temperature": 0.0, **kw})
    return RequestSampler(params, prompt or [7], stop or set(), torch.device("cpu"))


def row(*head: float) -> torch.Tensor:
    return torch.tensor([*head] + [-5.0] * (V - len(head)))


def greedy_pick(s: RequestSampler, logits: torch.Tensor, generated: int = 0) -> int:
    return s.choose(logits, int(logits.argmax()), generated)


def test_no_controls_means_no_edit_and_the_raw_argmax():
    s = sampler()
    assert not s.edits_logits and s.output is None and s.seen is None
    assert greedy_pick(s, row(1.0, 3.0)) == 1


def test_presence_penalty_subtracts_once_per_generated_token():
    s = sampler(presence_penalty=1.0)
    logits = row(5.0, 4.5, 3.5)
    assert greedy_pick(s, logits) == 0
    s.observe(0)
    assert greedy_pick(s, logits) == 1          # 5 - 1 < 4.5
    s.observe(0)
    assert torch.allclose(s.edit(logits, 2)[:3], torch.tensor([4.0, 4.5, 3.5]))  # still once, not per count


def test_frequency_penalty_subtracts_per_occurrence():
    s = sampler(frequency_penalty=0.4)
    logits = row(5.0, 4.5)
    s.observe(0)
    assert greedy_pick(s, logits) == 0          # 4.6 > 4.5
    s.observe(0)
    assert greedy_pick(s, logits) == 1          # 4.2 < 4.5
    assert torch.allclose(s.edit(logits, 2)[:2], torch.tensor([4.2, 4.5]))


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_prompt_and_output():
    s = sampler(prompt=[0, 2], repetition_penalty=2.0)
    logits = row(4.0, 3.0, -1.0, -1.5, 0.5)
    out = s.edit(logits, 0)
    assert out[:5].tolist() == [2.0, 3.0, -2.0, -1.5, 0.5]   # prompt tokens 0 and 2 penalised, others not
    assert greedy_pick(s, logits) == 1
    s.observe(1)
    assert s.edit(logits, 1)[1] == 1.5                      # a generated token counts too
    assert logits[:5].tolist() == [4.0, 3.0, -1.0, -1.5, 0.5]  # the raw row is untouched


def test_logit_bias_is_added_to_the_logits():
    s = sampler(logit_bias={3: 10.0, 0: -1.0})
    logits = row(5.0, 4.0, 0.0, 0.0)
    assert s.edit(logits, 0)[:4].tolist() == [4.0, 4.0, 0.0, 10.0]
    assert greedy_pick(s, logits) == 3


def test_min_tokens_masks_stop_ids_until_enough_are_generated():
    s = sampler(stop={0, 2}, min_tokens=2)
    logits = row(5.0, 1.0, 4.0)
    assert greedy_pick(s, logits, generated=0) == 1 and greedy_pick(s, logits, generated=1) == 1
    assert greedy_pick(s, logits, generated=2) == 0


def draws(s: RequestSampler, logits: torch.Tensor, n: int = 4000) -> torch.Tensor:
    return torch.bincount(torch.tensor([s.choose(logits, 0, 0) for _ in range(n)]), minlength=V).double() / n


def test_top_k_keeps_only_the_k_most_likely_at_their_renormalised_probabilities():
    logits = torch.tensor([2.0, 0.5, 3.0, -1.0, 1.0, 0.0, 1.5, -0.5])
    freq = draws(sampler(temperature=1.0, top_p=1.0, top_k=3, seed=0), logits)
    top = [2, 0, 6]
    expected = torch.zeros(V, dtype=torch.float64)
    expected[top] = torch.softmax(logits[top].double(), dim=0)
    assert set(freq.nonzero().flatten().tolist()) == set(top)
    assert ((freq - expected).abs() < 0.04).all(), (freq, expected)


def test_top_p_applies_to_what_top_k_kept():
    # top 3 renormalised: [0.63, 0.23, 0.14]: top_p 0.85 keeps two of them (of all 8 it would keep three)
    logits = torch.tensor([2.0, 0.5, 3.0, -1.0, 1.0, 0.0, 1.5, -0.5])
    freq = draws(sampler(temperature=1.0, top_p=0.85, top_k=3, seed=0), logits)
    assert set(freq.nonzero().flatten().tolist()) == {2, 0}


def test_min_p_drops_tokens_below_a_fraction_of_the_most_likely():
    logits = torch.tensor([2.0, 0.5, 3.0, -1.0, 1.0, 0.0, 1.5, -0.5])
    probs = torch.softmax(logits, dim=0)
    kept = (probs >= 0.3 * probs.max()).nonzero().flatten().tolist()
    assert 1 < len(kept) < V
    for top_p in (1.0, 0.99):  # the full-vocabulary path and the sorted-candidates path
        freq = draws(sampler(temperature=1.0, top_p=top_p, min_p=0.3, seed=0), logits)
        assert set(freq.nonzero().flatten().tolist()) == set(kept)


def test_a_draw_over_a_long_row_by_blocks_is_the_flat_draw_and_never_a_dropped_token(monkeypatch):
    """_draw over more than 4 blocks (the block's sum, then the value within it) picks what one cumulative sum over
    the row picks for the same number (seeded alike), and never a token of probability 0 (min_p's drops)."""
    torch.manual_seed(4)
    p = torch.softmax(torch.randn(1000) * 3, dim=-1)
    p[::7] = 0.0  # dropped tokens, some at a block's end
    monkeypatch.setattr(sampling, "DRAW_BLOCK", 16)  # 1000 values: 62 whole blocks and a short one
    blocked = [sampling._draw(p, torch.Generator().manual_seed(s)) for s in range(300)]
    monkeypatch.setattr(sampling, "DRAW_BLOCK", 1000)  # one cumulative sum
    flat = [sampling._draw(p, torch.Generator().manual_seed(s)) for s in range(300)]
    assert blocked == flat
    assert all(float(p[i]) > 0 for i in blocked)
    edge = torch.zeros(100)
    edge[3] = 1.0  # all the mass on one token: every number lands on it
    monkeypatch.setattr(sampling, "DRAW_BLOCK", 8)
    assert {sampling._draw(edge, torch.Generator().manual_seed(s)) for s in range(50)} == {3}


def test_the_draw_uses_only_the_requests_generator():
    logits = torch.tensor([2.0, 0.5, 3.0, -1.0, 1.0, 0.0, 1.5, -0.5])
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        s = sampler(temperature=1.0, top_p=0.9, top_k=5, min_p=0.05, seed=11)
        runs.append([s.choose(logits, 0, 0) for _ in range(50)])
    assert runs[0] == runs[1]


@needs_cpu_kernels
def test_scan_rows_in_c_picks_what_the_torch_scan_and_choose_pick():
    """A step's rows through scan_rows fused (one C call: max, argmax, the plain rows' draws) and not (torch's max,
    every row through choose): the same poison flags, argmaxes (of the rows not poisoned: those fail) and tokens,
    16 steps of 6 requests whose generators start alike; only the plain-temperature rows are drawn in C."""
    def samplers() -> list[RequestSampler]:
        return [sampler(), sampler(temperature=1.0, top_p=1.0, seed=3), sampler(temperature=0.6, seed=4),
                sampler(temperature=0.7, top_p=1.0, top_k=0, seed=5), sampler(temperature=1.0, top_p=1.0, top_k=3,
                                                                                 seed=6),
                sampler(temperature=1.0, top_p=1.0, presence_penalty=0.5, seed=7)]

    fused, plain = samplers(), samplers()
    assert [s.plain_temperature(1000) for s in fused] == [None, 1.0, None, 0.7, None, None]
    torch.manual_seed(0)
    for step in range(16):  # (the samplers' max_tokens)
        logits = torch.randn(len(fused), 1000) * 2
        if step == 5:
            logits[2, 10] = float("nan")
        a = sampling.scan_rows(logits, fused, fused=True)
        b = sampling.scan_rows(logits, plain, fused=False)
        assert a[0] == b[0] and b[2] == [None] * len(plain)
        assert [m for m, ok in zip(a[1], a[0], strict=True) if ok] == [m for m, ok in zip(b[1], b[0], strict=True) if ok]
        assert [d is not None for d in a[2]] == [False, True, False, True, False, False]
        for i, (f, p) in enumerate(zip(fused, plain, strict=True)):
            if not a[0][i]:
                continue
            mine = a[2][i] if a[2][i] is not None else f.choose(logits[i], a[1][i], step)
            assert mine == p.choose(logits[i], b[1][i], step)
            f.observe(mine)
            p.observe(mine)


def test_token_logprobs_are_the_log_softmax_and_its_top_k():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    ref = torch.log_softmax(logits, dim=-1)
    got = token_logprobs(logits.clone(), [4, 5, 6], 3, in_place=True)
    for i, (lp, top) in enumerate(got):
        assert lp == pytest.approx(float(ref[i, 4 + i]), abs=1e-5)
        values, ids = ref[i].topk(3)
        assert [t for t, _ in top] == ids.tolist()
        assert [v for _, v in top] == pytest.approx(values.tolist(), abs=1e-5)
    assert token_logprobs(logits, [0, 0, 0], 0)[0][1] == []


@pytest.mark.parametrize("in_place", [False, True])
def test_token_logprobs_over_a_vocabulary_of_whole_groups(in_place):
    """Vocabularies of whole LOGPROB_GROUPs take the grouped top-1 search, rows a few at a time (more rows than
    LOGPROB_ROW_BLOCK, the last block short): values as log_softmax's, the top-1 the row's argmax wherever it
    lies (first group, last group, last entry), an all -inf row but one finite entry stays finite."""
    rows, vocab = sampling.LOGPROB_ROW_BLOCK * 2 + 1, sampling.LOGPROB_GROUP * 7
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(1)) * 4
    logits[0, 3] = logits[1, vocab - 1] = logits[2, vocab - sampling.LOGPROB_GROUP] = 30.0
    logits[3] = -math.inf
    logits[3, 500] = 0.0
    ref = torch.log_softmax(logits.double(), dim=-1)
    tokens = [(17 * i) % vocab for i in range(rows)]
    tokens[3] = 500
    for k in (1, 0):
        got = token_logprobs(logits.clone() if in_place else logits, tokens, k, in_place=in_place)
        for i, (lp, top) in enumerate(got):
            assert lp == pytest.approx(float(ref[i, tokens[i]]), abs=1e-5)
            if k:
                assert top[0][0] == int(ref[i].argmax()) and top[0][1] == pytest.approx(float(ref[i].max()), abs=1e-5)
            else:
                assert top == []
    assert got[3][0] == 0.0


@pytest.mark.parametrize(("kw", "match"), [
    ({"max_tokens": 0}, "max_tokens"), ({"logprobs": sampling.MAX_LOGPROBS + 1}, "logprobs"),
    ({"logit_bias": {V: 1.0}}, "logit_bias"), ({"min_tokens": 17}, "min_tokens"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"), ({"top_k": -2}, "top_k"), ({"min_p": 1.5}, "min_p"),
    ({"presence_penalty": 3.0}, "presence_penalty"), ({"stop_token_ids": [-1]}, "stop_token_ids"),
])
def test_bad_parameters_are_named(kw, match):
    assert match in SamplingParams(**{"max_tokens": 16, **kw}).problem(V)
    assert SamplingParams(max_tokens=0, prompt_logprobs=0).problem(V) is None


# ---------------------------------------------------------------- through the engine, against transformers
@pytest.fixture(scope="module")
def engine(tiny_qwen2_dir):
    # float32 to compare with transformers in float32; chunks of 3 tokens: the prompt's logprobs span chunks
    e = Engine(load_model(tiny_qwen2_dir, dtype="float32"),
               EngineConfig(max_batch_size=4, max_model_len=128, prefill_chunk=3))
    e.start()
    yield e
    e.stop()


@pytest.fixture(scope="module")
def reference(tiny_qwen2_dir):
    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM.from_pretrained(tiny_qwen2_dir, torch_dtype=torch.float32).eval()

    def logprobs(tokens: list[int]) -> torch.Tensor:
        """[len(tokens), V]: row p is log P(token p + 1 | tokens[:p + 1])."""
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([tokens])).logits[0].float(), dim=-1)

    return logprobs


async def collect(engine: Engine, prompt, params, rid: str):
    events = [ev async for ev in engine.generate(prompt, params, rid)]
    return [ev.token_id for ev in events if ev.token_id is not None], events


def run(engine: Engine, prompt, params, rid: str):
    return asyncio.run(collect(engine, prompt, params, rid))


def assert_top(top, ref_row: torch.Tensor, k: int) -> None:
    values, ids = ref_row.topk(k)
    assert [t for t, _ in top] == ids.tolist()
    assert [v for _, v in top] == pytest.approx(values.tolist(), abs=1e-3)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_completion_logprobs_equal_transformers(engine, reference, temperature):
    tokens, events = run(engine, PROMPT, SamplingParams(6, temperature=temperature, seed=5, logprobs=3),
                         f"lp-{temperature}")
    ref = reference(PROMPT + tokens)
    assert len(tokens) == 6
    for j, ev in enumerate(events):
        row_ = ref[len(PROMPT) - 1 + j]
        assert ev.logprob == pytest.approx(float(row_[ev.token_id]), abs=1e-3)
        assert_top(ev.top_logprobs, row_, 3)
        if temperature == 0:
            assert ev.top_logprobs[0][0] == ev.token_id
    assert events[0].prompt_logprobs is None


class ChunkSpy:
    """The engine's model, recording the length of each prompt chunk it is called with."""

    def __init__(self, model) -> None:
        self.model, self.chunks = model, []

    def __call__(self, ids, *args, **kw):
        self.chunks.append(ids.shape[1])
        return self.model(ids, *args, **kw)

    def __getattr__(self, name):
        return getattr(self.model, name)


@pytest.mark.parametrize("logprobs_chunk", [None, 2])
def test_prompt_logprobs_equal_transformers_across_prefill_chunks(engine, reference, monkeypatch, logprobs_chunk):
    """Chunks of 3 (the engine's prefill_chunk), or of 2 when PROMPT_LOGPROBS_CHUNK (which bounds the
    [T, vocab] logits a scored chunk holds) is smaller."""
    spy = ChunkSpy(engine.model)
    monkeypatch.setattr(engine, "model", spy)
    if logprobs_chunk is not None:
        monkeypatch.setattr(engine_module, "PROMPT_LOGPROBS_CHUNK", logprobs_chunk)
    tokens, events = run(engine, PROMPT, SamplingParams(2, temperature=0.0, prompt_logprobs=2), "plp")
    assert spy.chunks == ([3, 3, 2] if logprobs_chunk is None else [2, 2, 2, 2])
    ref = reference(PROMPT)
    first = events[0].prompt_logprobs
    assert first is not None and len(first) == len(PROMPT) and first[0] == (None, [])
    for p in range(1, len(PROMPT)):
        lp, top = first[p]
        assert lp == pytest.approx(float(ref[p - 1, PROMPT[p]]), abs=1e-3)
        assert_top(top, ref[p - 1], 2)
    assert all(ev.prompt_logprobs is None for ev in events[1:])
    assert events[0].logprob is None  # completion logprobs were not asked for
    # the prompt's logprobs change nothing about the tokens
    assert tokens == run(engine, PROMPT, SamplingParams(2, temperature=0.0), "plp-off")[0]


def test_echo_with_max_tokens_zero_scores_the_prompt_and_generates_nothing(engine, reference):
    tokens, events = run(engine, PROMPT[:5], SamplingParams(0, prompt_logprobs=0), "echo")
    assert tokens == [] and len(events) == 1
    ev = events[0]
    assert (ev.token_id, ev.finish_reason, ev.prompt_tokens, ev.completion_tokens) == (None, "length", 5, 0)
    ref = reference(PROMPT[:5])
    assert [lp for lp, _ in ev.prompt_logprobs[1:]] == pytest.approx(
        [float(ref[p - 1, PROMPT[p]]) for p in range(1, 5)], abs=1e-3)
    with pytest.raises(GenerationError, match="max_tokens"):
        run(engine, PROMPT, SamplingParams(0), "zero")


def greedy(n: int = 8, **kw) -> SamplingParams:
    return SamplingParams(n, temperature=0.0, **kw)


@pytest.mark.parametrize("control", [{"presence_penalty": 2.0}, {"frequency_penalty": 2.0},
                                     {"repetition_penalty": 1000.0}])
def test_penalties_stop_the_repetition_the_tiny_model_falls_into(engine, control):
    plain, _ = run(engine, PROMPT, greedy(24), "rep-off")
    assert len(set(plain)) < len(plain)  # greedy on the tiny model loops
    penalised, _ = run(engine, PROMPT, greedy(24, **control), f"rep-{control}")
    assert len(set(penalised)) == len(penalised)
    if "repetition_penalty" in control:  # the prompt's tokens too
        again, _ = run(engine, plain[:6], greedy(12, **control), "rep-prompt")
        assert not set(again) & set(plain[:6])


def test_logit_bias_reaches_the_sampler(engine):
    plain, _ = run(engine, PROMPT, greedy(4), "bias-off")
    forced, _ = run(engine, PROMPT, greedy(4, logit_bias={42: 100.0}), "bias-on")
    assert plain != [42] * 4 and forced == [42] * 4
    banned, _ = run(engine, PROMPT, greedy(1, logit_bias={plain[0]: -100.0}), "bias-ban")
    assert banned != plain[:1]


def test_eos_min_tokens_ignore_eos_and_stop_token_ids(engine):
    eos_first = {EOS: 100.0}
    assert engine.eos_ids == {EOS}
    tokens, events = run(engine, PROMPT, greedy(4, logit_bias=eos_first), "eos")
    assert (tokens, events[-1].finish_reason) == ([EOS], "stop")
    tokens, events = run(engine, PROMPT, greedy(4, logit_bias=eos_first, ignore_eos=True), "ignore")
    assert (tokens, events[-1].finish_reason) == ([EOS] * 4, "length")
    tokens, events = run(engine, PROMPT, greedy(6, logit_bias=eos_first, min_tokens=3), "min")
    assert len(tokens) == 4 and EOS not in tokens[:3] and tokens[3] == EOS and events[-1].finish_reason == "stop"
    # a stop id ends the request (not emitted) even with ignore_eos, and min_tokens holds it back too
    stop42 = {"logit_bias": {42: 100.0}, "stop_token_ids": [42]}
    tokens, events = run(engine, PROMPT, greedy(4, ignore_eos=True, **stop42), "stop")
    assert (tokens, events[-1].finish_reason) == ([], "stop")
    tokens, events = run(engine, PROMPT, greedy(4, min_tokens=2, **stop42), "stop-min")
    assert len(tokens) == 2 and 42 not in tokens and events[-1].finish_reason == "stop"


@pytest.mark.parametrize("control", [{"top_k": 1}, {"min_p": 1.0}])
def test_top_k_and_min_p_reach_the_sampler(engine, control):
    """top_k 1 and min_p 1 leave only the most likely token: sampling at temperature 1 turns greedy."""
    plain, _ = run(engine, PROMPT, greedy(8), "tk-greedy")
    free, _ = run(engine, PROMPT, SamplingParams(8, temperature=1.0, top_p=1.0, seed=1), "tk-free")
    narrowed, _ = run(engine, PROMPT, SamplingParams(8, temperature=1.0, top_p=1.0, seed=1, **control), "tk-on")
    assert free != plain and narrowed == plain


def test_plain_temperature_requests_draw_alike_in_c_and_in_torch(engine, monkeypatch):
    """Seeded requests at temperature 1 (no other control: the C scan draws them) and one with top-k (torch's path),
    batched: the same tokens with the engine's fused scan on and off."""
    params = [SamplingParams(12, temperature=1.0, top_p=1.0, seed=40 + i, ignore_eos=True) for i in range(3)]
    params.append(SamplingParams(12, temperature=1.0, top_p=1.0, top_k=50, seed=50, ignore_eos=True))

    async def batch(tag: str):
        jobs = [collect(engine, PROMPT, p, f"{tag}{i}") for i, p in enumerate(params)]
        return [tokens for tokens, _ in await asyncio.gather(*jobs)]

    outs = {}
    for fused in (True, False):
        monkeypatch.setattr(engine, "_fused_sampler", fused)
        outs[fused] = asyncio.run(batch(f"fs{fused}-"))
    assert outs[True] == outs[False] and len({tuple(t) for t in outs[True]}) == 4


def test_seeded_choices_are_reproducible_alone_in_a_batch_and_across_runs(engine):
    """n=3 as the server fans it out (seeds s, s+1, s+2), beside a greedy request and a penalised one."""
    def choice(i: int) -> SamplingParams:
        return SamplingParams(10, temperature=1.0, top_p=0.9, top_k=200, seed=1234 + i, logprobs=1)

    others = [greedy(10), SamplingParams(10, temperature=0.8, presence_penalty=1.0, seed=9)]
    alone = [run(engine, PROMPT, choice(i), f"alone{i}")[0] for i in range(3)]
    other_alone = [run(engine, PROMPT, p, f"other{i}")[0] for i, p in enumerate(others)]

    async def batch(tag: str):
        jobs = [collect(engine, PROMPT, choice(i), f"{tag}{i}") for i in range(3)]
        jobs += [collect(engine, PROMPT, p, f"{tag}o{i}") for i, p in enumerate(others)]
        return [tokens for tokens, _ in await asyncio.gather(*jobs)]

    first, second = asyncio.run(batch("b")), asyncio.run(batch("c"))
    assert first == second == alone + other_alone
    assert len({tuple(t) for t in alone}) == 3  # three different choices
