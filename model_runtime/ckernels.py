"""Build, load and call the AVX2 integer-dot-product linear kernels in csrc/dq_kernels.c.

Why a C kernel: on an AVX2-only CPU PyTorch's weight-only kernels widen every weight to float and
are compute-bound far below memory bandwidth (see kernels.py). dq_kernels.c quantizes the
activations to int8 per block and multiplies on 8-bit integer instructions instead, so decoding
runs near memory speed and a decode batch reuses each weight row from L1.

The library is compiled once per source hash with the system C compiler (`cc`, ~1 s) into
DISTILLERY_KERNEL_DIR (default ~/.cache/distillery/kernels) and loaded with ctypes; the runtime
image builds it at image build time (`python -m model_runtime.ckernels build`). It links
OpenMP by soname, so it shares the libgomp that torch has already loaded (one thread pool).

Backend choice (DISTILLERY_CPU_KERNELS, or the serving command's --kernel_backend): "auto" (default)
uses these kernels when the CPU has AVX2 and FMA and the library builds; "aten" forces PyTorch's
packed kernels; "generic" the device-generic PyTorch path (what the GPU runs but its CUDA-only
kernels); "dq" requires ours and fails loudly when they cannot be built. The choice is made once, by
plan.make_plan (which calls load() to learn whether the library is usable); layers get it passed in.

Instruction set (DISTILLERY_CPU_ISA): the library holds the linear kernels three times, for AVX2, for
AVX-VNNI (one `vpdpbusd` where AVX2 needs maddubs + madd + add) and for AVX-512 with VNNI (512-bit
registers, compiled per function: the library still builds and runs on AVX2-only CPUs), and picks the
best the CPU has ("auto"); "avx2" / "avxvnni" / "avx512vnni" force one, for every call (an instruction set
the CPU lacks is a ValueError at load). All three give bit-identical results. One activation row (a single-stream decode
step) may take other kernels than the chosen set's where they stream the weights faster on this CPU
(set_row_isas, from the kernel plan's row_isas; not when the set is forced or compared: _Lib.pinned).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger("model_runtime.ckernels")

SOURCE = Path(__file__).parent / "csrc" / "dq_kernels.c"
HEADER = SOURCE.parent / "row_norm.h"  # shared with prefill.py's library
SAMPLER = SOURCE.parent / "sample_rows.h"  # (included by the source)
ABI_VERSION = 9
CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-fPIC", "-shared", "-std=c11", "-D_POSIX_C_SOURCE=200809L"]
BACKENDS = ("auto", "dq", "aten", "generic")
ISAS = {"auto": 0, "avx2": 1, "avxvnni": 2, "avx512vnni": 3}  # DISTILLERY_CPU_ISA -> dq_set_isa's argument
# the kernels one activation row takes (dq_set_row_isa): "" the chosen set's; "vnni256" the 256-bit VNNI kernels
# (AVX-VNNI's, or the same instructions EVEX-encoded on an AVX512-VNNI CPU without AVX-VNNI)
ROW_ISAS = {"": 0, "avx2": 1, "vnni256": 2, "avx512vnni": 3}


class KernelUnavailable(RuntimeError):
    pass


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_supported() -> bool:
    return sys.platform.startswith("linux") and {"avx2", "fma", "f16c"} <= _cpu_flags()


def source_digest(source: Path, headers: tuple[Path, ...], cflags: list[str]) -> str:
    """A C library's build key: its source, the headers it #includes, its flags (a change to any is a new library)."""
    h = hashlib.sha256(source.read_bytes())
    for header in headers:
        h.update(header.read_bytes())
    h.update(" ".join(cflags).encode())
    return h.hexdigest()[:16]


def _source_hash() -> str:
    return source_digest(SOURCE, (HEADER, SAMPLER), CFLAGS)


def kernel_dir() -> Path:
    env = os.environ.get("DISTILLERY_KERNEL_DIR")
    return Path(env) if env else Path.home() / ".cache" / "distillery" / "kernels"


def library_path() -> Path:
    return kernel_dir() / f"dq_kernels-{_source_hash()}.so"


def build(dest: Path | None = None) -> Path:
    """Compile the int8/int4 kernels' library (once per source + flags)."""
    return compile_library(SOURCE, CFLAGS, dest or library_path())


