"""The worker pool that keeps CPU-heavy request work (JSON decoding of large bodies, chat
templating, tokenization) off the event loop, so health probes, /metrics and the other clients'
streams keep answering while one request's prompt is being tokenized.

Threads, not processes: the tokenizer is shared, and HF's Rust tokenizer releases the GIL while it
encodes; the Python parts (jinja, JSON checks) yield the GIL every few milliseconds.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class WorkerPool:
    def __init__(self, workers: int = 2) -> None:
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="request-worker")

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
