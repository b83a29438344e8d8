"""Prefill GEMMs for quantized weights on the CPU's matrix engines (a chunk of prompt rows at once).

Decode multiplies a few rows by each weight and is bound by memory: our integer kernels (ckernels.py)
run it near bandwidth. A prefill chunk multiplies hundreds of rows by the same weight and is bound by
arithmetic, where those kernels (one weight row against four activation rows at a time) reach
~120 GFLOP/s on this project's 2-vCPU AVX-512 machines. PyTorch's oneDNN GEMMs use the matrix
engines instead. Measured here (M=256 rows, 2 threads, AVX512-VNNI + AVX512-BF16, no AMX; the
kernel table of `make bench`, bench/kernels.py, has the per-shape figures):
  torch._int_mm (int8 x int8 -> int32, VNNI):                    ~480-800 GOP/s
  F.linear in bfloat16 (oneDNN brgemm avx512_core_bf16, no AMX): ~140 GFLOP/s (slower than float32's ~220)
  our dq kernels (int8 / int4):                                   ~110-125 GFLOP/s
So the kernel the plan picks (KernelPlan.prefill_kernel) is:
- "int8mm": activations quantized to int8 with one scale per row and chunk of values along K
  (pf_quantize_rows), int8 weights used as stored (one scale per output channel), int4 weights
  requantized to int8 with one scale per output channel and chunk, a layer at a time into a reused
  scratch buffer (pf_w4_to_i8: no cached copy, no extra resident memory); one `torch._int_mm` per
  chunk, each finished by y (+)= acc * row scale * channel scale (+ bias) in one pass. The chunks
  keep the rounding local. Real 0.5B int4, perplexity on bench/ppl_text.py vs the dq kernels' 25.495:
  one scale per whole row 25.794 (+1.17%), chunks of 1024 25.641 (+0.57%), 512 25.463 (-0.13%),
  256 25.487: int4 takes CHUNK_K = 512. int8 weights (their own scale per output channel: only the
  activations are chunked) take W8_CHUNK_K = 1024: on a Zen 4 VM (session 9) 512 gave 24.436, 1024
  24.462 (+0.11%), 896 24.454, whole rows 24.502 (+0.27%), and a K = 896 row in one chunk saves an
  _int_mm call and a scaling pass: the 0.5B's linears over 285 prompt rows 334 -> 306 ms, 64 rows
  83 -> 75 ms. CPUs with AMX-INT8 (where oneDNN multiplies on the tile engine).
- "int8vnni": the same int8 codes, scales and float steps (the same bytes as "int8mm"), multiplied by our own
  AVX512-VNNI GEMM (csrc/prefill_kernels.c, pf_w8_gemm) in one call per linear. `_int_mm` takes the weights in
  PyTorch's layout, so oneDNN reorders them into its own on every call (inferred from its timings: at 8 rows it
  reads the gate_up weights at 9-20 GB/s, our kernels at 30+; not traced inside oneDNN), and in a forward they
  arrive from memory (each layer's read once); ours reads them in place, prefetching the next panel into L2. Measured on a Zen 4 VM (2 vCPUs, AVX-512 on
  half-width units, no AMX) over 24 distinct copies of the 0.5B's four layer shapes, as a forward meets them
  (median of 5): 16 rows 52.9 -> 31.9 ms, 64 rows 99.1 -> 78.7, 256 rows 292.9 -> 270.0 (without the
  prefetch 39.9 / 89.6 / 281.1). CPUs with AVX512-VNNI and no AMX.
- "int8avx2": the same int8 codes, scales and float steps again (the same bytes), multiplied by our AVX2 GEMM
  (pf_w8_gemm_avx2: |w| . sign(x, w) by vpmaddubsw, widened by vpmaddwd, rows in lanes) on CPUs with AVX2 and
  neither AVX512-VNNI nor AMX, where prompt rows ran on the decode kernels (one weight row against 4 activation
  rows, every row's codes read from L2 once per weight row and each block's lanes summed horizontally). Measured
  on a 2-vCPU AMD EPYC Zen 1 VM (AVX2 only; 256-bit multiplies as two halves on one unit), the 0.5B's four
  int8 layer shapes, median of 7 alternating: 16 / 64 / 256 rows 12.36 / 42.42 / 156.87 -> 9.32 / 29.66 / 112.91
  ms (68 GOP/s at 256 rows, about what that CPU's two multiplies per 32 products allow; ahead from
  PREFILL_MIN_ROWS on; at 8 rows no faster, one tile a pass). int4 weights under "int8avx2" are not requantized
  (that measured no faster than the decode kernels: choose_kernel): pf_w4_gemm_avx2 multiplies their own codes
  (0..15, so 8 vpmaddubsw pair sums add up in int16 before one vpmaddwd: ~1.1 multiplies per 32 products against
  int8's 2), the activations quantized per row and group as the decode kernels quantize them (the same codes, the
  same integer sum per group; only the float steps' order differs).
- "bf16": weights dequantized to bfloat16 a layer at a time (int8: codes * scale; int4: pf_w4_to_bf16)
  and oneDNN's bf16 GEMM. Selectable (DISTILLERY_PREFILL=bf16) for CPUs where the bf16 engine
  (AMX-BF16) outruns the int8 one; not the default anywhere until measured on such a CPU.
- "none": every row through the decode kernels (the path of before: CPUs without AVX2, int4 weights on AVX2 alone).
Rows fewer than KernelPlan.prefill_min_rows (decode batches) stay on the decode kernels.

The C helpers (csrc/prefill_kernels.c) build like ckernels' library: once per source hash, with the
system C compiler, into DISTILLERY_KERNEL_DIR; `python -m model_runtime.prefill build` at image build.
"""

