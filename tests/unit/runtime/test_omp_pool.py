"""omp_pool.in_own_thread: the work's OpenMP pool leaves with its thread, results and errors come back."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from model_runtime.omp_pool import in_own_thread


def test_returns_the_result_and_raises_the_error_on_the_callers_thread() -> None:
    assert in_own_thread(lambda: 2 + 3) == 5

    def boom() -> None:
        raise ValueError("bad model")

    with pytest.raises(ValueError, match="bad model"):
        in_own_thread(boom)


def test_the_worker_runs_with_the_callers_thread_count() -> None:
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert in_own_thread(torch.get_num_threads) == 1
    finally:
        torch.set_num_threads(before)


# In a fresh process (this one's threads are whatever earlier tests left): a 2-thread parallel op on a worker
# thread leaves no thread behind, the same op on the main thread leaves its pool's worker.
PROBE = textwrap.dedent("""
    import os, sys, time
    import torch
    from model_runtime.omp_pool import in_own_thread
    def tasks(): return len(os.listdir("/proc/self/task"))
    def work():
        x = torch.randn(4_000_000)
        for _ in range(3):
            (x * 2).sum()
    before = tasks()
    in_own_thread(work)
    for _ in range(50):  # the pool's workers end just after the thread that owned them
        if tasks() == before:
            break
        time.sleep(0.05)
    after_worker = tasks()
    work()
    print(before, after_worker, tasks())
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts the process's threads in Linux's /proc")
def test_the_workers_openmp_pool_leaves_with_it() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=120,
                         env={"OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin"})
    before, after_worker, after_main = map(int, out.stdout.split())
    assert after_worker == before
    assert after_main > before  # the contrast: run on a thread that stays, the pool stays too
