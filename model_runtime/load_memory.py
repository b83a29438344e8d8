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


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


class LoadTimeMalloc:
    """While loading, blocks >= 256 KiB come from mmap and go back to the OS the moment they are
    freed (quantization temporaries then never pile up in the heap: lower peak RSS). Afterwards
    the threshold is 1 MiB (glibc's default grows it up to 32 MiB as big blocks are freed, and the
    engine thread's arena then keeps ~40 MB of freed step tensors resident); a decode step's
    tensors are below it, only prefill activations and batched logits are mmapped (~0.1 ms each)."""

    def __enter__(self) -> None:
        libc = _libc()
        if libc is not None:
            libc.mallopt(M_MMAP_THRESHOLD, 256 << 10)

    def __exit__(self, *exc: object) -> None:
        libc = _libc()
        if libc is not None:
            libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
        release_free_memory()
