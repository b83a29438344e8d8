"""Weight-only int8/int4 linear layers and the matmul path each device uses (measured choices).

CPU (AVX2, measured on this project's 2-vCPU machines; 1x4096 @ 4096x4096, 2 threads):
  bf16 nn.Linear 2.3 ms; int8 `aten._weight_int8pack_mm` with bf16 activations 1.35-1.46 ms (the
  same kernel with fp32 activations is 9-14 ms, torchao's eager int8 21-40 ms); int4
  `aten._weight_int4pack_mm_for_cpu` g128 1.34-1.48 ms (compute-bound, no gain over int8 here).
  So activations entering a quantized linear are cast to bf16 on that path ("aten" backend).
Faster on such CPUs, and the default when it builds ("dq" backend: ckernels.py, csrc/dq_kernels.c):
activations quantized to int8 per block and integer dot products (AVX2 maddubs), as llama.cpp
does. On this machine a decode row (M=1) runs ~1.5-2x faster for int8 and ~2-3x for int4 than
the aten kernels, batches of 4-8 rows ~1.3-2x (per-shape figures: the kernel table of
`make bench`, bench/kernels.py). With that backend the model computes in float32 between the
linears (model.act_dtype), so the kernels take float32 rows with no conversions. Those kernels are for
decode rows; a prompt chunk of at least the plan's prefill_min_rows rows runs on the CPU's matrix engine
instead (prefill.py: the plan's prefill_kernel, e.g. torch._int_mm on AVX512-VNNI / AMX).
Device-generic ("generic", any device; DISTILLERY_CPU_KERNELS=generic selects it on the CPU): int8 as
gpt-fast's `F.linear(x, codes.to(x.dtype)) * scales`, int4 dequantized inside the matmul in the
activation dtype; under torch.compile the conversion fuses into the matmul.
CUDA ("cuda-int8", "cuda-int4-tinygemm"): torch's `_weight_int8pack_mm` or the generic int8 form
compiled (the plan's int8_kernel; bench/gpu.py measures both), tinygemm for int4 (sm80+, layout built
at load). Not yet measured on hardware; torchao's int8 weight-only is not in the comparison yet. Which backend a layer runs is the KernelPlan's (plan.py)
decision, passed to the constructor.

What is stored (and saved by quant.py) is the portable form: int8 codes + scales, or int4 codes
(0..15) + scales + zeros; the CPU int4 packed layout is derived from the codes at load time,
deterministically, so a saved artifact reloads bit-exactly.
"""

from __future__ import annotations

from typing import Protocol, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model_runtime import ckernels, prefill
from model_runtime.decode_blocks import LinearWeights
from model_runtime.plan import ATEN_INT4_GROUPS, TINYGEMM_INNER_K_TILES, int4_group_size

__all__ = ["int4_group_size"]  # re-exported: quant.py and the tests ask kernels for it


class RMSNormLike(Protocol):
    """model.RMSNorm as the fused kernels read it (read-only: its weight is an nn.Parameter)."""

    @property
    def weight(self) -> Tensor: ...

    @property
    def eps(self) -> float: ...


class FusedLinear(Protocol):
    """A quantized linear on the dq backend (Int8Linear, Int4Linear): Block.decode_fused calls it."""

    prefill_kernel: str    # "none", or the GEMM that chunks of at least prefill_min_rows rows take
    prefill_min_rows: int

    def fused(self, x: Tensor, norm: RMSNormLike | None = None, out: Tensor | None = None) -> Tensor: ...

    def dq_weights(self) -> LinearWeights:
        """The tensors the C kernels read (decode_blocks.py runs a decode step's blocks on them)."""
        ...


def _prefill_norm(norm: RMSNormLike | None) -> prefill.Norm | None:
    """The RMSNorm a prefill GEMM applies to its rows first (in its quantization pass, as the decode kernels do)."""
    return None if norm is None else (norm.weight, norm.eps)


