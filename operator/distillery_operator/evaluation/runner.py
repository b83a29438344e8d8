"""Running a benchmark against an OpenAI-compatible endpoint, the way DeepSeek-R1 is meant to be asked.

R1's usage rules (its model card): no system prompt — every instruction goes in the user turn (a
dataset's system turns are folded into the first user turn); temperature 0.6 with top_p 0.95 (greedy
decoding makes it repeat itself); for math, "Please reason step by step, and put your final answer within
\\boxed{}." appended to the question. The reply's reasoning (<think>...</think>, or a separate
`reasoning_content`) is never scored. Each of `repeats` runs asks every example once; the score is the
mean over runs with its sample standard deviation, because one run of a sampled model is noisy.

Requests run concurrently up to a bound, each with its own timeout; connection failures, 5xx and 429 are
retried a few times; a request that still fails scores 0 and is counted as an error. An endpoint that
cannot be reached at all, or where no request succeeds, is an `EvalError`, not a score of 0.
"""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import aiohttp

from .dataset import Example
from .result import EvalResult, ItemResult
from .scorers import SCORERS, Scorer

TEMPERATURE = 0.6  # R1's recommended sampling (0.5-0.7; 0.6 in its own evaluations)
TOP_P = 0.95


class EvalError(Exception):
    """The evaluation could not run (endpoint unreachable, model not served, every request failed)."""


@dataclass(frozen=True)
class EvalConfig:
    endpoint: str  # base URL: http://host:port or http://host:port/v1 (/v1 is added when missing)
    model: str
    scorer: str = "boxed"
    repeats: int = 1
    concurrency: int = 8
    timeout_s: float = 600.0  # per request: a long R1 chain of thought takes minutes
    max_tokens: int | None = None  # None: the server's default
    retries: int = 2  # extra attempts after a connection failure, a 5xx or a 429
    retry_backoff_s: float = 1.0  # doubled on each attempt
    api_key: str | None = None
    temperature: float = TEMPERATURE
    top_p: float = TOP_P


def api_base(endpoint: str) -> str:
    base = endpoint.rstrip("/")
    return base if base.endswith("/v1") else base + "/v1"


def r1_messages(example: Example, scorer: Scorer) -> list[dict[str, str]]:
    """The conversation as R1 wants it: no system turn, the scorer's instruction in the last user turn."""
    system = "\n\n".join(m["content"] for m in example.messages if m["role"] == "system")
    messages = [dict(m) for m in example.messages if m["role"] != "system"]
    if system:
        first_user = next(m for m in messages if m["role"] == "user")
        first_user["content"] = f"{system}\n\n{first_user['content']}"
    if scorer.instruction:
        messages[-1]["content"] = f"{messages[-1]['content']}\n{scorer.instruction}"
    return messages


def request_body(example: Example, scorer: Scorer, config: EvalConfig) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": config.model, "messages": r1_messages(example, scorer),
        "temperature": config.temperature, "top_p": config.top_p, "stream": False,
    }
    if config.max_tokens is not None:
        body["max_tokens"] = config.max_tokens
    return body


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear between closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def reply_text(payload: Any) -> str:
    """The answer part of a chat completion: `content` only (R1's `reasoning_content` is not the answer)."""
    try:
        content = payload["choices"][0]["message"].get("content")
    except (KeyError, IndexError, TypeError, AttributeError):
        raise ValueError(f"not a chat completion: {json.dumps(payload)[:200]}") from None
    return content if isinstance(content, str) else ""


class _RequestFailed(Exception):
    pass


def _error_message(status: int, payload: Any) -> str:
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        return f"HTTP {status}: {payload['error'].get('message', payload['error'])}"
    return f"HTTP {status}: {str(payload)[:200]}"


