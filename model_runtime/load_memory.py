"""Process memory while loading: big load-time temporaries go straight back to the OS (glibc)."""

from __future__ import annotations

import functools
from typing import Any


@functools.cache
def _libc() -> Any | None:
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return None


def release_free_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc malloc_trim): loading frees many float
    temporaries below malloc's mmap threshold, which otherwise stay in the process's RSS."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


# glibc mallopt parameters
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

# After loading: blocks up to glibc's largest mmap threshold (32 MiB) come from the heap and are reused from step
# to step, and up to SERVING_TRIM_BYTES of freed heap stays mapped. A prefill chunk's tensors (512 rows: 10-20 MB
# each for the 0.5B's MLP) then reuse the same pages forward after forward; mmapped, each was zero-filled page by
# page again on every use: measured 6.7 M minor page faults and ~16 s of system time for 4 forwards of 1,024
# prompt tokens (0.5B int8, 2 vCPUs), and the forward itself 1.6x slower (3.2 s -> 1.9 s with the heap). The cost is
# the working set of the largest forward kept resident (~100-300 MB), bounded by the trim threshold.
SERVING_MMAP_THRESHOLD = 32 << 20
SERVING_TRIM_BYTES = 256 << 20
SERVING_TOP_PAD = 64 << 20


class LoadTimeMalloc:
    """While loading, blocks >= 256 KiB come from mmap and go back to the OS the moment they are
    freed (quantization temporaries then never pile up in the heap: lower peak RSS). Afterwards the
    serving settings above (serving_malloc)."""

    def __enter__(self) -> None:
        libc = _libc()
        if libc is not None:
            libc.mallopt(M_MMAP_THRESHOLD, 256 << 10)

    def __exit__(self, *exc: object) -> None:
        release_free_memory()
        serving_malloc()


def serving_malloc() -> None:
    """The heap settings for serving (see SERVING_MMAP_THRESHOLD)."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, SERVING_MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, SERVING_TRIM_BYTES)
        libc.mallopt(M_TOP_PAD, SERVING_TOP_PAD)