from __future__ import annotations

import ctypes
import functools
import sys
import threading
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from model_runtime.ckernels import HEADER, KernelUnavailable, compile_library, kernel_dir, source_digest

SOURCE = Path(__file__).parent / "csrc" / "prefill_kernels.c"
ABI_VERSION = 8
# AVX2 code (it also runs where the plan picks a prefill kernel: AVX-512 CPUs); no FMA contraction, so
# dequantized values equal PyTorch's (c - 8) * s + z bit for bit
CFLAGS = ["-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fno-math-errno", "-fopenmp", "-fPIC", "-shared",
          "-std=c11"]
PREFILL_KERNELS = ("none", "int8mm", "int8vnni", "int8avx2", "bf16")
# the kernels that multiply int8 codes with int32 sums: the same bytes, different engines (int8mm: oneDNN's, for
# AMX; int8vnni: pf_w8_gemm, for AVX512-VNNI without AMX; int8avx2: pf_w8_gemm_avx2, for AVX2 alone)
INT8_GEMMS = ("int8mm", "int8vnni", "int8avx2")
Norm = tuple[Tensor, float]  # an RMSNorm to apply to a linear's input rows first: (weight [K] float32, eps)
# int8 weights' code sums per block of input features, as the decode kernels keep them (ckernels.w8_block_sums:
# int32 [N, K / block]) with that block
CodeSums = tuple[Tensor, int]
VNNI512_FLAGS = frozenset({"avx512_vnni", "avx512bw", "avx512vl", "avx512dq"})  # what pf_w8_gemm's code runs on
AVX2_FLAGS = frozenset({"avx2", "fma"})  # what pf_w8_gemm_avx2's code runs on (the library's -mavx2 -mfma)
OWN_GEMM_FLAGS = {"int8vnni": VNNI512_FLAGS, "int8avx2": AVX2_FLAGS}
MAX_VNNI_CHUNK = 1 << 17  # our GEMMs' chunks: a chunk's integer sum (and 128 x its weight sum) stays within int32
# Fewer rows than this run on the decode kernels. Measured here (2 threads, VNNI): int8mm is ahead of
# the dq kernels from 16 rows on for every 0.5B shape (1.6-2.5x at 16, 3-5x at 64 and 256) and behind
# at 1-4 rows (where reading the weight once is all that matters); decode batches are <= 8-16 rows.
PREFILL_MIN_ROWS = 16
CHUNK_K = 512  # int4: values along K sharing one activation / requantized-weight scale (see above)
W8_CHUNK_K = 1024  # int8 weights (one scale per output channel): values along K sharing one activation scale


