"""From a row of logits and a request's parameters and history to the next token and its log-probabilities.

vLLM's semantics and order, applied to one request's row:
1. logit_bias (added), then the penalties: repetition (over prompt + generated tokens: positive logits
   divided by it, negative ones multiplied), frequency (minus penalty x count of each generated token),
   presence (minus penalty once per distinct generated token);
2. min_tokens: until that many tokens are generated, eos (unless ignore_eos) and stop_token_ids cannot come;
3. temperature (0: greedy, the argmax of the row after 1-2), then top_k, top_p (over what top_k kept,
   renormalised), min_p (tokens below min_p x the most likely one's probability dropped), and one draw from
   the request's own torch.Generator (so a seed reproduces its tokens whatever else shares the batch).
A request without controls (the common case) skips 1-2 entirely: the engine takes the batch's argmax or
calls _sample on the raw row, as cheap as before controls existed.

Log-probabilities are of the model's raw distribution, log_softmax of the float32 logits before any control
(vLLM's default "raw_logprobs"), and computed only for requests that ask for them.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from model_runtime import ckernels

MAX_LOGPROBS = 20          # the most alternatives per position a request may ask for (vLLM's max_logprobs)
# a request that wants its prompt's logprobs prefills at most this many tokens a step: their logits, one
# float32 row over the vocabulary each, are held at once (256 x 151,936 x 4 bytes = 155 MB)
PROMPT_LOGPROBS_CHUNK = 256
# token_logprobs normalises this many rows at a time on the CPU: their exp scratch (4 x 608 KB) stays in cache
LOGPROB_ROW_BLOCK = 4
LOGPROB_GROUP = 128  # token_logprobs finds a row's most likely token in two steps: its group of 128, then in it
NUCLEUS_CANDIDATES = 1024  # top-p looks among this many most likely tokens first (all of them if they fall short)
# ...and before that among the tokens at least this fraction as likely as the most likely one, when they are at most
# NUCLEUS_CANDIDATES and hold top_p of the probability (a language model's next-token distribution: nearly always)
NUCLEUS_RATIO = 1e-4
DRAW_BLOCK = 128  # a draw over a long row finds its block of this many values first (_draw)

TopLogprobs = list[tuple[int, float]]
PromptLogprobs = list[tuple[float | None, TopLogprobs]]


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 0.6        # 0 => greedy
    top_p: float = 0.95
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)   # eos ids are added by the engine
    top_k: int = -1                 # -1 or 0: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None         # None: none; k >= 0: the sampled token's logprob + k alternatives
    prompt_logprobs: int | None = None  # None: none; k >= 0: each prompt token's logprob (+ k), the first None

    @property
    def edits_logits(self) -> bool:
        """Whether the row needs step 1-2 of the module docstring (bias, penalties, min_tokens)."""
        return bool(self.logit_bias) or self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 \
            or self.presence_penalty != 0.0 or self.min_tokens > 0

    def problem(self, vocab_size: int) -> str | None:
        """What is wrong with these parameters for a model of this vocabulary, or None."""
        def bad_id(t: int) -> bool:
            return not 0 <= int(t) < vocab_size

        if not self.temperature >= 0 or not math.isfinite(self.temperature):
            return f"temperature must be >= 0, got {self.temperature}"
        if not 0 < self.top_p <= 1:
            return f"top_p must be in (0, 1], got {self.top_p}"
        if self.top_k < -1:
            return f"top_k must be -1 (off), 0 (off) or >= 1, got {self.top_k}"
        if not 0 <= self.min_p <= 1:
            return f"min_p must be in [0, 1], got {self.min_p}"
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                return f"{name} must be in [-2, 2], got {getattr(self, name)}"
        if not 0 < self.repetition_penalty < math.inf:
            return f"repetition_penalty must be > 0, got {self.repetition_penalty}"
        if any(bad_id(t) for t in self.logit_bias):
            return f"logit_bias token ids must be in [0, {vocab_size})"
        if any(not -100 <= v <= 100 for v in self.logit_bias.values()):
            return "logit_bias values must be in [-100, 100]"
        if any(bad_id(t) for t in self.stop_token_ids):
            return f"stop_token_ids must be in [0, {vocab_size})"
        if self.min_tokens < 0 or self.min_tokens > max(self.max_tokens, 0):
            return f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}"
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and not 0 <= k <= MAX_LOGPROBS:
                return f"{name} must be in [0, {MAX_LOGPROBS}], got {k}"
        if self.max_tokens < 0 or (self.max_tokens == 0 and self.prompt_logprobs is None):
            return "max_tokens must be >= 1 (0 only with prompt_logprobs: the prompt scored, nothing generated)"
        return None


@contextlib.contextmanager
def one_thread(device: torch.device) -> Iterator[None]:
    """Run a batch's per-row sampling on one CPU thread. Its ops are small (a softmax, a top-k, a float64
    cumsum over one vocabulary row) and OpenMP's fork/join dominates them as soon as another process wants a
    core: measured on a 2-vCPU Xeon beside a busy process, _sample at temperature 1 took 16 ms per row on 2
    threads and 0.6-2 ms on one (a load client such as guidellm on the same machine is enough). Switching
    costs ~0.4 us."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _Tokens:
    """Distinct token ids in first-seen order and how often each came, in tensors allocated once: adding a token
    is one or two index writes, and a row is penalised at just these ids, never over the whole vocabulary."""

    def __init__(self, capacity: int, device: torch.device, initial: list[int] | None = None) -> None:
        self.where = {t: i for i, t in enumerate(dict.fromkeys(initial or []))}
        self.ids = torch.zeros(capacity + len(self.where), dtype=torch.long, device=device)
        self.counts = torch.zeros(capacity + len(self.where), dtype=torch.float32, device=device)
        if self.where:
            self.ids[: len(self.where)] = torch.tensor(list(self.where), dtype=torch.long, device=device)

    def add(self, token: int) -> None:
        i = self.where.get(token)
        if i is None:
            i = self.where[token] = len(self.where)
            self.ids[i] = token
        self.counts[i] += 1

    def view(self) -> tuple[Tensor, Tensor]:
        n = len(self.where)
        return self.ids[:n], self.counts[:n]


