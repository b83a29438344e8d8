"""The serving heap settings (load_memory.serving_malloc): a prefill chunk's big tensors reuse heap pages from
forward to forward instead of being mmapped and zero-filled page by page again on every use."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

# glibc's mallopt settings and its page-fault counts: the runtime's Linux images only
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings: Linux only")
# A 20 MB tensor (a 512-row MLP activation of the 0.5B) allocated, touched and freed 30 times; minor page faults
# counted over the last 19 (the first few grow the heap: glibc's posix_memalign does not refit a freed block
# exactly, as a server's first forwards do). In a fresh process, so the settings of other tests' loads do not leak in.
PROBE = textwrap.dedent("""
    import resource, sys
    import torch
    from model_runtime.load_memory import LoadTimeMalloc
    if sys.argv[1] == "serving":
        with LoadTimeMalloc():
            pass
    def once():
        t = torch.empty(5 << 20, dtype=torch.float32)
        t.fill_(1.0)
        del t
    for _ in range(11):
        once()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(19):
        once()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, timeout=120)
    return int(out.stdout.strip())


def test_serving_heap_reuses_big_blocks_without_page_faults() -> None:
    serving = _faults("serving")
    # 19 x 20 MB in 4 KiB pages is ~97,000 faults when every allocation is a fresh mapping
    assert serving < 2_000, f"{serving} minor page faults: big blocks are not reused from the heap"


def test_load_time_settings_give_big_blocks_back() -> None:
    """The contrast that shows the probe can fail: with blocks >= 256 KiB mmapped (the loading settings, and
    what serving had before), every allocation faults its pages in again."""
    probe = PROBE.replace("with LoadTimeMalloc():\n        pass", "LoadTimeMalloc().__enter__()")
    out = subprocess.run([sys.executable, "-c", probe, "serving"], capture_output=True, text=True, check=True,
                         timeout=120)
    assert int(out.stdout.strip()) > 50_000