def choose_kernel(cpu_flags: frozenset[str] | set[str], override: str | None = None,
                  quantization: str = "int8") -> tuple[str, str]:
    """(prefill kernel, why) for a CPU with these /proc/cpuinfo flags and weights of this quantization; override:
    DISTILLERY_PREFILL."""
    if override:
        if override not in PREFILL_KERNELS:
            raise ValueError(f"DISTILLERY_PREFILL={override!r}: expected one of {', '.join(PREFILL_KERNELS)}")
        needs = OWN_GEMM_FLAGS.get(override, frozenset())
        if not cpu_flags >= needs:
            raise ValueError(f"DISTILLERY_PREFILL={override}: this CPU lacks " + ", ".join(sorted(needs - cpu_flags)))
        return override, f"DISTILLERY_PREFILL={override}"
    if "amx_int8" in cpu_flags:
        return "int8mm", "AMX-INT8: torch._int_mm for prompt chunks"
    if cpu_flags >= VNNI512_FLAGS:
        return "int8vnni", "AVX512-VNNI without AMX: pf_w8_gemm for prompt chunks (bf16 GEMM measured slower)"
    if "avx512_vnni" in cpu_flags:  # (a VM hiding AVX512-BW/VL/DQ: oneDNN picks its own code)
        return "int8mm", "AVX512-VNNI without BW/VL/DQ: torch._int_mm for prompt chunks"
    if cpu_flags >= AVX2_FLAGS and quantization == "int4":
        # requantized to int8, int4 weights took two multiplies per 32 products here, no faster than the decode
        # kernels (Zen 1, the 0.5B's four shapes at 16 / 64 / 256 rows: 26.37 / 51.42 / 145.72 vs 26.73 / 41.94 /
        # 149.70 ms); on their own codes (pf_w4_gemm_avx2, int16 sums: ~1.1 multiplies per 32) 1.2-1.5x per shape at
        # 256 rows and 1.33x the TTFT on 1,000 tokens (Zen 1, session 19; the module's note)
        return "int8avx2", "AVX2 without AVX512-VNNI/AMX, int4 weights: pf_w4_gemm_avx2 on their own codes"
    if cpu_flags >= AVX2_FLAGS:
        return "int8avx2", "AVX2 without AVX512-VNNI/AMX: pf_w8_gemm_avx2 for prompt chunks"
    return "none", "no AVX2: prompt chunks on the decode kernels"


