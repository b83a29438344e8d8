"""A decode step's decoder blocks in one call into the CPU integer kernels (dq_decode_blocks in csrc).

Block.decode_fused runs a layer as five kernel calls plus a SiLU-and-multiply, each a trip through the
interpreter, ctypes and an argument check: ~120 such trips a step on the 0.5B, ~3 ms of a 15 ms
single-stream step, time in which no weight is read. DecodeBlocks checks every weight once, when it is
built, holds the layers as C structs of pointers into the model's tensors, and runs all blocks per step in
one call: the same kernels in the same order (the SiLU in C: within float rounding of torch's).

Built by the model (Transformer.decode_blocks) when every linear is a dq one and the plan fuses decode;
the per-layer Python loop stays as the reference and for batches that take the prefill GEMM.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from model_runtime import ckernels


@dataclass(frozen=True)
class LinearWeights:
    """One dq linear as the C kernels read it (Int8Linear / Int4Linear.dq_weights)."""

    bits: int               # 8 or 4
    w: Tensor               # int8 [N, K] | uint8 [N, K/2] in the kernel's nibble layout
    scales: Tensor          # int8: float32 [N]; int4: bfloat16 [N, K/G]
    zeros: Tensor | None    # int4: bfloat16 [N, K/G]
    bias: Tensor | None     # float32 [N]
    block: int              # int8: the activation block; int4: the group size
    n: int
    k: int
    wsum: Tensor | None = None  # int8: int32 [N, K/block], the block sums (ckernels.w8_block_sums), or None

    def check(self, what: str) -> None:
        """What the C side trusts: dtypes, shapes and layouts (raises ValueError)."""
        # the kernels' own shape rules (a kernel refusing a shape mid-step would leave x and the caches half updated)
        if self.bits == 8:
            ckernels._check(self.w, torch.int8, (self.n, self.k), f"{what}.w")
            ckernels._check(self.scales, torch.float32, (self.n,), f"{what}.scales")
            if self.zeros is not None or self.block <= 0 or self.block % 32 or self.k % self.block:
                raise ValueError(f"{what}: int8 takes no zeros and an activation block (a multiple of 32) dividing K")
            ckernels._check(self.wsum, torch.int32, (self.n, self.k // self.block), f"{what}.wsum")
        elif self.bits == 4:
            if self.wsum is not None:
                raise ValueError(f"{what}: int4 takes no block sums")
            if self.zeros is None or not ckernels.w4_group_supported(self.block, self.k):
                raise ValueError(f"{what}: int4 needs zeros and a group the kernel supports (32, or 64-multiples "
                                 "up to 256, dividing K, K a multiple of 64)")
            ckernels._check(self.w, torch.uint8, (self.n, self.k // 2), f"{what}.w")
            ckernels._check(self.scales, torch.bfloat16, (self.n, self.k // self.block), f"{what}.scales")
            ckernels._check(self.zeros, torch.bfloat16, (self.n, self.k // self.block), f"{what}.zeros")
        else:
            raise ValueError(f"{what}: {self.bits}-bit weights have no dq kernel")
        ckernels._check(self.bias, torch.float32, (self.n,), f"{what}.bias")


@dataclass(frozen=True)
class BlockWeights:
    """One decoder block: RMSNorm -> qkv -> attention -> o (+ residual), RMSNorm -> gate_up -> SwiGLU -> down."""

    qkv: LinearWeights
    o: LinearWeights
    gate_up: LinearWeights       # [gate; up]
    down: LinearWeights
    attn_norm: Tensor            # float32 [C]
    attn_eps: float
    mlp_norm: Tensor
    mlp_eps: float


class _Linear(ctypes.Structure):  # dq_linear_t
    _fields_ = [("w", ctypes.c_void_p), ("s", ctypes.c_void_p), ("z", ctypes.c_void_p), ("wsum", ctypes.c_void_p),
                ("bias", ctypes.c_void_p),
                ("n", ctypes.c_int64), ("k", ctypes.c_int64), ("blk", ctypes.c_int64), ("bits", ctypes.c_int64)]


class _Block(ctypes.Structure):  # dq_block_t
    _fields_ = [("qkv", _Linear), ("o", _Linear), ("gate_up", _Linear), ("down", _Linear),
                ("attn_norm", ctypes.c_void_p), ("mlp_norm", ctypes.c_void_p),
                ("attn_eps", ctypes.c_float), ("mlp_eps", ctypes.c_float)]


def _linear(lw: LinearWeights) -> _Linear:
    return _Linear(lw.w.data_ptr(), lw.scales.data_ptr(), None if lw.zeros is None else lw.zeros.data_ptr(),
                   None if lw.wsum is None else lw.wsum.data_ptr(), None if lw.bias is None else lw.bias.data_ptr(),
                   lw.n, lw.k, lw.block, lw.bits)


class DecodeBlocks:
    """The model's decoder blocks for dq_decode_blocks: checked once, run per decode step."""

    def __init__(self, blocks: Sequence[BlockWeights], n_heads: int, n_kv: int, head_dim: int) -> None:
        if not blocks:
            raise ValueError("no decoder blocks")
        c = blocks[0].qkv.k
        inter = blocks[0].down.k
        if inter % 8:
            raise ValueError(f"intermediate size {inter} is not a multiple of 8")
        for i, b in enumerate(blocks):
            shapes = {"qkv": (b.qkv, (n_heads + 2 * n_kv) * head_dim, c), "o": (b.o, c, n_heads * head_dim),
                      "gate_up": (b.gate_up, 2 * inter, c), "down": (b.down, c, inter)}
            for name, (lw, n, k) in shapes.items():
                lw.check(f"layer {i} {name}")
                if (lw.n, lw.k) != (n, k):
                    raise ValueError(f"layer {i} {name} is [{lw.n}, {lw.k}], the block needs [{n}, {k}]")
            for norm in (b.attn_norm, b.mlp_norm):
                ckernels._check(norm, torch.float32, (c,), f"layer {i} norm weight")
        # detached aliases own the memory the structs point into: a Module.to() / _apply gives a parameter new
        # memory and frees the old (the model drops its plan then: Transformer._apply)
        blocks = [_owning(b) for b in blocks]
        self.blocks = tuple(blocks)
        self._structs = (_Block * len(blocks))(*(
            _Block(_linear(b.qkv), _linear(b.o), _linear(b.gate_up), _linear(b.down), b.attn_norm.data_ptr(),
                   b.mlp_norm.data_ptr(), b.attn_eps, b.mlp_eps) for b in blocks))
        self.n_heads, self.n_kv, self.head_dim, self.hidden = n_heads, n_kv, head_dim, c
        # the last KV cache's layers (held: their memory stays valid) and the pointer arrays taken from them
        self._cache: tuple[tuple[Tensor, ...], tuple[int, ...], ctypes.Array[ctypes.c_void_p],
                           ctypes.Array[ctypes.c_void_p]] | None = None

    def _cache_pointers(self, kc: list[Tensor], vc: list[Tensor]) -> tuple[ctypes.Array[ctypes.c_void_p],
                                                                            ctypes.Array[ctypes.c_void_p]]:
        """The layers' pointers, checked in full when any layer tensor (or its memory) differs from last time."""
        layers = (*kc, *vc)
        ptrs = tuple(t.data_ptr() for t in layers)
        cached = self._cache
        if cached is not None and cached[1] == ptrs and all(a is b for a, b in zip(cached[0], layers, strict=True)):
            return cached[2], cached[3]
        self._cache = None
        n = len(self.blocks)
        if len(kc) != n or len(vc) != n:
            raise ValueError(f"the KV cache has {len(kc)}/{len(vc)} layers, the model {n}")
        for t in (*kc, *vc):
            if t.dtype != torch.float32 or not t.is_contiguous() or t.shape != kc[0].shape:
                raise ValueError("every KV cache layer must be a contiguous float32 tensor of one shape")
        kp = (ctypes.c_void_p * n)(*ptrs[:n])
        vp = (ctypes.c_void_p * n)(*ptrs[n:])
        self._cache = (layers, ptrs, kp, vp)
        return kp, vp

    def run(self, x: Tensor, slots: Tensor, positions: Tensor, cos: Tensor, sin: Tensor, kc: list[Tensor],
            vc: list[Tensor]) -> None:
        """x [B, C] float32 (the residual stream after the embedding) -> after the last block, in place; B rows
        at int64 cache slots/positions [B] (written there); cos/sin [rope_len, hd] float32."""
        if x.dtype != torch.float32 or not x.is_contiguous() or x.dim() != 2 or x.shape[1] != self.hidden:
            raise ValueError(f"x must be a contiguous float32 [B, {self.hidden}] tensor")
        rows = x.shape[0]
        kp, vp = self._cache_pointers(kc, vc)
        ckernels.check_attention_rows(rows, self.n_heads, self.n_kv, self.head_dim, slots, positions, cos, sin,
                                      kc[0], vc[0])
        rc = ckernels._load().lib.dq_decode_blocks(
            x.data_ptr(), rows, ctypes.addressof(self._structs), len(self.blocks), kp, vp, kc[0].shape[2],
            self.n_heads, self.n_kv, self.head_dim, slots.data_ptr(), positions.data_ptr(), cos.data_ptr(),
            sin.data_ptr(), torch.get_num_threads())
        if rc != 0:
            raise RuntimeError("dq_decode_blocks failed (out of memory)")  # every shape rule was checked above


def _owning(b: BlockWeights) -> BlockWeights:
    """The same block with every tensor a detached alias (one more owner of its memory, not a parameter)."""
    def lin(lw: LinearWeights) -> LinearWeights:
        return replace(lw, w=lw.w.detach(), scales=lw.scales.detach(),
                       zeros=None if lw.zeros is None else lw.zeros.detach(),
                       bias=None if lw.bias is None else lw.bias.detach(),
                       wsum=None if lw.wsum is None else lw.wsum.detach())
    return replace(b, qkv=lin(b.qkv), o=lin(b.o), gate_up=lin(b.gate_up), down=lin(b.down),
                   attn_norm=b.attn_norm.detach(), mlp_norm=b.mlp_norm.detach())