CHUNK_ELEMENTS = 1 << 21  # values quantized at a time: float32 temporaries stay ~8 MiB each


def _chunk_rows(k: int) -> int:
    return max(16, CHUNK_ELEMENTS // k)


class RowsLike(Protocol):
    """A [N, K] weight that can be sliced by rows: a Tensor, or tensor_source.LazyRows reading from the file."""

    @property
    def shape(self) -> torch.Size | tuple[int, ...]: ...

    def __getitem__(self, rows: slice) -> Tensor: ...


def _target(w: RowsLike, device: torch.device | str | None) -> torch.device:
    """Where the codes go: the requested device, else the weight's own (a LazyRows reads to the CPU)."""
    if device is not None:
        return torch.device(device)
    return w.device if isinstance(w, Tensor) else torch.device("cpu")


def quantize_int8(w: RowsLike, scale_dtype: torch.dtype = torch.bfloat16,
                  device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel: w [N, K] -> (codes int8 [N, K], scales [N]); w ~ codes * scales[:, None].

    The scale is rounded to its storage dtype first, and the codes computed against that rounded
    scale, so the stored pair is self-consistent. Rows are processed ~CHUNK_ELEMENTS values at a time (the
    result does not depend on the chunking) so a 150k-row lm_head never has a float32 copy. Each chunk
    is moved to `device` (default: the weight's) and quantized there: the outputs live on that device."""
    n, k = w.shape
    dev = _target(w, device)
    codes = torch.empty((n, k), dtype=torch.int8, device=dev)
    scales = torch.empty(n, dtype=scale_dtype, device=dev)
    step = _chunk_rows(k)
    for r in range(0, n, step):
        wf = w[r:r + step].to(dev).float()
        sc = (wf.abs().amax(dim=1) / 127.0).clamp(min=1e-8).to(scale_dtype)
        codes[r:r + step] = torch.round(wf / sc.float()[:, None]).clamp(-128, 127).to(torch.int8)
        scales[r:r + step] = sc
    return codes, scales


def quantize_int4(w: RowsLike, group_size: int, scale_dtype: torch.dtype = torch.bfloat16,
                  device: torch.device | str | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric group-wise (tinygemm convention): w [N, K] -> (codes uint8 0..15 [N, K],
    scales [N, K/g], zeros [N, K/g]) with w ~ (codes - 8) * scale + zero per group (row-chunked,
    on `device` as quantize_int8)."""
    n, k = w.shape
    g = int4_group_size(k, group_size)
    dev = _target(w, device)
    codes = torch.empty((n, k), dtype=torch.uint8, device=dev)
    scales = torch.empty((n, k // g), dtype=scale_dtype, device=dev)
    zeros = torch.empty((n, k // g), dtype=scale_dtype, device=dev)
    step = _chunk_rows(k)
    for r in range(0, n, step):
        wg = w[r:r + step].to(dev).float()
        wg = wg.view(wg.shape[0], k // g, g)
        lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
        sc = ((hi - lo) / 15.0).clamp(min=1e-6).to(scale_dtype)
        zr = (lo + 8.0 * sc.float()).to(scale_dtype)
        c = torch.round((wg - zr.float()[..., None]) / sc.float()[..., None] + 8.0).clamp(0, 15)
        codes[r:r + step] = c.to(torch.uint8).view(-1, k)
        scales[r:r + step], zeros[r:r + step] = sc, zr
    return codes, scales, zeros


def quantize_int4_packed(w: RowsLike, group_size: int,
                         device: torch.device | str | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """quantize_int4 + pack_nibbles a chunk of rows at a time: (qweight [N, K/2], scales, zeros)
    without the [N, K] byte-per-code intermediate (a load-time memory peak for big matrices)."""
    n, k = w.shape
    g = int4_group_size(k, group_size)
    dev = _target(w, device)
    qweight = torch.empty((n, k // 2), dtype=torch.uint8, device=dev)
    scales = torch.empty((n, k // g), dtype=torch.bfloat16, device=dev)
    zeros = torch.empty((n, k // g), dtype=torch.bfloat16, device=dev)
    step = _chunk_rows(k)
    for r in range(0, n, step):
        codes, scales[r:r + step], zeros[r:r + step] = quantize_int4(w[r:r + step], g, device=dev)
        qweight[r:r + step] = pack_nibbles(codes)
    return qweight, scales, zeros


def dequantize_int4(codes: Tensor, scales: Tensor, zeros: Tensor) -> Tensor:
    n, k = codes.shape
    g = k // scales.shape[1]
    w = (codes.view(n, k // g, g).float() - 8.0) * scales.float()[..., None] + zeros.float()[..., None]
    return w.view(n, k)


def int8_matmul_generic(x: Tensor, codes: Tensor, scales: Tensor) -> Tensor:
    """x [M, K] @ (codes * scales)^T in x's dtype, written as gpt-fast's WeightOnlyInt8Linear: the scale
    applies to the output, so under torch.compile the int8 -> float conversion fuses into the matmul
    (no float weight in memory); eager, the conversion is one [N, K] temporary in x's dtype."""
    return F.linear(x, codes.to(x.dtype)) * scales.to(x.dtype)


class Int8Linear(nn.Module):
    """y = x @ (codes * scales)^T + bias, codes int8 [N, K], one scale per output channel.

    `backend` (from the KernelPlan): "dq" (ckernels, float32 rows), "aten" (CPU _weight_int8pack_mm,
    bf16 activations), "generic" (int8_matmul_generic, any device), "cuda-int8" (int8_kernel
    "int8pack_mm": torch's CUDA _weight_int8pack_mm; "dequant": the generic form, fused when compiled)."""

    # registered buffers (nn.Module.__getattr__ would type them as Tensor | Module)
    codes: Tensor
    scales: Tensor
    bias: Tensor | None

    def __init__(self, codes: Tensor, scales: Tensor, bias: Tensor | None, act_dtype: torch.dtype,
                 backend: str = "aten", int8_kernel: str = "", prefill_kernel: str = "none",
                 prefill_min_rows: int = 0) -> None:
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.register_buffer("codes", codes.contiguous())
        self.register_buffer("scales", scales.contiguous())
        self.register_buffer("bias", None if bias is None else bias.to(device=codes.device, dtype=act_dtype))
        self.act_dtype = act_dtype
        self.backend = backend
        self.int8_kernel = int8_kernel
        # dq only: >= prefill_min_rows rows go through prefill.py's GEMM (the plan's prefill_kernel)
        self.prefill_kernel = prefill_kernel if backend == "dq" else "none"
        self.prefill_min_rows = prefill_min_rows
        if backend == "dq":
            self._dq_scales = scales.float().contiguous()
            self._dq_bias = None if self.bias is None else self.bias.float().contiguous()
            self._dq_block = ckernels.act_block(self.in_features)
            # +4 bytes per activation block of weights, where the kernels read them
            self._dq_wsum = ckernels.w8_block_sums(self.codes, self._dq_block) if ckernels.w8_block_sums_read() \
                else None
        elif backend == "aten":
            self._mm_scales = scales.to(torch.bfloat16)  # the CPU kernel wants scales in the activation dtype
        elif backend == "cuda-int8" and int8_kernel == "int8pack_mm":
            self._mm_scales = scales.to(act_dtype)
        elif backend not in ("generic", "cuda-int8"):
            raise ValueError(f"Int8Linear: unknown backend {backend!r}")

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.backend == "dq":
            return self.fused(x2.float().contiguous()).to(x.dtype).view(*shape, self.out_features)
        y: Tensor
        if self.backend == "aten":
            y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16), self.codes, self._mm_scales).to(x.dtype)
        elif self.int8_kernel == "int8pack_mm":
            y = torch.ops.aten._weight_int8pack_mm(x2.to(self.act_dtype).contiguous(), self.codes,
                                                   self._mm_scales).to(x.dtype)
        else:
            y = int8_matmul_generic(x2, self.codes, self.scales)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape, self.out_features)

    def fused(self, x: Tensor, norm: RMSNormLike | None = None, out: Tensor | None = None) -> Tensor:
        """dq backend only: x [M, K] float32 -> [M, N]; RMSNorm'd by `norm` first, added into `out`.
        A chunk of at least prefill_min_rows rows runs on the plan's prefill GEMM instead."""
        if self.prefill_kernel != "none" and x.shape[0] >= self.prefill_min_rows:
            return prefill.linear_w8(self.prefill_kernel, x, self.codes, self._dq_scales, self._dq_bias, out=out,
                                     norm=_prefill_norm(norm),
                                     code_sums=None if self._dq_wsum is None else (self._dq_wsum, self._dq_block))
        return ckernels.linear_w8(x, self.codes, self._dq_scales, self._dq_bias, self._dq_block, wsum=self._dq_wsum,
                                  norm=None if norm is None else norm.weight,
                                  eps=0.0 if norm is None else norm.eps, out=out)

    def dq_weights(self) -> LinearWeights:
        """dq backend only: as FusedLinear.dq_weights."""
        return LinearWeights(8, self.codes, self._dq_scales, None, self._dq_bias, self._dq_block,
                             self.out_features, self.in_features, self._dq_wsum)

    def extra_repr(self) -> str:
        pf = f", prefill {self.prefill_kernel} >= {self.prefill_min_rows} rows" if self.prefill_kernel != "none" else ""
        return f"in={self.in_features}, out={self.out_features}, int8 per-channel, {self.backend}{pf}"


def pack_nibbles(codes: Tensor) -> Tensor:
    """uint8 codes 0..15 [N, K] -> [N, K/2] (even k in the low nibble): the portable int4 form."""
    c = codes.to(torch.uint8)
    return (c[:, 0::2] | (c[:, 1::2] << 4)).contiguous()


def unpack_nibbles(packed: Tensor) -> Tensor:
    n, half = packed.shape
    out = torch.empty(n, half * 2, dtype=torch.uint8, device=packed.device)
    out[:, 0::2] = packed & 0x0F
    out[:, 1::2] = packed >> 4
    return out


def int4_matmul_generic(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor) -> Tensor:
    """x [M, K] @ dequant(qweight)^T with the dequantization in x's dtype (no float32 temporaries):
    the device-generic int4 path, and what a GPU without tinygemm runs (fused when compiled)."""
    n, k = qweight.shape[0], qweight.shape[1] * 2
    g = k // scales.shape[1]
    dt = x.dtype
    codes = unpack_nibbles(qweight).view(n, k // g, g).to(dt)
    w = (codes - 8) * scales.to(dt)[..., None] + zeros.to(dt)[..., None]
    return F.linear(x, w.view(n, k))


def tinygemm_layout(qweight: Tensor) -> Tensor:
    """Our portable nibbles (even k in the low nibble) -> the [N, K/2] uint8 that
    _convert_weight_to_int4pack takes (even k in the high nibble, as gpt-fast packs it)."""
    codes = unpack_nibbles(qweight)
    return (codes[:, 0::2] << 4 | codes[:, 1::2]).to(torch.uint8).contiguous()


def tinygemm_scales_and_zeros(scales: Tensor, zeros: Tensor) -> Tensor:
    """scales/zeros [N, K/g] -> tinygemm's [K/g, N, 2] bfloat16 (w = (q - 8) * scale + zero, our convention)."""
    return torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)


class Int4Linear(nn.Module):
    """Group-wise int4: y = x @ dequant(codes, scales, zeros)^T + bias.

    qweight: the portable nibble-packed codes [N, K/2]. `backend` (from the KernelPlan): "dq" and
    "aten" repack them once into the CPU kernel's layout, "cuda-int4-tinygemm" into tinygemm's (at
    load), and unless keep_codes (quantize_cli saves them) drop them to save memory; "generic"
    keeps them and dequantizes inside the matmul (int4_matmul_generic). "aten" with a group size
    its kernel lacks (a foreign artifact) runs the generic math."""

    # registered buffers (nn.Module.__getattr__ would type them as Tensor | Module); qweight is
    # None once repacked unless keep_codes
    qweight: Tensor | None
    scales: Tensor
    zeros: Tensor
    bias: Tensor | None

    def __init__(self, qweight: Tensor, scales: Tensor, zeros: Tensor, bias: Tensor | None,
                 act_dtype: torch.dtype, keep_codes: bool = False, backend: str = "aten",
                 prefill_kernel: str = "none", prefill_min_rows: int = 0) -> None:
        super().__init__()
        self.out_features, self.in_features = qweight.shape[0], qweight.shape[1] * 2
        self.group_size = self.in_features // scales.shape[1]
        codes_packed = qweight.contiguous()
        self.register_buffer("qweight", codes_packed)
        self.register_buffer("scales", scales.contiguous())  # [N, K/g]
        self.register_buffer("zeros", zeros.contiguous())    # [N, K/g]
        self.register_buffer("bias", None if bias is None else bias.to(device=qweight.device, dtype=act_dtype))
        self.act_dtype = act_dtype
        self._packed: Tensor | None = None
        self._sz: Tensor | None = None
        if backend == "aten" and self.group_size not in ATEN_INT4_GROUPS:
            backend = "generic"
        self.backend = backend
        self.prefill_kernel = prefill_kernel if backend == "dq" else "none"  # as Int8Linear
        self.prefill_min_rows = prefill_min_rows
        if backend == "dq":
            # our kernel's nibble layout; scales/zeros stay bfloat16 (widened in registers)
            self._packed = torch.empty_like(codes_packed)
            step = _chunk_rows(self.in_features)
            for r in range(0, self.out_features, step):  # repacked in chunks: no [N, K] transient
                self._packed[r:r + step] = ckernels.pack_w4(unpack_nibbles(codes_packed[r:r + step]))
            self._dq_scales = self.scales.to(torch.bfloat16).contiguous()
            self._dq_zeros = self.zeros.to(torch.bfloat16).contiguous()
            self._dq_bias = None if self.bias is None else self.bias.float().contiguous()
        elif backend == "aten":
            # [N, K/2] uint8 in the CPU kernel's layout; scale_and_zero [K/g, N, 2] bf16
            codes = unpack_nibbles(codes_packed).to(torch.int32)
            self._packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
            self._sz = tinygemm_scales_and_zeros(self.scales, self.zeros)
        elif backend == "cuda-int4-tinygemm":
            self._packed = torch.ops.aten._convert_weight_to_int4pack(tinygemm_layout(codes_packed),
                                                                      TINYGEMM_INNER_K_TILES)
            self._sz = tinygemm_scales_and_zeros(self.scales, self.zeros)
        elif backend != "generic":
            raise ValueError(f"Int4Linear: unknown backend {backend!r}")
        if self._packed is not None and not keep_codes:
            self.qweight = None

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.backend == "dq":
            return self.fused(x2.float().contiguous()).to(x.dtype).view(*shape, self.out_features)
        y: Tensor
        if self.backend == "aten":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16), cast(Tensor, self._packed),
                                                            self.group_size, self._sz).to(x.dtype)
        elif self.backend == "cuda-int4-tinygemm":
            y = torch.ops.aten._weight_int4pack_mm(x2.to(torch.bfloat16).contiguous(), cast(Tensor, self._packed),
                                                   self.group_size, self._sz).to(x.dtype)
        else:  # generic: the codes are kept (qweight is None only when _packed is set)
            y = int4_matmul_generic(x2, cast(Tensor, self.qweight), self.scales, self.zeros)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape, self.out_features)

    def fused(self, x: Tensor, norm: RMSNormLike | None = None, out: Tensor | None = None) -> Tensor:
        """dq backend only: as Int8Linear.fused."""
        # the dq backend always sets _packed (in __init__)
        if self.prefill_kernel != "none" and x.shape[0] >= self.prefill_min_rows:
            return prefill.linear_w4(self.prefill_kernel, x, cast(Tensor, self._packed), self._dq_scales,
                                     self._dq_zeros, self.group_size, self._dq_bias, out=out, norm=_prefill_norm(norm))
        return ckernels.linear_w4(x, cast(Tensor, self._packed), self._dq_scales, self._dq_zeros, self._dq_bias,
                                  self.group_size, norm=None if norm is None else norm.weight,
                                  eps=0.0 if norm is None else norm.eps, out=out)

    def dq_weights(self) -> LinearWeights:
        """dq backend only: as FusedLinear.dq_weights."""
        return LinearWeights(4, cast(Tensor, self._packed), self._dq_scales, self._dq_zeros, self._dq_bias,
                             self.group_size, self.out_features, self.in_features)

    def extra_repr(self) -> str:
        pf = f", prefill {self.prefill_kernel} >= {self.prefill_min_rows} rows" if self.prefill_kernel != "none" else ""
        return f"in={self.in_features}, out={self.out_features}, int4 group={self.group_size}, {self.backend}{pf}"


