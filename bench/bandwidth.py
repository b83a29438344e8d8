"""The memory-bandwidth bound on decode speed.

Decoding one token reads every non-embedding weight once, plus the lm_head (the embedding lookup reads
one row, which is negligible). So tokens/s <= copy bandwidth / weight bytes read per token. The byte
count depends on how each mode stores its weights (bf16, int8 + a per-output-channel scale, int4 + a
scale and zero per group); `weight_bytes_per_token` is that arithmetic, pure and unit-tested.
`measure_copy_bandwidth` is the one measuring function (numpy and torch copies of large arrays,
counting read + write bytes, and for context a read-only torch sum, on 4 KiB pages and on 2 MiB ones); it runs
in a benchmark subprocess.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

# Bytes of one stored weight element per mode (codes only; scales/zeros are added separately).
_CODE_BYTES = {"fp32": 4.0, "bf16": 2.0, "none": 2.0, "int8": 1.0, "int4": 0.5}


@dataclass(frozen=True)
class ModelShape:
    """The parts of a decoder's config that decide how many weight bytes a token reads."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    head_dim: int | None = None  # defaults to hidden // heads
    qkv_bias: bool = True  # Qwen2 has q/k/v biases; Llama does not

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.head_dim or self.hidden // self.heads)

    @property
    def q_dim(self) -> int:
        return self.heads * (self.head_dim or self.hidden // self.heads)

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelShape:
        model_type = cfg.get("model_type", "qwen2")
        return cls(
            hidden=int(cfg["hidden_size"]),
            layers=int(cfg["num_hidden_layers"]),
            heads=int(cfg["num_attention_heads"]),
            kv_heads=int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
            intermediate=int(cfg["intermediate_size"]),
            vocab=int(cfg["vocab_size"]),
            head_dim=cfg.get("head_dim"),
            qkv_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
        )

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(out_features, in_features) of every decoder Linear, all layers, lm_head excluded."""
        h, q, kv, i = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        per_layer = [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]
        return per_layer * self.layers

    def non_embedding_params(self) -> int:
        linear = sum(n * k for n, k in self.linear_shapes())
        bias = (self.q_dim + 2 * self.kv_dim) * self.layers if self.qkv_bias else 0
        norms = 2 * self.hidden * self.layers + self.hidden
        return linear + bias + norms


def linear_bytes(out_features: int, in_features: int, mode: str, group_size: int = 128,
                 scale_bytes: int = 2) -> float:
    """Stored bytes of one Linear weight: codes plus quantization parameters.

    int8: one scale per output channel. int4: a scale and a zero per group of `group_size` inputs
    per output channel (the layout `_weight_int4pack_mm_for_cpu` reads). fp32/bf16/none: plain.
    """
    if mode not in _CODE_BYTES:
        raise ValueError(f"unknown weight mode {mode!r}; expected one of {sorted(_CODE_BYTES)}")
    codes = out_features * in_features * _CODE_BYTES[mode]
    if mode == "int8":
        return codes + out_features * scale_bytes
    if mode == "int4":
        groups = -(-in_features // group_size)
        return codes + out_features * groups * 2 * scale_bytes
    return codes


def weight_bytes_per_token(shape: ModelShape, mode: str, *, group_size: int = 128,
                           lm_head_mode: str | None = None, float_mode: str | None = None) -> float:
    """Bytes of weights one decode step reads: decoder Linears at `mode`, norms and biases at the
    float width, and the lm_head at `lm_head_mode` (default: the float width, i.e. not quantized;
    our runtime keeps lm_head in bf16 unless told otherwise). The embedding table is not read whole.
    """
    float_mode = float_mode or ("fp32" if mode == "fp32" else "bf16")
    lm_head_mode = lm_head_mode or float_mode
    fbytes = _CODE_BYTES[float_mode]
    total = sum(linear_bytes(n, k, mode, group_size) for n, k in shape.linear_shapes())
    linear_params = sum(n * k for n, k in shape.linear_shapes())
    total += (shape.non_embedding_params() - linear_params) * fbytes  # biases and norms
    total += linear_bytes(shape.vocab, shape.hidden, lm_head_mode, group_size)
    return total


def bound_tok_s(bandwidth_bytes_s: float, bytes_per_token: float) -> float:
    """The decode rate that memory bandwidth allows: one full read of the weights per token."""
    if bytes_per_token <= 0:
        raise ValueError("bytes_per_token must be positive")
    return bandwidth_bytes_s / bytes_per_token


def fraction_of_bound(measured_tok_s: float | None, bound: float) -> float | None:
    return None if measured_tok_s is None else measured_tok_s / bound


def gguf_bytes_per_token(path: str) -> dict[str, Any]:
    """Weight bytes llama.cpp reads per token for a GGUF: every tensor except the token embedding,
    which is read whole only when it doubles as the output matrix (no separate `output.weight`)."""
    import gguf  # the runtime extra ships it

    reader = gguf.GGUFReader(path)
    sizes = {t.name: int(t.n_bytes) for t in reader.tensors}
    total = sum(sizes.values())
    tied = "output.weight" not in sizes
    embd = sizes.get("token_embd.weight", 0)
    return {"bytes_per_token": total if tied else total - embd, "file_tensor_bytes": total,
            "tied_output": tied}


@dataclass
class Bandwidth:
    numpy_gb_s: float
    torch_gb_s: float
    array_mib: int
    threads: int
    # a read-only stream (torch sum): what a decode step does with its weights; context, not the bound
    torch_read_gb_s: float | None = None
    # the same stream on 2 MiB pages (huge_page_stream; None where it did not get them), and how much of it the kernel
    # gave as huge pages
    torch_read_huge_gb_s: float | None = None
    huge_page_kib: int | None = None

    @property
    def best_gb_s(self) -> float:
        return max(self.numpy_gb_s, self.torch_gb_s)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "best_gb_s": round(self.best_gb_s, 3)}


def _best_seconds(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def read_gb_s(src: Tensor, repeats: int = 3) -> float:
    """Best-of-`repeats` read-only stream over `src` (torch sum) in GB/s, on the caller's threads: what a decode step
    does with its weights (bench.kernels pairs it with each step timing)."""
    return round(src.numel() * src.element_size() / _best_seconds(lambda: float(src.sum()), repeats) / 1e9, 3)


HUGE_PAGE = 2 << 20


def huge_page_stream(mib: int) -> tuple[Tensor, int]:
    """A float64 array of `mib` MiB asked onto 2 MiB pages (madvise(MADV_HUGEPAGE) before its first touch: what
    transparent huge pages in "madvise" mode need) and how many KiB of it the kernel gave as huge pages (0 where it
    gave none, or cannot advise). On this project's VMs a read-only stream of 4 KiB pages (how PyTorch allocates by
    default, the runtime's weights included) runs at ~28-34 GB/s and the same stream on 2 MiB pages at ~50-62: the
    TLB misses of 4 KiB pages under the hypervisor's nested page tables cost half the bandwidth."""
    import mmap

    import torch

    size = mib << 20
    # private anonymous memory, untouched (mmap(-1) alone maps shared memory, which THP leaves out); 2 MiB-aligned inside
    region = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(AttributeError, OSError):
        region.madvise(mmap.MADV_HUGEPAGE)
    whole = torch.frombuffer(region, dtype=torch.uint8)  # keeps `region` alive
    start = -whole.data_ptr() % HUGE_PAGE
    arr = whole[start:start + size].view(torch.float64)
    # the kernel merges neighbouring advised mappings (another such stream, PyTorch's own with THP_MEM_ALLOC_ENABLE):
    # count what this array's first touch added, at most its size
    before = _anon_huge_kib(arr.data_ptr(), size)
    arr.fill_(1.0)
    return arr, max(0, min(size >> 10, _anon_huge_kib(arr.data_ptr(), size) - before))


def mostly_huge(kib: int | None, mib: int) -> bool:
    """Whether a huge_page_stream of `mib` MiB got at least 90% of it on huge pages (else its read says nothing
    about them: THP off, or memory too fragmented to give them)."""
    return kib is not None and kib >= 0.9 * (mib << 10)


def _anon_huge_kib(addr: int, size: int) -> int:
    """AnonHugePages (KiB) of the mappings that overlap [addr, addr + size), from /proc/self/smaps."""
    total, inside = 0, False
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        head = line.split(maxsplit=1)[0] if line else ""
        if "-" in head and not head.endswith(":"):
            lo, _, hi = head.partition("-")
            inside = int(lo, 16) < addr + size and int(hi, 16) > addr
        elif inside and head == "AnonHugePages:":
            total += int(line.split()[1])
    return total


def measure_copy_bandwidth(array_mib: int = 512, repeats: int = 5, threads: int = 2) -> Bandwidth:
    """Best-of-`repeats` copy bandwidth of an `array_mib` array; read + write bytes are counted."""
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    n = array_mib * (1 << 20) // 8
    src = np.ones(n, dtype=np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in before timing
    numpy_gb_s = 2 * src.nbytes / _best_seconds(lambda: np.copyto(dst, src), repeats) / 1e9

    tsrc = torch.from_numpy(src)
    tdst = torch.from_numpy(dst)
    tdst.copy_(tsrc)
    torch_gb_s = 2 * src.nbytes / _best_seconds(lambda: tdst.copy_(tsrc), repeats) / 1e9
    read = read_gb_s(tsrc, repeats)
    huge, huge_kib = huge_page_stream(array_mib)
    return Bandwidth(round(numpy_gb_s, 3), round(torch_gb_s, 3), array_mib, threads, read,
                     read_gb_s(huge, repeats) if mostly_huge(huge_kib, array_mib) else None, huge_kib)