class RequestSampler:
    """One request's sampling state: its generator, and what its controls need (the tokens it generated and how
    often, the tokens of its prompt and output), updated by observe() once per token. Built where the request
    is submitted (the event loop), its tensors are made on first use, on the engine's thread."""

    def __init__(self, params: SamplingParams, prompt: list[int], stop_ids: set[int], device: torch.device) -> None:
        self.params = params
        self.edits_logits = params.edits_logits
        self.generator: torch.Generator | None = None
        if params.temperature > 0:
            self.generator = torch.Generator()
            self.generator.manual_seed(params.seed if params.seed is not None else
                                       int(torch.randint(0, 2**62, ()).item()))
        self._prompt, self._stop_ids, self._device = prompt, stop_ids, device
        self._made = False
        self.output: _Tokens | None = None  # generated tokens and their counts (frequency, presence)
        self.seen: _Tokens | None = None    # prompt + generated tokens (repetition)
        self.bias_ids: Tensor | None = None
        self.bias: Tensor | None = None
        self.min_tokens_ids: Tensor | None = None

    def _make_tensors(self) -> None:
        p, device, capacity = self.params, self._device, max(self.params.max_tokens, 1)
        if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0:
            self.output = _Tokens(capacity, device)
        if p.repetition_penalty != 1.0:
            self.seen = _Tokens(capacity, device, self._prompt)
        if p.logit_bias:
            self.bias_ids = torch.tensor([int(t) for t in p.logit_bias], dtype=torch.long, device=device)
            self.bias = torch.tensor([float(v) for v in p.logit_bias.values()], device=device)
        if p.min_tokens > 0 and self._stop_ids:
            self.min_tokens_ids = torch.tensor(sorted(self._stop_ids), dtype=torch.long, device=device)
        self._made = True

    def observe(self, token: int) -> None:
        """Count a generated token (an index write or two, never a rebuild)."""
        if self.edits_logits and not self._made:
            self._make_tensors()
        if self.output is not None:
            self.output.add(token)
        if self.seen is not None:
            self.seen.add(token)

    def edit(self, raw: Tensor, generated: int) -> Tensor:
        """A new row: logit_bias, repetition/frequency/presence penalties, the min_tokens mask (raw unchanged)."""
        if not self._made:
            self._make_tensors()
        row = raw.float().clone()
        if self.bias_ids is not None and self.bias is not None:
            row.index_add_(0, self.bias_ids, self.bias)
        p = self.params
        if self.seen is not None:
            ids, _ = self.seen.view()
            vals = row[ids]
            row[ids] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if self.output is not None:
            ids, counts = self.output.view()  # every count >= 1: presence applies once to each
            row.index_add_(0, ids, counts * -p.frequency_penalty - p.presence_penalty)
        if self.min_tokens_ids is not None and generated < p.min_tokens:
            row[self.min_tokens_ids] = -math.inf
        return row

    def plain_temperature(self, vocab: int) -> float | None:
        """The temperature this request's next token is drawn at from softmax(row / t) with nothing else applied (no
        bias, penalties, min_tokens, top-k, top-p or min-p: the API's defaults), or None (greedy, or a control that
        _sample applies)."""
        p = self.params
        if p.temperature <= 0 or self.edits_logits or 0 < p.top_k < vocab or p.top_p < 1 or p.min_p > 0:
            return None
        return max(p.temperature, 1e-5)  # (as _sample divides)

    def uniform(self) -> float:
        """The one number a draw takes from this request's generator (_uniform, as _draw takes it)."""
        return _uniform(self.generator)

    def choose(self, raw: Tensor, argmax: int, generated: int) -> int:
        """The next token from this request's raw row [V]; argmax: the raw row's (the batch computed it)."""
        p = self.params
        row = self.edit(raw, generated) if self.edits_logits else raw
        if p.temperature <= 0:
            return argmax if row is raw else int(row.max(dim=-1).indices)  # max(dim): ~2/3 of argmax's time
        return _sample(row, p.temperature, p.top_p, self.generator, top_k=p.top_k, min_p=p.min_p)