def cpuinfo() -> dict[str, str]:
    """The first CPU's fields of /proc/cpuinfo ({} where it cannot be read)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, sep, value = line.partition(":")
            if not sep:
                if fields:
                    break  # the blank line after the first processor
                continue
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_flags() -> frozenset[str]:
    return frozenset(cpuinfo().get("flags", "").split())


# ---- the C helpers --------------------------------------------------------------------------------
def library_path() -> Path:
    return kernel_dir() / f"prefill_kernels-{source_digest(SOURCE, (HEADER,), CFLAGS)}.so"


def build(dest: Path | None = None) -> Path:
    """Compile the library (atomically, by ckernels.compile_library)."""
    return compile_library(SOURCE, CFLAGS, dest or library_path())


_lock = threading.Lock()
_lib: ctypes.CDLL | None = None


def load() -> ctypes.CDLL:
    """Build (once) and load the library; KernelUnavailable says why it cannot be used."""
    global _lib
    with _lock:
        if _lib is not None:
            return _lib
        try:
            lib = ctypes.CDLL(str(build()))
        except OSError as exc:
            raise KernelUnavailable(f"loading the prefill kernels failed: {exc}") from exc
        if lib.pf_abi_version() != ABI_VERSION:
            raise KernelUnavailable(f"prefill kernels ABI {lib.pf_abi_version()}, expected {ABI_VERSION}")
        p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        lib.pf_quantize_rows.argtypes = [p, i64, i64, i64, p, ctypes.c_float, p, p, i32]
        lib.pf_quantize_rows.restype = i32
        lib.pf_w4_to_i8.argtypes = [p, p, p, i64, i64, i64, i64, p, p, i32]
        lib.pf_w4_to_i8.restype = i32
        lib.pf_w4_to_bf16.argtypes = [p, p, p, i64, i64, i64, p, i32]
        lib.pf_w4_to_bf16.restype = i32
        lib.pf_scale_rows.argtypes = [p, i64, i64, p, i64, p, p, p, i32, i32]
        lib.pf_scale_rows.restype = None
        lib.pf_w8_gemm_scratch.argtypes = [i64, i64, i64]
        lib.pf_w8_gemm_scratch.restype = i64
        lib.pf_w8_gemm.argtypes = [p, p, i64, i64, i64, p, i64, p, i64, p, p, i32, p, i64, p, i32]
        lib.pf_w8_gemm.restype = i32
        lib.pf_w8_gemm_avx2.argtypes = [p, p, i64, i64, i64, p, i64, p, i64, p, p, i32, p, i32]
        lib.pf_w8_gemm_avx2.restype = i32
        lib.pf_w4_gemm_scratch.argtypes = [i64, i64, i64, i32]
        lib.pf_w4_gemm_scratch.restype = i64
        lib.pf_w4_gemm_avx2.argtypes = [p, p, i64, i64, i64, p, p, p, i64, p, p, i32, p, i32]
        lib.pf_w4_gemm_avx2.restype = i32
        _lib = lib
        return lib


# A scratch buffer larger than this is allocated per call and freed, not kept: the int32 product of a
# vocabulary-sized head over a whole chunk (prompt logprobs: 256 x 151936 x 4 B = 155 MB) must not stay
# resident. The decoder's buffers stay below it (the 0.5B's largest: gate_up 9728 x 896 int8 = 8.7 MB).
SCRATCH_KEEP_BYTES = 64 << 20
SCRATCH_VIEWS = 64  # views of the scratch buffers kept for reuse, per thread


class _Scratch(threading.local):
    """Grow-only buffers reused from layer to layer (one set per thread that runs the model): a
    layer's int8 weight, its activation codes and the int32 product are rewritten, not reallocated.
    Resident cost: the largest of each (at most SCRATCH_KEEP_BYTES each)."""

    def __init__(self) -> None:
        self.bufs: dict[str, Tensor] = {}
        # the views handed out, by (name, shape, dtype): a forward asks for the same few shapes layer after layer,
        # and slicing and viewing anew (3 calls a prompt linear) cost a 7 + 57-row step of the 0.5B int8 3.1-3.8 ms
        # (median of 60 paired steps, twice; ~110-125 ms a step)
        self.views: dict[tuple[str, tuple[int, ...], torch.dtype], Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        key = (name, shape, dtype)
        view = self.views.get(key)
        if view is not None:
            return view
        n = 1
        for d in shape:
            n *= d
        nbytes = n * dtype.itemsize
        if nbytes > SCRATCH_KEEP_BYTES:
            return torch.empty(shape, dtype=dtype)
        buf = self.bufs.get(name)
        if buf is None or buf.numel() < nbytes:
            buf = self.bufs[name] = torch.empty(nbytes, dtype=torch.uint8)
            # views of the old buffer would keep it alive and hand out memory no longer the buffer's
            self.views = {k: v for k, v in self.views.items() if k[0] != name}
        if len(self.views) >= SCRATCH_VIEWS:  # (row counts vary from chunk to chunk: keep the cache small)
            self.views.clear()
        view = self.views[key] = buf[:nbytes].view(dtype).view(shape)
        return view


_scratch = _Scratch()


def _check(t: Tensor, dtype: torch.dtype, shape: tuple[int, ...], what: str) -> None:
    """The C side reads raw pointers: refuse a tensor of the wrong dtype, shape or layout."""
    if t.dtype != dtype or tuple(t.shape) != shape or not t.is_contiguous() or t.device.type != "cpu":
        raise ValueError(f"{what} must be a contiguous CPU {dtype} tensor of shape {shape}, got "
                         f"{t.dtype} {tuple(t.shape)}")


def _check_w4(w: Tensor, s: Tensor, z: Tensor, group: int, k: int | None = None) -> tuple[int, int]:
    """int4 weights in the dq layout (w [N, K/2] uint8, bf16 scales / zeros [N, K/group]; K from w unless given):
    refused unless so; returns (N, K)."""
    n, k = w.shape[0], w.shape[1] * 2 if k is None else k
    _check(w, torch.uint8, (n, k // 2), "w")
    _check(s, torch.bfloat16, (n, k // group), "scales")
    _check(z, torch.bfloat16, (n, k // group), "zeros")
    return n, k


@functools.cache
def _runs_own(gemm: str) -> bool:
    """Whether this CPU runs our GEMM `gemm` (OWN_GEMM_FLAGS; elsewhere it multiplies on _int_mm: the same bytes)."""
    return gemm in OWN_GEMM_FLAGS and cpu_flags() >= OWN_GEMM_FLAGS[gemm]


def _n_chunks(k: int, chunk: int) -> int:
    return -(-k // chunk)


def quantize_rows(x: Tensor, chunk: int = CHUNK_K, out: tuple[Tensor, Tensor] | None = None,
                  norm: Norm | None = None) -> tuple[Tensor, Tensor]:
    """x [M, K] float32 -> (codes int8 [M, K], scales float32 [M, ceil(K / chunk)]): each chunk of
    `chunk` values of a row ~ its codes * its scale. norm: (weight [K], eps): the rows RMSNorm'd first, in the
    same pass (as the decode kernels normalise a row)."""
    m, k = x.shape
    _check(x, torch.float32, (m, k), "x")
    nc = _n_chunks(k, chunk)
    if norm is not None and k % 8:  # (the C norm's 8 lanes; no model here has such a width)
        x, norm = _normed(x, norm), None
    if norm is not None:
        _check(norm[0], torch.float32, (k,), "norm weight")
    q, xs = out if out is not None else (torch.empty((m, k), dtype=torch.int8), torch.empty((m, nc)))
    _check(xs, torch.float32, (m, nc), "row scales")
    if load().pf_quantize_rows(x.data_ptr(), m, k, chunk, None if norm is None else norm[0].data_ptr(),
                               0.0 if norm is None else norm[1], q.data_ptr(), xs.data_ptr(),
                               torch.get_num_threads()) != 0:
        raise MemoryError(f"pf_quantize_rows: no memory for a row of {k} values")
    return q, xs


def w4_to_i8(w: Tensor, s: Tensor, z: Tensor, group: int, chunk: int = CHUNK_K,
             out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """int4 (dq layout [N, K/2], bf16 scales/zeros [N, K/group]) -> (int8 codes [N, K], float32 scales
    [ceil(K / chunk), N]): each chunk of `chunk` values of a row ~ its codes * its scale."""
    n, k = _check_w4(w, s, z, group)
    nc = _n_chunks(k, chunk)
    codes, ws = out if out is not None else (torch.empty((n, k), dtype=torch.int8), torch.empty((nc, n)))
    _check(ws, torch.float32, (nc, n), "channel scales")
    if load().pf_w4_to_i8(w.data_ptr(), s.data_ptr(), z.data_ptr(), n, k, group, chunk, codes.data_ptr(),
                          ws.data_ptr(), torch.get_num_threads()) != 0:
        raise RuntimeError(f"pf_w4_to_i8 failed (N={n}, K={k}, group={group})")
    return codes, ws


def w4_to_bf16(w: Tensor, s: Tensor, z: Tensor, group: int, out: Tensor | None = None) -> Tensor:
    """int4 (dq layout) -> bfloat16 [N, K]: dequantize_int4's float32 values rounded to bfloat16."""
    n, k = _check_w4(w, s, z, group)
    y = out if out is not None else torch.empty((n, k), dtype=torch.bfloat16)
    if load().pf_w4_to_bf16(w.data_ptr(), s.data_ptr(), z.data_ptr(), n, k, group, y.data_ptr(),
                            torch.get_num_threads()) != 0:
        raise RuntimeError(f"pf_w4_to_bf16 failed (N={n}, K={k}, group={group})")
    return y


