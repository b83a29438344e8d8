"""One OpenMP thread pool per process: heavy CPU work runs on one thread at a time, and a thread that did
heavy work once and will not again (loading) exits so that its pool goes with it.

Why: an OpenMP pool belongs to the thread that starts a parallel region, and libgomp (PyTorch's OpenMP, which our
C kernels share) counts the threads of every pool in the process; once they outnumber the CPUs it "throttles":
idle workers spin ~100 iterations instead of ~300,000 before sleeping, so every parallel region (hundreds per
decode step) waits for a futex wake-up. The runtime loads the model on the caller's thread and decodes on the
engine thread: two pools of two threads on a 2-vCPU machine. Measured (0.5B int8, batch-8 decode step, 2 threads):
37-41 ms with the model run on the thread that loaded it, 61-67 ms on a second thread, 34 ms on a second thread
when the loading thread had exited; in the engine (8 users, 256-token prompts) every forward was ~1.8x slower.
No environment variable lifts the throttled spin count (GOMP_SPINCOUNT only lowers it).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch

T = TypeVar("T")
P = ParamSpec("P")


def name_os_thread(name: str) -> None:
    """Give the calling thread an OS-visible name (top -H, /proc/PID/task/*/comm; at most 15 bytes): which thread
    burns the CPU is then visible from outside the process."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):  # not Linux
        pass


def in_own_thread(fn: Callable[[], T], name: str = "distillery-load") -> T:
    """fn() on a fresh thread that exits when it returns (its OpenMP pool with it), with the caller's torch thread
    count; returns its result or raises its exception here."""
    threads = torch.get_num_threads()
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            if torch.get_num_threads() != threads:  # (setting it starts a thread that outlives this one)
                torch.set_num_threads(threads)
            result.append(fn())
        except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
            error.append(exc)

    worker = threading.Thread(target=run, name=name, daemon=True)
    worker.start()
    worker.join()
    if error:
        raise error[0]
    return result[0]


def on_own_thread(fn: Callable[P, T]) -> Callable[P, T]:
    """fn, run by in_own_thread on every call (its signature kept for callers and type checkers)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        return in_own_thread(lambda: fn(*args, **kwargs))

    return wrapper