def scan_rows(logits: Tensor, samplers: Sequence[RequestSampler], fused: bool
              ) -> tuple[list[bool], list[int], list[int | None]]:
    """A step's rows of logits [B, V] before choosing: whether each row is finite, its argmax, and the token already
    drawn for each row whose request samples at a plain temperature (RequestSampler.plain_temperature; else None:
    choose() decides). One max-reduction per row gives the greedy token and the poison check: a NaN anywhere makes
    the max NaN, +inf makes it inf (a -inf logit only masks its token).
    fused (the kernel plan's sampler "dq"; CPU float32 logits): one C call over every row on every thread
    (ckernels.sample_rows: the max, its first index, and the plain rows' draws as _draw's, at the same uniform number
    from each request's generator). Else torch's max over the batch, nothing drawn. Why: torch's max over 8 rows of
    151,936 logits and the plain rows' _sample one after the other on one thread took ~3.6 ms of an ~30 ms 8-row
    decode step on the 2-vCPU VM; the C call ~0.6 ms (one row: 0.67 -> 0.18 ms)."""
    vocab = logits.shape[-1]
    if fused and logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.is_contiguous():
        temps = [s.plain_temperature(vocab) for s in samplers]
        t = torch.tensor([x or 0.0 for x in temps], dtype=torch.float32)
        u = torch.tensor([s.uniform() if x else 0.0 for s, x in zip(samplers, temps, strict=True)],
                         dtype=torch.float64)
        maxv, argmax, choice = ckernels.sample_rows(logits, t, u)
        drawn = [c if x and c >= 0 else None for c, x in zip(choice.tolist(), temps, strict=True)]
        return torch.isfinite(maxv).tolist(), argmax.tolist(), drawn
    best = logits.max(dim=-1)
    return torch.isfinite(best.values).tolist(), best.indices.tolist(), [None] * len(samplers)


