"""Fan-out: one API request (each prompt times n, or best_of) as several engine requests.

Choice i of a prompt gets its own seed (seed + i) and request id; the requests run at once, and one
failure (a full queue: 429) cancels the siblings; streamed deltas are interleaved, held until every
request was accepted so a full queue is still one error before the response starts.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any

from model_runtime.jobs import Delta
from model_runtime.protocol import SEED_MAX, SEED_MIN
from model_runtime.sampling import SamplingParams


def choice_params(params: SamplingParams, seed: int | None, i: int) -> SamplingParams:
    """Choice i of a fan-out: its own seed (seed + i, wrapped into the range torch accepts) when seeded."""
    if seed is None or i == 0:
        return dataclasses.replace(params)
    s = seed + i
    if s > SEED_MAX:
        s = SEED_MIN + (s - SEED_MAX - 1)
    return dataclasses.replace(params, seed=s)


def sub_id(request_id: str, index: int, count: int) -> str:
    return request_id if count == 1 else f"{request_id}-{index}"


async def gather_or_cancel(coros: Sequence[Any]) -> list[Any]:
    """asyncio.gather, but one failure (e.g. a 429) cancels the siblings instead of leaving them
    generating for a response nobody will read."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


_DONE = object()


async def merge(streams: list[tuple[int, AsyncGenerator[Delta, None]]]) -> AsyncIterator[tuple[int, Delta]]:
    """Interleave several jobs' deltas; held until every job yielded its first (accepted) or failed."""
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(index: int, gen: AsyncGenerator[Delta, None]) -> None:
        try:
            async for delta in gen:
                await queue.put((index, delta))
            await queue.put((index, _DONE))
        except Exception as exc:
            await queue.put((index, exc))
        finally:
            await gen.aclose()

    tasks = [asyncio.create_task(pump(index, gen)) for index, gen in streams]
    started: set[int] = set()
    held: list[tuple[int, Delta]] = []
    remaining = len(tasks)
    try:
        while remaining:
            index, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            if item is _DONE:
                remaining -= 1
                continue
            if len(started) < len(streams):
                started.add(index)
                held.append((index, item))
                if len(started) < len(streams):
                    continue
                for pair in held:
                    yield pair
                held = []
                continue
            yield index, item
        for pair in held:
            yield pair
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