def _scale_rows(acc: Tensor, xs: Tensor, c: int, ws: Tensor, bias: Tensor | None, y: Tensor,
                accumulate: bool) -> None:
    """y (+)= acc * xs[:, c][:, None] * ws[None, :] (+ bias): chunk c's int32 product, scaled."""
    m, n = acc.shape
    _check(xs, torch.float32, (m, xs.shape[1]), "row scales")
    _check(ws, torch.float32, (n,), "channel scales")
    if bias is not None:
        _check(bias, torch.float32, (n,), "bias")
    _check(y, torch.float32, (m, n), "out")
    if not 0 <= c < xs.shape[1]:
        raise ValueError(f"chunk {c} of {xs.shape[1]}")
    load().pf_scale_rows(acc.data_ptr(), m, n, xs.data_ptr() + 4 * c, xs.shape[1], ws.data_ptr(),
                         None if bias is None else bias.data_ptr(), y.data_ptr(), int(accumulate),
                         torch.get_num_threads())


def _int8mm(x: Tensor, codes: Tensor, ws: Tensor, bias: Tensor | None, out: Tensor | None, chunk: int,
            gemm: str = "int8mm", norm: Norm | None = None, code_sums: CodeSums | None = None) -> Tensor:
    """ws: [N] (one scale per output channel for every chunk: int8 weights) or [chunks, N] (int4 requantized, with
    the same `chunk`). gemm: which engine multiplies the int8 codes (INT8_GEMMS; the same bytes either way).
    norm: x RMSNorm'd first (quantize_rows). code_sums: the codes' sums per block (see CodeSums), which our VNNI
    GEMM reads instead of summing the codes again; unused elsewhere (the AVX2 GEMM's codes need no correction)."""
    m, k = x.shape
    n = codes.shape[0]
    nc = _n_chunks(k, chunk)
    if ws.dim() == 2 and ws.shape[0] != nc:
        raise ValueError(f"{ws.shape[0]} weight-scale chunks for {nc} activation chunks of {chunk}")
    q, xs = quantize_rows(x, chunk, (_scratch.get("xq", (m, k), torch.int8),
                                     _scratch.get("xs", (m, nc), torch.float32)), norm)
    y = out if out is not None else torch.empty((m, n))
    if k % 8 == 0 and chunk % 8 == 0 and chunk <= MAX_VNNI_CHUNK and _runs_own(gemm):
        _own_gemm(gemm, q, xs, codes, ws, bias, y, out is not None, chunk, code_sums)
    else:
        _int_mm_chunks(q, xs, codes, ws, bias, y, out is not None, chunk)
    return y