class Runner:
    """One evaluation: a session to the endpoint, the concurrency bound, the retry policy."""

    def __init__(self, config: EvalConfig, on_item: Callable[[ItemResult], None] | None = None) -> None:
        if config.scorer not in SCORERS:
            raise ValueError(f"unknown scorer {config.scorer!r}; choose one of {sorted(SCORERS)}")
        self.config = config
        self.scorer = SCORERS[config.scorer]
        self.base = api_base(config.endpoint)
        self.on_item = on_item
        self.headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}

    async def _backoff(self, attempt: int) -> None:
        await asyncio.sleep(self.config.retry_backoff_s * 2**attempt)

    async def check_endpoint(self, session: aiohttp.ClientSession) -> None:
        """The endpoint answers (a 5xx, e.g. a model still loading, is retried like no answer) and, when it
        lists its models, serves ours."""
        url = f"{self.base}/models"
        attempts = self.config.retries + 1
        timeout = aiohttp.ClientTimeout(total=self.config.timeout_s)
        payload: Any = None
        for attempt in range(attempts):
            try:
                async with session.get(url, timeout=timeout) as resp:
                    status = resp.status
                    payload = await resp.json(content_type=None) if status == 200 else None
            except (aiohttp.ClientError, TimeoutError) as exc:
                problem = f"unreachable after {attempts} attempts: {exc!r}"
            except ValueError:  # a 200 that is not JSON: no model list to check ours against
                break
            else:
                if status < 500:
                    break
                problem = f"answered HTTP {status} after {attempts} attempts"
            if attempt + 1 == attempts:
                raise EvalError(f"endpoint {url} {problem}")
            await self._backoff(attempt)
        if isinstance(payload, dict) and isinstance(payload.get("data"), list):
            served = [m.get("id") for m in payload["data"] if isinstance(m, dict)]
            if self.config.model not in served:
                raise EvalError(f"model {self.config.model!r} is not served at {self.base} "
                                f"(it serves {served})")

    async def ask(self, session: aiohttp.ClientSession, body: dict[str, Any]) -> tuple[str, float]:
        """The reply to one request and its latency; retried on connection failures, 5xx and 429."""
        url = f"{self.base}/chat/completions"
        timeout = aiohttp.ClientTimeout(total=self.config.timeout_s)
        error = ""
        for attempt in range(self.config.retries + 1):
            if attempt:
                await self._backoff(attempt - 1)
            start = time.monotonic()
            try:
                async with session.post(url, json=body, timeout=timeout) as resp:
                    payload = await resp.json(content_type=None)
                    latency = time.monotonic() - start
                    if resp.status == 200:
                        return reply_text(payload), latency
                    error = _error_message(resp.status, payload)
                    if resp.status < 500 and resp.status != 429:
                        raise _RequestFailed(error)  # the request itself is wrong: retrying cannot help
            except TimeoutError:
                error = f"no answer within {self.config.timeout_s} s"
            except aiohttp.ClientError as exc:
                error = f"{type(exc).__name__}: {exc}"
            except ValueError as exc:  # a body that is not JSON or not a chat completion
                error = str(exc)
        raise _RequestFailed(error)

    async def _item(self, session: aiohttp.ClientSession, gate: asyncio.Semaphore, repeat: int,
                    example: Example) -> ItemResult:
        async with gate:
            try:
                reply, latency = await self.ask(session, request_body(example, self.scorer, self.config))
            except _RequestFailed as exc:
                item = ItemResult(repeat, example.line, 0.0, None, example.answer, None, str(exc))
            else:
                item = ItemResult(repeat, example.line, self.scorer.score(reply, example.answer),
                                  self.scorer.extract(reply), example.answer, latency)
        if self.on_item is not None:
            self.on_item(item)
        return item

    async def run(self, examples: Sequence[Example], min_score: float | None = None) -> EvalResult:
        if not examples:
            raise EvalError("no examples to evaluate")
        started = time.monotonic()
        connector = aiohttp.TCPConnector(limit=self.config.concurrency)
        async with aiohttp.ClientSession(connector=connector, headers=self.headers) as session:
            await self.check_endpoint(session)
            gate = asyncio.Semaphore(self.config.concurrency)
            items = await asyncio.gather(*(
                self._item(session, gate, repeat, example)
                for repeat in range(1, self.config.repeats + 1) for example in examples
            ))
        return summarise(self.config, len(examples), list(items), time.monotonic() - started, min_score)


def summarise(config: EvalConfig, n_examples: int, items: list[ItemResult], duration_s: float,
              min_score: float | None) -> EvalResult:
    failed = [i for i in items if i.error is not None]
    if len(failed) == len(items):
        raise EvalError(f"every one of {len(items)} requests failed; the first: {failed[0].error}")
    scores = [sum(i.score for i in items if i.repeat == r) / n_examples for r in range(1, config.repeats + 1)]
    mean = statistics.fmean(scores)
    latencies = [i.latency_s for i in items if i.latency_s is not None]
    return EvalResult(
        model=config.model, scorer=config.scorer, examples=n_examples, repeats=config.repeats,
        score=mean, score_std=statistics.stdev(scores) if len(scores) > 1 else 0.0, scores=scores,
        latency_s={f"p{q}": percentile(latencies, q) for q in (50, 90, 99)},
        requests=len(items), errors=len(failed), duration_s=duration_s,
        first_error=failed[0].error if failed else None,
        min_score=min_score, passed=None if min_score is None else mean >= min_score, items=items,
    )


def item_json(item: ItemResult) -> str:
    return json.dumps(asdict(item), separators=(",", ":"))