def _sample(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None,
            top_k: int = -1, min_p: float = 0.0) -> int:
    """One token from logits [V] with temperature, top_k, nucleus (top_p) and min_p sampling.

    Exact, but cheap on a 151,936-token vocabulary: the nucleus (the most likely tokens whose probabilities
    first add up to top_p) is looked for among the top-k candidates, a partial sort, and only when they fall
    short among all tokens; the draw is one uniform number against the cumulative sum. A full sort + multinomial
    cost ~15 ms per token here, most of an int4 decode step (~20 ms on the 0.5B). The only randomness is the
    one number drawn from `generator`."""
    probs = torch.softmax(logits.float() / max(temperature, 1e-5), dim=-1)         # [V]
    vocab = probs.numel()
    idx: Tensor | None = None
    mass = 1.0                                       # of the candidates top_p is a fraction of
    if 0 < top_k < vocab:
        p, idx = torch.topk(probs, top_k)                                          # [k], descending
        mass = float(p.sum(dtype=torch.float64))     # top_p applies to the top_k renormalised
    elif 0 < top_p < 1:
        idx = _likely(probs, top_p)
        if idx is not None:  # the nucleus is among them: sorting them orders it as sorting every token would
            p, order = torch.sort(probs[idx], descending=True)
            idx = idx[order]
        else:
            p, idx = torch.topk(probs, min(NUCLEUS_CANDIDATES, vocab))             # [k], descending
            if float(p.sum(dtype=torch.float64)) < top_p:  # a flat distribution: the nucleus is wider
                p, idx = torch.sort(probs, descending=True)
    else:
        p = probs
    if idx is not None and 0 < top_p < 1:
        cum = torch.cumsum(p, dim=0, dtype=torch.float64)
        # the prefix up to and including the token whose cumulative probability reaches top_p
        target = torch.tensor(top_p * mass, dtype=torch.float64, device=cum.device)
        keep = min(int(torch.searchsorted(cum, target)) + 1, p.numel())
        p, idx = p[:keep], idx[:keep]
    if min_p > 0:
        if idx is not None:   # sorted descending: the tokens kept are a prefix
            keep = max(int((p >= min_p * p[0]).sum()), 1)
            p, idx = p[:keep], idx[:keep]
        else:
            p = torch.where(p >= min_p * p.max(), p, 0.0)
    choice = _draw(p, generator)
    return int(idx[choice]) if idx is not None else choice


def _draw(p: Tensor, generator: torch.Generator | None) -> int:
    """An index i drawn with probability p[i] / sum(p) (p >= 0, not all 0): one uniform number from `generator`
    against the cumulative sum, in float64 (over 151,936 tokens a float32 running sum rounds the tail's tiny
    probabilities away). A long row in two steps: the block of DRAW_BLOCK values the number falls in (a cumulative
    sum of the blocks' sums), then the value within it: the same choice as one running sum for the same number
    but for float64 rounding at a boundary. Why: a float64 running sum over the 151,936-token vocabulary was most
    of a draw at temperature 1 without top-p / top-k (the API's defaults: what a client such as guidellm sends),
    and a decode step of 8 sampled rows draws 8 times on one thread (8 rows, A/B alternating: 3.27 -> 2.69 ms)."""
    n = p.numel()
    u = _uniform(generator)
    if n <= 4 * DRAW_BLOCK:
        cdf = torch.cumsum(p, dim=0, dtype=torch.float64)
        choice = min(int(torch.searchsorted(cdf, u * cdf[-1], right=True)), n - 1)
    else:
        whole = n // DRAW_BLOCK * DRAW_BLOCK
        sums = p[:whole].view(-1, DRAW_BLOCK).sum(dim=1, dtype=torch.float64)
        if whole < n:
            sums = torch.cat((sums, p[whole:].sum(dtype=torch.float64)[None]))
        cdf = torch.cumsum(sums, dim=0)
        target = u * cdf[-1]
        block = min(int(torch.searchsorted(cdf, target, right=True)), sums.numel() - 1)
        start = block * DRAW_BLOCK
        seg = p[start:start + DRAW_BLOCK]
        within = target - (cdf[block - 1] if block > 0 else 0.0)
        cdf_seg = torch.cumsum(seg, dim=0, dtype=torch.float64)
        choice = start + min(int(torch.searchsorted(cdf_seg, within, right=True)), seg.numel() - 1)
    if float(p[choice]) > 0:
        return choice
    # (a rounding difference between a block's sum and its running sum can leave the number at a block's end, on a
    # token of probability 0, e.g. one min_p dropped: take the nearest possible one before it, else after it)
    possible = (p > 0).nonzero()[:, 0]
    before = possible[possible < choice]
    return int(before[-1]) if before.numel() else int(possible[0])


def _uniform(generator: torch.Generator | None) -> float:
    """A draw's one number in [0, 1) (float64) from the request's generator: its only randomness."""
    return float(torch.rand((), generator=generator, dtype=torch.float64))