def _own_gemm(gemm: str, q: Tensor, xs: Tensor, codes: Tensor, ws: Tensor, bias: Tensor | None, y: Tensor,
              accumulate: bool, chunk: int, code_sums: CodeSums | None = None) -> None:
    """y (+)= the int8 product of every chunk, scaled, in one call of our GEMM: pf_w8_gemm (int8vnni) or
    pf_w8_gemm_avx2 (int8avx2)."""
    m, k = q.shape
    n = codes.shape[0]
    _check(y, torch.float32, (m, n), "out")
    _check(ws, torch.float32, (n,) if ws.dim() == 1 else (_n_chunks(k, chunk), n), "channel scales")
    if bias is not None:
        _check(bias, torch.float32, (n,), "bias")
    sums, block = code_sums if code_sums is not None else (None, 0)
    if sums is not None:
        if block <= 0 or k % block:
            raise ValueError(f"code sums per block of {block} for {k} input features")
        _check(sums, torch.int32, (n, k // block), "code sums")
        if chunk % block:  # (a chunk's sum would split a block: the kernel sums the codes itself)
            sums, block = None, 0
    lib = load()
    buf = _scratch.get("pg", (lib.pf_w8_gemm_scratch(m, k, chunk) + 64,), torch.uint8)
    at = buf.data_ptr() + (-buf.data_ptr()) % 64  # (the kernel's aligned loads)
    args = (q.data_ptr(), xs.data_ptr(), m, k, chunk, codes.data_ptr(), n, ws.data_ptr(), n if ws.dim() == 2 else 0,
            None if bias is None else bias.data_ptr(), y.data_ptr(), int(accumulate))
    if gemm == "int8avx2":
        rc = lib.pf_w8_gemm_avx2(*args, at, torch.get_num_threads())
    else:
        rc = lib.pf_w8_gemm(*args, None if sums is None else sums.data_ptr(), block, at, torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"{gemm} GEMM failed (M={m}, N={n}, K={k}, chunk={chunk})")


def _int_mm_chunks(q: Tensor, xs: Tensor, codes: Tensor, ws: Tensor, bias: Tensor | None, y: Tensor,
                   accumulate: bool, chunk: int) -> None:
    """y (+)= the int8 product chunk by chunk: one torch._int_mm and one scaling pass (pf_scale_rows) each."""
    m, k = q.shape
    acc = _scratch.get("acc", (m, codes.shape[0]), torch.int32)
    for c in range(_n_chunks(k, chunk)):
        k0, k1 = c * chunk, min(k, (c + 1) * chunk)
        torch._int_mm(q[:, k0:k1], codes[:, k0:k1].t(), out=acc)
        _scale_rows(acc, xs, c, ws if ws.dim() == 1 else ws[c], bias if c == 0 else None, y,
                    accumulate=accumulate or c > 0)


def linear_w8(kernel: str, x: Tensor, codes: Tensor, ws: Tensor, bias: Tensor | None,
              out: Tensor | None = None, norm: Norm | None = None, code_sums: CodeSums | None = None) -> Tensor:
    """x [M, K] float32 @ (codes int8 [N, K] * ws float32 [N])^T + bias -> [M, N] float32 (added into out);
    norm (weight, eps): x RMSNorm'd first; code_sums: the codes' block sums, kept with the weights (CodeSums)."""
    m, k = x.shape
    n = codes.shape[0]
    _check(x, torch.float32, (m, k), "x")
    _check(codes, torch.int8, (n, k), "codes")
    if kernel in INT8_GEMMS:
        return _int8mm(x, codes, ws, bias, out, W8_CHUNK_K, kernel, norm, code_sums)
    if kernel != "bf16":
        raise ValueError(f"prefill kernel {kernel!r}")
    w = _scratch.get("wbf16", (n, k), torch.bfloat16)
    torch.mul(codes, ws[:, None], out=w)
    return _finish_bf16(_normed(x, norm), w, bias, out)


def linear_w4(kernel: str, x: Tensor, w: Tensor, s: Tensor, z: Tensor, group: int, bias: Tensor | None,
              out: Tensor | None = None, norm: Norm | None = None) -> Tensor:
    """x [M, K] float32 @ dequant(int4 dq layout)^T + bias -> [M, N] float32 (added into out); norm as linear_w8."""
    m, k = x.shape
    n = w.shape[0]
    _check(x, torch.float32, (m, k), "x")
    if kernel == "int8avx2" and group % 32 == 0 and _runs_own(kernel):
        return _w4_gemm(x, w, s, z, group, bias, out, norm)
    if kernel in INT8_GEMMS:
        codes, ws = w4_to_i8(w, s, z, group, CHUNK_K, (_scratch.get("w8", (n, k), torch.int8),
                                                       _scratch.get("ws", (_n_chunks(k, CHUNK_K), n), torch.float32)))
        return _int8mm(x, codes, ws, bias, out, CHUNK_K, kernel, norm)
    if kernel != "bf16":
        raise ValueError(f"prefill kernel {kernel!r}")
    return _finish_bf16(_normed(x, norm), w4_to_bf16(w, s, z, group, _scratch.get("wbf16", (n, k), torch.bfloat16)),
                        bias, out)


def _w4_gemm(x: Tensor, w: Tensor, s: Tensor, z: Tensor, group: int, bias: Tensor | None, out: Tensor | None,
             norm: Norm | None) -> Tensor:
    """int4 weights' own codes on AVX2 (pf_w4_gemm_avx2): x quantized per row and group as the decode kernels
    quantize it (the same codes and scales), each group's integer sum theirs too; y (+)= the product (+ bias)."""
    m, k = x.shape
    n, _ = _check_w4(w, s, z, group, k)
    if bias is not None:
        _check(bias, torch.float32, (n,), "bias")
    q, xs = quantize_rows(x, group, (_scratch.get("xq", (m, k), torch.int8),
                                     _scratch.get("xs", (m, k // group), torch.float32)), norm)
    y = out if out is not None else torch.empty((m, n))
    _check(y, torch.float32, (m, n), "out")
    lib, threads = load(), torch.get_num_threads()
    buf = _scratch.get("pw", (lib.pf_w4_gemm_scratch(m, k, group, threads) + 64,), torch.uint8)
    at = buf.data_ptr() + (-buf.data_ptr()) % 64  # (the kernel's aligned loads)
    if lib.pf_w4_gemm_avx2(q.data_ptr(), xs.data_ptr(), m, k, group, w.data_ptr(), s.data_ptr(), z.data_ptr(), n,
                           None if bias is None else bias.data_ptr(), y.data_ptr(), int(out is not None), at,
                           threads) != 0:
        raise RuntimeError(f"pf_w4_gemm_avx2 failed (M={m}, N={n}, K={k}, group={group})")
    return y


def _normed(x: Tensor, norm: Norm | None) -> Tensor:
    return x if norm is None else F.rms_norm(x, (x.shape[-1],), norm[0], norm[1])


def _finish_bf16(x: Tensor, w: Tensor, bias: Tensor | None, out: Tensor | None) -> Tensor:
    y = F.linear(x.to(torch.bfloat16), w).float()
    if bias is not None:
        y += bias
    if out is not None:
        out += y
        return out
    return y


def main(argv: list[str] | None = None) -> int:
    """`python -m model_runtime.prefill build`: compile now (image builds), print the library path."""
    args = argv if argv is not None else sys.argv[1:]
    if args not in ([], ["build"]):
        print("usage: python -m model_runtime.prefill [build]", file=sys.stderr)
        return 2
    try:
        print(build())
    except KernelUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