class Int8Embedding(nn.Module):
    """Token embedding stored as per-row int8 codes + scales (the same quantization as an int8
    Linear's rows), so a tied lm_head and the embedding share one copy. Lookup: codes[ids] * scale."""

    codes: Tensor   # registered buffers
    scales: Tensor

    def __init__(self, codes: Tensor, scales: Tensor, out_dtype: torch.dtype) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = codes.shape
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)
        self.out_dtype = out_dtype

    @classmethod
    def from_weight(cls, w: RowsLike, out_dtype: torch.dtype,
                    device: torch.device | str | None = None) -> Int8Embedding:
        codes, scales = quantize_int8(w, device=device)
        return cls(codes, scales, out_dtype)

    def forward(self, ids: Tensor) -> Tensor:
        # dequantized in the output dtype (float32 on the CPU fused path, the activation dtype elsewhere)
        return self.codes[ids].to(self.out_dtype) * self.scales[ids].to(self.out_dtype).unsqueeze(-1)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 per-row"


class Int4Embedding(nn.Module):
    """Token embedding as group-wise int4 rows (the Int4Linear format: nibble-packed codes, scales,
    zeros per group of G values). llama.cpp's Q4_K_M likewise keeps token_embd at 4-5 bits; used
    for int4 models whose embedding is not shared with an int8 head. Lookup dequantizes the rows."""

    qweight: Tensor   # registered buffers
    scales: Tensor
    zeros: Tensor

    def __init__(self, qweight: Tensor, scales: Tensor, zeros: Tensor, out_dtype: torch.dtype) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = qweight.shape[0], qweight.shape[1] * 2
        self.register_buffer("qweight", qweight)   # [V, C/2] portable nibble layout
        self.register_buffer("scales", scales)     # [V, C/G]
        self.register_buffer("zeros", zeros)
        self.out_dtype = out_dtype

    @classmethod
    def from_weight(cls, w: RowsLike, group_size: int, out_dtype: torch.dtype,
                    device: torch.device | str | None = None) -> Int4Embedding:
        return cls(*quantize_int4_packed(w, group_size, device=device), out_dtype)

    def forward(self, ids: Tensor) -> Tensor:
        flat = ids.reshape(-1)
        rows = dequantize_int4(unpack_nibbles(self.qweight[flat]), self.scales[flat], self.zeros[flat])  # [n, C]
        return rows.view(*ids.shape, self.embedding_dim).to(self.out_dtype)

    def extra_repr(self) -> str:
        g = self.embedding_dim // self.scales.shape[1]
        return f"{self.num_embeddings}, {self.embedding_dim}, int4 group={g}"