def _likely(probs: Tensor, top_p: float) -> Tensor | None:
    """The ids of the tokens at least NUCLEUS_RATIO as likely as the most likely one, if they are few (at most
    NUCLEUS_CANDIDATES) and hold at least top_p of the probability, else None. Every token outside them is less
    likely than every token in them, so the nucleus (the most likely tokens up to top_p) lies within them. Why: a
    comparison, a count and a gather over the vocabulary cost a third of a top-k of 1,024 (151,936 tokens, one
    thread: ~0.3 vs 0.85 ms), and a sampled decode step of 8 rows runs 8 of them on one thread (8 rows at R1's
    temperature 0.6 / top-p 0.95, A/B alternating: 9.95 -> 6.15 ms; the same draws for the same seeds)."""
    likely = probs >= probs.max() * NUCLEUS_RATIO
    if int(likely.sum()) > NUCLEUS_CANDIDATES:
        return None
    idx = likely.nonzero()[:, 0]
    return idx if float(probs[idx].sum(dtype=torch.float64)) >= top_p else None


def token_logprobs(logits: Tensor, tokens: list[int], k: int, *, in_place: bool = False
                   ) -> list[tuple[float, TopLogprobs]]:
    """For each row of logits [N, V]: the log-probability of tokens[row] and the k most likely (id, logprob),
    descending, under log_softmax of the float32 row. in_place: `logits` may be overwritten (a prompt's
    [T, V] chunk is used as its own scratch space instead of a copy).

    Only N + N x k entries are wanted, not the N x V normalised rows: each row's logsumexp is computed a few
    rows at a time on the CPU (the exp's scratch stays in cache and no [T, V] tensor is allocated: a prompt's
    chunk is 155 MB), the wanted entries are gathered from the raw logits and shifted by it. The arithmetic is
    torch.logsumexp's (max, exp of the difference, sum, log, plus max), so the values equal log_softmax's."""
    rows = logits.float()
    n, vocab = rows.shape
    kk = min(max(k, 1), vocab)
    index = torch.tensor(tokens, dtype=torch.long, device=rows.device)[:, None]
    chosen = rows.gather(1, index)[:, 0]
    lse = torch.empty(n, dtype=rows.dtype, device=rows.device)
    values = torch.empty(n, kk, dtype=rows.dtype, device=rows.device)
    ids = torch.empty(n, kk, dtype=torch.long, device=rows.device)
    block = n if rows.device.type != "cpu" else LOGPROB_ROW_BLOCK
    scratch = None if in_place and rows is logits else torch.empty(min(block, n), vocab, dtype=rows.dtype,
                                                                        device=rows.device)
    for s in range(0, n, block):
        e = min(n, s + block)
        part = rows[s:e]
        if kk == 1 and vocab % LOGPROB_GROUP == 0:
            # the top-1 of a row: the group holding its max (amax of each group of 128 is one cheap pass),
            # then the max within that group: ~2x faster on the CPU than max(dim) with indices, same answer
            groups = part.view(e - s, vocab // LOGPROB_GROUP, LOGPROB_GROUP)
            best = groups.amax(-1).argmax(-1)
            torch.max(groups[torch.arange(e - s, device=rows.device), best], dim=-1, keepdim=True,
                      out=(values[s:e], ids[s:e]))
            ids[s:e].add_(best[:, None] * LOGPROB_GROUP)
        elif kk == 1:  # max(dim) is one pass; topk(1) several times slower on the CPU
            torch.max(part, dim=-1, keepdim=True, out=(values[s:e], ids[s:e]))
        else:
            torch.topk(part, kk, dim=-1, out=(values[s:e], ids[s:e]))
        top = values[s:e, :1]
        top = top.masked_fill(top.abs() == math.inf, 0.0)  # as torch.logsumexp: an infinite max shifts by 0
        tmp = part if scratch is None else scratch[:e - s]
        torch.sub(part, top, out=tmp).exp_()
        torch.sum(tmp, dim=-1, out=lse[s:e]).log_().add_(top[:, 0])
    chosen_lp = (chosen - lse).tolist()
    if k <= 0:
        return [(lp, []) for lp in chosen_lp]
    values.sub_(lse[:, None])
    return [(lp, list(zip(i, v, strict=True))) for lp, i, v in zip(chosen_lp, ids.tolist(), values.tolist(),
                                                                    strict=True)]