def compile_library(source: Path, cflags: list[str], dest: Path) -> Path:
    """Compile `source` into the shared library `dest` unless it exists (atomically: a concurrent builder never
    sees a half-written file). Every C library of the runtime (these kernels, prefill.py's) is built here."""
    if dest.exists():
        return dest
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise KernelUnavailable(f"no C compiler (cc/gcc) to build {source.name}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=dest.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *cflags, "-o", tmp, str(source), "-lm"], capture_output=True, text=True,
                              timeout=300)
        if proc.returncode != 0:
            raise KernelUnavailable(f"building {source.name} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


class _Lib:
    def __init__(self, path: Path) -> None:
        lib = ctypes.CDLL(str(path))
        if lib.dq_abi_version() != ABI_VERSION:
            raise KernelUnavailable(f"{path} has ABI {lib.dq_abi_version()}, expected {ABI_VERSION}")
        p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
        lib.dq_linear_w8.argtypes = [p, i64, i64, i64, p, p, p, p, i64, p, i32, p, f32, i32]
        lib.dq_linear_w8.restype = i32
        lib.dq_linear_w4.argtypes = [p, i64, i64, i64, p, p, p, p, i64, p, i32, p, f32, i32]
        lib.dq_linear_w4.restype = i32
        lib.dq_attn_decode.argtypes = [p, i64, i64, i64, i64, p, p, p, p, p, p, i64, p, i32]
        lib.dq_attn_decode.restype = i32
        lib.dq_decode_blocks.argtypes = [p, i64, p, i64, p, p, i64, i64, i64, i64, p, p, p, p, i32]
        lib.dq_decode_blocks.restype = i32
        lib.dq_silu_mul.argtypes = [p, i64, i64, p, i32]
        lib.dq_silu_mul.restype = None
        lib.dq_sample_rows.argtypes = [p, i64, i64, p, p, p, p, p, i32]
        lib.dq_sample_rows.restype = i32
        lib.dq_w8_block_sums.argtypes = [p, i64, i64, i64, p, i32]
        lib.dq_w8_block_sums.restype = None
        lib.dq_pack_w4.argtypes = [p, i64, i64, p]
        lib.dq_pack_w4.restype = None
        lib.dq_set_isa.argtypes = [i32]
        lib.dq_set_isa.restype = i32
        lib.dq_isa.restype = i32
        lib.dq_set_row_isa.argtypes = [i32, i32]
        lib.dq_set_row_isa.restype = i32
        lib.dq_row_isa.argtypes = [i32]
        lib.dq_row_isa.restype = i32
        lib.dq_call_isa.argtypes = [i32, i64]
        lib.dq_call_isa.restype = i32
        choice = os.environ.get("DISTILLERY_CPU_ISA", "auto").lower()
        if choice not in ISAS:
            raise ValueError(f"DISTILLERY_CPU_ISA={choice!r}: expected one of {', '.join(ISAS)}")
        if lib.dq_set_isa(ISAS[choice]) < 0:  # a setting error, not a missing kernel: no quiet fallback
            raise ValueError(f"DISTILLERY_CPU_ISA={choice}: this CPU (or the compiler that built {path.name}) "
                             "does not have it; use auto or avx2")
        self.lib = lib
        self.path = path
        self._forced = choice != "auto"  # DISTILLERY_CPU_ISA named a set: every call on it (no one-row rerouting)
        self._explicit = 0              # using_isa blocks open (a comparison of sets: every call on that set)

    @property
    def isa(self) -> str:
        """The instruction set the linear kernels run on: "avx2", "avxvnni" or "avx512vnni"."""
        code = self.lib.dq_isa()
        return next(name for name, c in ISAS.items() if c == code)

    def set_isa(self, name: str) -> str:
        """Switch the linear kernels' instruction set (tests compare both); returns the one in use."""
        if self.lib.dq_set_isa(ISAS[name]) < 0:
            raise KernelUnavailable(f"this CPU lacks {name}")
        return self.isa

    def row_isa(self, bits: int) -> str:
        """The kernels one activation row of `bits`-bit (8 or 4) weights takes ("": the chosen set's)."""
        code = self.lib.dq_row_isa(bits)
        return next(name for name, c in ROW_ISAS.items() if c == code)

    def set_row_isa(self, bits: int, name: str) -> str:
        """Route one-row calls of `bits`-bit weights to `name` (ROW_ISAS; the kernel plan's choice, plan.row_isas);
        returns the previous setting."""
        if name not in ROW_ISAS or bits not in (8, 4):
            raise ValueError(f"row kernels {bits}-bit {name!r}: expected 8 or 4 and one of {', '.join(ROW_ISAS)}")
        before = self.lib.dq_set_row_isa(bits, ROW_ISAS[name])
        if before < 0:
            raise KernelUnavailable(f"this CPU lacks {name}")
        return next(n for n, c in ROW_ISAS.items() if c == before)

    def call_isa(self, bits: int, rows: int) -> str:
        """The instruction set a call with `rows` activation rows of `bits`-bit weights runs on (vnni256 reads as
        avxvnni)."""
        code = self.lib.dq_call_isa(bits, rows)
        return next(name for name, c in ISAS.items() if c == code)

    @contextlib.contextmanager
    def using_isa(self, name: str) -> Iterator[_Lib]:
        """The linear kernels on `name` inside the block, on the previous choice after it (the choice is
        process-wide; tests and the benchmark compare instruction sets): one-row calls too."""
        before = self.isa
        self.set_isa(name)
        rows = {bits: self.set_row_isa(bits, "") for bits in (8, 4)}  # every call on `name`
        self._explicit += 1
        try:
            yield self
        finally:
            self._explicit -= 1
            for bits, row in rows.items():
                self.set_row_isa(bits, row)
            self.set_isa(before)

    @property
    def pinned(self) -> bool:
        """Whether every call must run on the chosen set (DISTILLERY_CPU_ISA names one, or a using_isa block is
        open): the kernel plan then routes no row elsewhere (plan.row_isas)."""
        return self._forced or self._explicit > 0

    def available_isas(self) -> list[str]:
        """The instruction sets this CPU and this build of the library can run, best first."""
        usable = []
        for name in ("avx512vnni", "avxvnni", "avx2"):
            with contextlib.suppress(KernelUnavailable), self.using_isa(name):
                usable.append(name)
        return usable


_lock = threading.Lock()
_loaded: _Lib | None = None
_failure: str | None = None
_warned = False


def _load() -> _Lib:
    global _loaded, _failure
    with _lock:
        if _loaded is not None:
            return _loaded
        if _failure is not None:
            raise KernelUnavailable(_failure)
        try:
            if not cpu_supported():
                raise KernelUnavailable("this CPU lacks AVX2/FMA/F16C (or is not Linux x86-64)")
            _loaded = _Lib(build())
            log.info("int8/int4 CPU kernels (%s): %s", _loaded.isa, _loaded.path)
            return _loaded
        except (KernelUnavailable, OSError, subprocess.SubprocessError) as exc:
            _failure = str(exc)
            raise KernelUnavailable(_failure) from exc


def load() -> None:
    """Build (once) and load the library; KernelUnavailable says why it cannot be used here."""
    _load()


def isa() -> str:
    """The instruction set the linear kernels run on (the best this CPU has unless DISTILLERY_CPU_ISA says)."""
    return _load().isa


def set_row_isas(int8: str, int4: str) -> None:
    """The kernels one-row calls of int8 / int4 weights take (the kernel plan's row_isas; process-wide, as the
    instruction set is)."""
    lib = _load()
    before = lib.set_row_isa(8, int8)
    try:
        lib.set_row_isa(4, int4)
    except (ValueError, KernelUnavailable):
        lib.set_row_isa(8, before)  # both or neither
        raise


def isa_pinned() -> bool:
    """_Lib.pinned of the loaded library."""
    return _load().pinned


def backend() -> str:
    """"dq" (our kernels), "aten" (PyTorch's) or "generic", per DISTILLERY_CPU_KERNELS and what this
    machine can do (scripts and the bench ask; the runtime's layers get theirs from the KernelPlan)."""
    choice = os.environ.get("DISTILLERY_CPU_KERNELS", "auto").lower()
    if choice not in BACKENDS:
        raise ValueError(f"DISTILLERY_CPU_KERNELS={choice!r}: expected one of {', '.join(BACKENDS)}")
    if choice in ("aten", "generic"):
        return choice
    try:
        _load()
        return "dq"
    except KernelUnavailable as exc:
        if choice == "dq":
            raise
        global _warned
        if not _warned:  # asked once per quantized layer: say it once
            _warned = True
            log.warning("int8/int4 CPU kernels unavailable (%s); using PyTorch's packed kernels", exc)
        return "aten"


def w4_group_supported(group: int, k: int) -> bool:
    """The int4 kernel's shapes: groups of 32 or of whole 64-value blocks (<= 256), K a multiple of 64."""
    return 0 < group <= 256 and (group == 32 or group % 64 == 0) and k % group == 0 and k % 64 == 0


def act_block(k: int) -> int:
    """Activation quantization block for the int8 kernel: the largest of 128/64/32 dividing K."""
    for b in (128, 64, 32):
        if k % b == 0:
            return b
    raise ValueError(f"in_features {k} is not a multiple of 32")


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _out(x: Tensor, n: int, out: Tensor | None) -> Tensor:
    if out is None:
        return torch.empty((x.shape[0], n), dtype=torch.float32)
    if out.dtype != torch.float32 or not out.is_contiguous() or tuple(out.shape) != (x.shape[0], n):
        raise ValueError(f"out must be a contiguous float32 [{x.shape[0]}, {n}] tensor")
    return out


def _check_x(x: Tensor, norm: Tensor | None) -> None:
    if x.dtype != torch.float32 or not x.is_contiguous() or x.dim() != 2:
        raise ValueError("x must be a contiguous float32 [M, K] tensor")
    if norm is not None and (norm.dtype != torch.float32 or norm.numel() != x.shape[1]):
        raise ValueError("norm weight must be float32 [K]")


def _check(t: Tensor | None, dtype: torch.dtype, shape: tuple[int, ...], what: str) -> None:
    """The C side reads raw pointers: refuse a tensor of the wrong dtype, shape or layout."""
    if t is not None and (t.dtype != dtype or tuple(t.shape) != shape or not t.is_contiguous()):
        raise ValueError(f"{what} must be a contiguous {dtype} tensor of shape {shape}, got "
                         f"{t.dtype} {tuple(t.shape)}")


def w8_block_sums(w: Tensor, block: int) -> Tensor:
    """int8 weights [N, K] -> int32 [N, K/block]: each activation block's weight sum, which the AVX-512 batch kernels
    read (their activation codes are unsigned, x + 128); prepared once with the weights."""
    n, k = w.shape
    if block <= 0 or k % block:
        raise ValueError(f"block {block} does not divide in_features {k}")
    _check(w, torch.int8, (n, k), "w")
    out = torch.empty((n, k // block), dtype=torch.int32)
    _load().lib.dq_w8_block_sums(w.data_ptr(), n, k, block, out.data_ptr(), torch.get_num_threads())
    return out


def w8_block_sums_read() -> bool:
    """Whether this CPU's kernels read w8_block_sums (the AVX-512 ones): elsewhere they are not kept (+3% of the
    int8 weights' bytes for nothing)."""
    return "avx512vnni" in _load().available_isas()


def linear_w8(x: Tensor, w: Tensor, scales: Tensor, bias: Tensor | None, block: int, *, wsum: Tensor | None = None,
              norm: Tensor | None = None, eps: float = 0.0, out: Tensor | None = None) -> Tensor:
    """x [M, K] float32 contiguous; w [N, K] int8; scales [N] float32; bias [N] float32 -> [M, N] float32.

    wsum: w8_block_sums(w, block), prepared with the weights (else the AVX-512 kernels take them each call);
    norm: RMSNorm x with this weight first (fused); out: add the result into it (a residual)."""
    lib = _load().lib
    _check_x(x, norm)
    m, k = x.shape
    n = w.shape[0]
    _check(w, torch.int8, (n, k), "w")
    _check(scales, torch.float32, (n,), "scales")
    _check(bias, torch.float32, (n,), "bias")
    if wsum is not None:  # (a bad block without them is the kernel's to refuse)
        if block <= 0 or k % block:
            raise ValueError(f"block {block} does not divide in_features {k}")
        _check(wsum, torch.int32, (n, k // block), "wsum")
    y = _out(x, n, out)
    rc = lib.dq_linear_w8(x.data_ptr(), m, k, block, w.data_ptr(), scales.data_ptr(), _ptr(wsum), _ptr(bias), n,
                          y.data_ptr(), torch.get_num_threads(), _ptr(norm), eps, int(out is not None))
    if rc != 0:
        raise RuntimeError(f"dq_linear_w8 failed (M={m}, K={k}, block={block})")
    return y


def linear_w4(x: Tensor, w: Tensor, scales: Tensor, zeros: Tensor, bias: Tensor | None, group: int, *,
              norm: Tensor | None = None, eps: float = 0.0, out: Tensor | None = None) -> Tensor:
    """x [M, K] float32 contiguous; w [N, K/2] (pack_w4 layout); scales/zeros [N, K/group] bfloat16."""
    lib = _load().lib
    _check_x(x, norm)
    m, k = x.shape
    n = w.shape[0]
    _check(w, torch.uint8, (n, k // 2), "w")
    if group <= 0 or k % group:
        raise ValueError(f"group {group} does not divide in_features {k}")
    _check(scales, torch.bfloat16, (n, k // group), "scales")
    _check(zeros, torch.bfloat16, (n, k // group), "zeros")
    _check(bias, torch.float32, (n,), "bias")
    y = _out(x, n, out)
    rc = lib.dq_linear_w4(x.data_ptr(), m, k, group, w.data_ptr(), scales.data_ptr(), zeros.data_ptr(),
                          _ptr(bias), n, y.data_ptr(), torch.get_num_threads(), _ptr(norm), eps,
                          int(out is not None))
    if rc != 0:
        raise RuntimeError(f"dq_linear_w4 failed (M={m}, K={k}, group={group})")
    return y


def _check_attention(qkv: Tensor, n_heads: int, n_kv: int, head_dim: int, slots: Tensor, positions: Tensor,
                     cos: Tensor, sin: Tensor, kc: Tensor, vc: Tensor) -> None:
    """The C side trusts every index and shape: check them all."""
    if qkv.dtype != torch.float32 or not qkv.is_contiguous() or qkv.dim() != 2 \
            or qkv.shape[1] != (n_heads + 2 * n_kv) * head_dim:
        raise ValueError("attn_decode: qkv shapes do not match the head layout (contiguous float32 "
                         "[B, (nh + 2 nkv) hd])")
    check_attention_rows(qkv.shape[0], n_heads, n_kv, head_dim, slots, positions, cos, sin, kc, vc)


def check_attention_rows(rows: int, n_heads: int, n_kv: int, head_dim: int, slots: Tensor, positions: Tensor,
                         cos: Tensor, sin: Tensor, kc: Tensor, vc: Tensor) -> None:
    """`rows` decode rows' int64 slots/positions against a cache layer and the RoPE tables (all of it)."""
    for t in (cos, sin, kc, vc):
        if t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError("attn_decode takes contiguous float32 tensors")
    if head_dim < 2 or head_dim % 2:
        raise ValueError(f"attn_decode: head_dim {head_dim} must be even (rotate-half RoPE pairs its halves)")
    if (n_kv < 1 or n_heads % n_kv or kc.dim() != 4
            or kc.shape != vc.shape or tuple(kc.shape[1:2]) + tuple(kc.shape[3:]) != (n_kv, head_dim)
            or cos.dim() != 2 or cos.shape != sin.shape or cos.shape[1] != head_dim):
        raise ValueError("attn_decode: qkv / cache / RoPE shapes do not match the head layout")
    for t in (slots, positions):
        if t.dtype != torch.int64 or not t.is_contiguous():
            raise ValueError("attn_decode: slots and positions must be contiguous int64 tensors")
    if slots.numel() != rows or positions.numel() != rows:
        raise ValueError("attn_decode: one slot and one position per row")
    if int(slots.min()) < 0 or int(slots.max()) >= kc.shape[0]:
        raise ValueError("a slot is outside the KV cache")
    if int(positions.max()) >= min(kc.shape[2], cos.shape[0]) or int(positions.min()) < 0:
        raise ValueError("a position is outside the KV cache / RoPE table")


def attn_decode(qkv: Tensor, n_heads: int, n_kv: int, head_dim: int, slots: Tensor, positions: Tensor,
                cos: Tensor, sin: Tensor, kc: Tensor, vc: Tensor, *, validate: bool = True) -> Tensor:
    """One decode step of attention for B sequences (see dq_attn_decode in the C source).

    qkv [B, (nh + 2 nkv) hd] float32; slots/positions [B] int64; cos/sin [rope_len, hd] float32;
    kc/vc [max_batch, nkv, max_len, hd] float32 (written at (slot, position)) -> [B, nh hd].
    validate=False skips the checks: only for a caller that has just validated the same int64
    slots/positions against a cache of the same shape (the model checks its first layer's call)."""
    lib = _load().lib
    if validate:
        slots = slots.to(torch.int64).reshape(-1).contiguous()
        positions = positions.to(torch.int64).reshape(-1).contiguous()
        _check_attention(qkv, n_heads, n_kv, head_dim, slots, positions, cos, sin, kc, vc)
    b = qkv.shape[0]
    y = torch.empty((b, n_heads * head_dim), dtype=torch.float32)
    rc = lib.dq_attn_decode(qkv.data_ptr(), b, n_heads, n_kv, head_dim, slots.data_ptr(), positions.data_ptr(),
                            cos.data_ptr(), sin.data_ptr(), kc.data_ptr(), vc.data_ptr(), kc.shape[2],
                            y.data_ptr(), torch.get_num_threads())
    if rc != 0:
        raise RuntimeError("dq_attn_decode failed (out of memory)")
    return y


def silu_mul(gu: Tensor) -> Tensor:
    """gu [M, 2 I] float32 ([gate; up] per row, I % 8 == 0) -> silu(gate) * up [M, I] (the C decode step's SwiGLU)."""
    lib = _load().lib
    if gu.dtype != torch.float32 or not gu.is_contiguous() or gu.dim() != 2 or gu.shape[1] % 16:
        raise ValueError("silu_mul takes a contiguous float32 [M, 2 I] tensor, I a multiple of 8")
    m, i = gu.shape[0], gu.shape[1] // 2
    h = torch.empty((m, i), dtype=torch.float32)
    lib.dq_silu_mul(gu.data_ptr(), m, i, h.data_ptr(), torch.get_num_threads())
    return h


def sample_rows(logits: Tensor, temperatures: Tensor, uniforms: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """logits [B, V] float32 contiguous -> (max [B] float32, NaN for a row holding a NaN; argmax [B] int64, the first
    index of the max; choice [B] int64): for each row with temperatures[b] > 0 (float32 [B]) and a finite max, a
    token drawn at uniforms[b] (float64 [B], in [0, 1)) from softmax(row / temperature), else -1 (csrc/sample_rows.h:
    sampling._draw's two-step draw, every row in parallel)."""
    lib = _load().lib
    if logits.dtype != torch.float32 or not logits.is_contiguous() or logits.dim() != 2 or logits.device.type != "cpu":
        raise ValueError("sample_rows takes a contiguous float32 [B, V] CPU tensor")
    b, v = logits.shape
    _check(temperatures, torch.float32, (b,), "temperatures")
    _check(uniforms, torch.float64, (b,), "uniforms")
    maxv = torch.empty(b, dtype=torch.float32)
    argmax = torch.empty(b, dtype=torch.int64)
    choice = torch.empty(b, dtype=torch.int64)
    if lib.dq_sample_rows(logits.data_ptr(), b, v, temperatures.data_ptr(), uniforms.data_ptr(), maxv.data_ptr(),
                          argmax.data_ptr(), choice.data_ptr(), torch.get_num_threads()) != 0:
        raise MemoryError("dq_sample_rows: out of memory")
    return maxv, argmax, choice


def pack_w4(codes: Tensor) -> Tensor:
    """uint8 codes 0..15 [N, K] -> the kernel's nibble layout [N, K/2] (K a multiple of 64)."""
    lib = _load().lib
    codes = codes.to(torch.uint8).contiguous()
    n, k = codes.shape
    if k % 64:
        raise ValueError(f"in_features {k} is not a multiple of 64")
    out = torch.empty((n, k // 2), dtype=torch.uint8)
    lib.dq_pack_w4(codes.data_ptr(), n, k, out.data_ptr())
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m model_runtime.ckernels build`: compile now (image builds), print the library path."""
    args = argv if argv is not None else sys.argv[1:]
    if args not in ([], ["build"]):
        print("usage: python -m model_runtime.ckernels [build]", file=sys.stderr)
        return 2
    try:
        print(build())
    except KernelUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
