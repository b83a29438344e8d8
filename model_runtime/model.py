"""A nanoGPT-style Qwen2/Llama decoder with a per-slot KV cache for batched decoding.

No I/O here: loader.py builds the weights, engine.py drives forward().

One forward() serves both phases:
- prefill (or a chunk of it): input_ids [1, T] at positions start..start+T-1 of one slot;
- decode: input_ids [B, 1], every running sequence at its own position, in one batch.
Keys/values are written into the preallocated cache at (slot, position) and attention reads the
first `kv_len` positions of each slot under a mask (position p attends to cache positions <= p),
so sequences of different lengths share one forward without padding the inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model_runtime import ckernels
from model_runtime.config import ModelConfig
from model_runtime.decode_blocks import BlockWeights, DecodeBlocks

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from model_runtime.kernels import FusedLinear, Int4Embedding, Int8Embedding


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # one fused op
        # Normalise in float32 like the reference implementations, then scale in the input dtype.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> Tensor:
    """[head_dim/2] inverse frequencies, with llama3 scaling when the config asks for it."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    s = cfg.rope_scaling
    if not s:
        return inv_freq
    factor = float(s["factor"])
    low, high = float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
    old_len = float(s.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class KVCache:
    """Preallocated keys/values: per layer [max_batch, n_kv_heads, max_len, head_dim] (one slot per sequence)."""

    def __init__(self, cfg: ModelConfig, max_batch: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
        shape = (max_batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.max_batch, self.max_len = max_batch, max_len
        if torch.device(device).type == "cuda":
            # the compiled decode step (mode="reduce-overhead") writes keys/values in place, and inductor records
            # its CUDA graphs only when such mutated inputs keep one address, which marking them static promises
            # (transformers' StaticCache does the same); unmarked, every step ran op by op (an H200: 6 ms a step)
            for t in (*self.k, *self.v):
                torch._dynamo.mark_static_address(t)


# A prompt chunk of n rows from position p joins the decode rows on the fused C attention while n (p + n) is at most
# this (about 57 rows at 600); bigger ones take SDPA's flash kernel, which outruns the per-row C kernel there (per
# 0.5B layer, alone: 57 rows at 128 0.6 vs 0.4 ms, at 600 2.3 vs 1.5 (the PyTorch ops around SDPA tip those two to
# the C kernel in a whole step), 256 at 2,000 37.7 vs 18.3 ms).
FUSED_CHUNK_WORK = 40_000


def _seq_starts(seqs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(first row, rows) of each sequence of a ragged batch's (slot, rows) list."""
    out, row = [], 0
    for _, n in seqs:
        out.append((row, n))
        row += n
    return out


@dataclass
class AttnGroup:
    """Rows of a ragged batch's tokens seen as [B, T] (B sequences of T tokens, consecutive), in cache slots
    `slots`, attending cache positions [0, kv_len) under mask [B, 1, T, kv_len] (None: causal, T tokens alone)."""

    rows: slice
    B: int
    T: int
    slots: Tensor | slice
    kv_len: int
    mask: Tensor | None
    # rows taken as decode rows (T == 1, each at its own slot and position: a run of decode rows, or every row of a
    # batch whose prompt chunks are small) on the CPU integer kernels' fused attention (ckernels.attn_decode: RoPE,
    # cache write and attention in one call, as a decode step runs them): the rows' int64 positions and the model's
    # RoPE tables; None: PyTorch's SDPA under `mask`
    fused: tuple[Tensor, Tensor, Tensor] | None = None


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, (self.n_heads + 2 * self.n_kv) * self.hd, bias=cfg.qkv_bias)
        self.o = nn.Linear(self.n_heads * self.hd, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, kc: Tensor, vc: Tensor,
                slots: Tensor | slice, slot_idx: Tensor, positions: Tensor, kv_len: int) -> Tensor:
        """mask [B, 1, T, L] (True: visible), or None: plain causal attention over this chunk alone."""
        y = self.attend(self.qkv(x), cos, sin, mask, kc, vc, slots, slot_idx, positions, kv_len)
        out: Tensor = self.o(y)
        return out

    def attend(self, qkv: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, kc: Tensor, vc: Tensor,
               slots: Tensor | slice, slot_idx: Tensor, positions: Tensor, kv_len: int) -> Tensor:
        """forward() between the projections: qkv [B, T, (nh + 2 nkv) * hd] -> [B, T, nh * hd]."""
        B, T, _ = qkv.shape
        nh, nkv, hd = self.n_heads, self.n_kv, self.hd
        qk = qkv[..., : (nh + nkv) * hd].view(B, T, nh + nkv, hd)
        qk = qk * cos + rotate_half(qk) * sin                         # RoPE on q and k at once; cos [B, T, 1, hd]
        q = qk[:, :, :nh].transpose(1, 2)                             # [B, nh, T, hd]
        k = qk[:, :, nh:]                                             # [B, T, nkv, hd]
        v = qkv[..., (nh + nkv) * hd:].view(B, T, nkv, hd)
        # write this step's keys/values at (slot, position): cache[slot, :, pos] is [nkv, hd]
        kc[slot_idx[:, None], :, positions] = k.to(kc.dtype)
        vc[slot_idx[:, None], :, positions] = v.to(vc.dtype)
        keys, values = kc[slots, :, :kv_len], vc[slots, :, :kv_len]   # [B, nkv, L, hd]
        # attention runs in the cache's dtype (float32 on CPU: see kv_cache_dtype). On CPU both forms run
        # SDPA's flash kernel (torch._fused_sdp_choice: FLASH_ATTENTION, bool mask and GQA included), but
        # only is_causal lets it skip the key blocks above the diagonal instead of computing and masking them
        y = F.scaled_dot_product_attention(q.to(keys.dtype), keys, values, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=True).to(qkv.dtype)       # [B, nh, T, hd]
        return y.transpose(1, 2).reshape(B, T, nh * hd)

    def forward_ragged(self, x: Tensor, cos: Tensor, sin: Tensor, kc: Tensor, vc: Tensor, tok_slots: Tensor,
                       tok_pos: Tensor, groups: list[AttnGroup]) -> Tensor:
        """forward() for a ragged batch x [1, N, C] (see Transformer.forward_ragged): the projections and the cache
        write over all N tokens at once, attention per group."""
        y = self.attend_ragged(self.qkv(x)[0], cos, sin, kc, vc, tok_slots, tok_pos, groups)
        out: Tensor = self.o(y[None])
        return out

    def attend_ragged(self, qkv: Tensor, cos: Tensor, sin: Tensor, kc: Tensor, vc: Tensor, tok_slots: Tensor,
                      tok_pos: Tensor, groups: list[AttnGroup]) -> Tensor:
        """forward_ragged() between the projections: qkv [N, (nh + 2 nkv) * hd] -> [N, nh * hd]."""
        N = qkv.shape[0]
        nh, nkv, hd = self.n_heads, self.n_kv, self.hd
        fused = groups[0].fused if len(groups) == 1 and groups[0].rows == slice(0, N) else None
        if fused is not None:  # every row on the fused C attention, which writes the cache: nothing else to do
            # (only forward_ragged's all-rows group covers every row, and it checked their indices once)
            pos, cos_t, sin_t = fused
            return ckernels.attn_decode(qkv, nh, nkv, hd, cast(Tensor, groups[0].slots), pos, cos_t, sin_t, kc, vc,
                                        validate=False).to(qkv.dtype)  # (Transformer.forward_ragged checked them)
        qk = qkv[:, : (nh + nkv) * hd].view(N, nh + nkv, hd)
        qk = qk * cos + rotate_half(qk) * sin                         # cos [N, 1, hd]
        kc[tok_slots, :, tok_pos] = qk[:, nh:].to(kc.dtype)           # cache[slot, :, pos] is [nkv, hd]
        vc[tok_slots, :, tok_pos] = qkv[:, (nh + nkv) * hd:].view(N, nkv, hd).to(vc.dtype)
        ys = []
        for g in groups:
            if g.fused is not None:  # decode rows: as decode_fused (its RoPE and cache write redo the rows' own)
                pos, cos_t, sin_t = g.fused
                ys.append(ckernels.attn_decode(qkv[g.rows], nh, nkv, hd, cast(Tensor, g.slots), pos, cos_t, sin_t,
                                               kc, vc).to(qkv.dtype))          # [B, nh hd]
                continue
            q = qk[g.rows, :nh].view(g.B, g.T, nh, hd).transpose(1, 2)  # [B, nh, T, hd]
            keys, values = kc[g.slots, :, :g.kv_len], vc[g.slots, :, :g.kv_len]
            y = F.scaled_dot_product_attention(q.to(keys.dtype), keys, values, attn_mask=g.mask,
                                               is_causal=g.mask is None, enable_gqa=True)
            ys.append(y.transpose(1, 2).reshape(g.B * g.T, nh * hd).to(qkv.dtype))
        return torch.cat(ys)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.inter = cfg.intermediate_size
        self.gate_up = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)  # [gate; up]
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).split(self.inter, dim=-1)            # [..., I] each
        out: Tensor = self.down(F.silu(gate) * up)
        return out


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.mlp = MLP(cfg)
        # prompt rows through the linears' fused forms, as a decode step (decode_fused): each norm in its linear's
        # input pass, each residual added in its linear's output pass, SwiGLU in C. Set by build.py where the plan
        # runs every linear on the CPU integer kernels (float32 activations). Why: there each small PyTorch op
        # between the GEMMs cost ~50-150 us (the first after a GEMM the most), and a block had about twelve of them
        # (norms, residual adds, silu and mul).
        self.fused_rows = False

    def forward(self, x: Tensor, *attn_args: Tensor | slice | int | None) -> Tensor:
        if self.fused_rows:
            B, T, C = x.shape
            x = x.contiguous()  # (the embedding's output: already), then updated in place by every block
            x2 = x.view(B * T, C)
            qkv = self.fused_linears()[0].fused(x2, norm=self.attn_norm).view(B, T, -1)
            y = self.attn.attend(qkv, *attn_args)  # type: ignore[arg-type]
            self._fused_tail(x2, y.view(B * T, -1))
            return x
        x = x + self.attn(self.attn_norm(x), *attn_args)
        mlp_out: Tensor = self.mlp(self.mlp_norm(x))
        return x + mlp_out

    def forward_ragged(self, x: Tensor, cos: Tensor, sin: Tensor, kc: Tensor, vc: Tensor, tok_slots: Tensor,
                       tok_pos: Tensor, groups: list[AttnGroup]) -> Tensor:
        if self.fused_rows:
            x = x.contiguous()  # (already), then updated in place as in forward()
            x2 = x[0]                                                           # [N, C]
            qkv = self.fused_linears()[0].fused(x2, norm=self.attn_norm)
            self._fused_tail(x2, self.attn.attend_ragged(qkv, cos, sin, kc, vc, tok_slots, tok_pos, groups))
            return x
        x = x + self.attn.forward_ragged(self.attn_norm(x), cos, sin, kc, vc, tok_slots, tok_pos, groups)
        mlp_out: Tensor = self.mlp(self.mlp_norm(x))
        return x + mlp_out

    def _fused_tail(self, x: Tensor, y: Tensor) -> None:
        """x [N, C] float32 += o(y), then += the MLP of its norm: the block after attention, on fused linears."""
        _, o_lin, gate_up_lin, down_lin = self.fused_linears()
        o_lin.fused(y, out=x)                                                   # x += o(y)
        gu = gate_up_lin.fused(x, norm=self.mlp_norm)                           # [N, 2 I]
        down_lin.fused(ckernels.silu_mul(gu), out=x)                            # x += down(silu(gate) * up)

    def decode_fused(self, x: Tensor, kc: Tensor, vc: Tensor, slot_idx: Tensor, positions: Tensor,
                     cos: Tensor, sin: Tensor, validate: bool = True) -> None:
        """One decode step on the CPU integer kernels (ckernels.py), x [B, C] float32 updated in place.

        Same math as forward(): the norms are fused into the next linear's activation quantization,
        the residual adds into the linear's output, RoPE + cache write + attention into one call.
        Every linear here is a quantized one with a `fused` method (the loader replaced nn.Linear)."""
        a = self.attn
        qkv = self.fused_linears()[0].fused(x, norm=self.attn_norm)             # [B, (nh + 2 nkv) hd]
        y = ckernels.attn_decode(qkv, a.n_heads, a.n_kv, a.hd, slot_idx, positions, cos, sin, kc, vc,
                                 validate=validate)                             # [B, nh hd]
        self._fused_tail(x, y)

    def fused_linears(self) -> tuple[FusedLinear, FusedLinear, FusedLinear, FusedLinear]:
        """qkv, o, gate_up, down: on the fused decode path every one is a quantized dq linear."""
        lins = (self.attn.qkv, self.attn.o, self.mlp.gate_up, self.mlp.down)
        return cast("tuple[FusedLinear, FusedLinear, FusedLinear, FusedLinear]", lins)

    def dq_weights(self) -> BlockWeights:
        """The block's weights as decode_blocks.py runs them (decode_fused's math in one C call per step)."""
        qkv, o, gate_up, down = (lin.dq_weights() for lin in self.fused_linears())
        return BlockWeights(qkv, o, gate_up, down, attn_norm=self.attn_norm.weight, attn_eps=self.attn_norm.eps,
                            mlp_norm=self.mlp_norm.weight, mlp_eps=self.mlp_norm.eps)


class Transformer(nn.Module):
    """Token ids -> next-token logits, reading and writing a KVCache."""

    def __init__(self, cfg: ModelConfig, max_len: int | None = None) -> None:
        super().__init__()
        self.config = cfg
        embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        # the loader may store it quantized (kernels.Int8Embedding / Int4Embedding)
        self.embed: nn.Embedding | Int8Embedding | Int4Embedding = embed
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = embed.weight
        self.rope_len = 0
        # dtype of the activations between layers (the plan's); None: the embedding's dtype. float32
        # when the CPU integer kernels run every linear (ckernels.py): they take float32 rows, and
        # float32 elementwise math is faster than bfloat16 on CPUs without native bf16.
        self.act_dtype: torch.dtype | None = None
        # decode steps through Block.decode_fused (the KernelPlan's: every linear on the CPU integer
        # kernels and activations float32); set by build.build_model with the plan's dtypes
        self.fused_decode = False
        self.float_dtype = torch.float32  # the dtype float weights are kept in
        self.kv_dtype: torch.dtype | None = None
        # the decode step's blocks in one C call (decode_blocks.py), built on the first fused decode step
        self._decode_blocks: tuple[DecodeBlocks, int] | None = None
        if not embed.weight.is_meta:  # the loader builds on "meta" and calls set_rope itself
            self.set_rope(max_len or cfg.max_position)

    def set_rope(self, max_len: int, device: torch.device | str = "cpu") -> None:
        """float32 cos/sin tables [max_len, head_dim] (plain attributes: not weights, not saved)."""
        t = torch.arange(max_len, dtype=torch.float32, device=device)
        freqs = torch.outer(t, rope_inv_freq(self.config).to(device))  # [max_len, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.rope_cos, self.rope_sin = emb.cos(), emb.sin()
        self.rope_len = max_len

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def kv_cache_dtype(self) -> torch.dtype:
        """The plan's (loader): float32 on CPU, where this CPU (AVX2, no native bf16 math) runs decode
        attention 8-13x faster in float32 than in bf16 (measured: batch 8 x 512 positions 0.45 ms vs
        3.7 ms per layer), which is worth the 2x cache memory; the model's dtype elsewhere. A model
        built by hand (tests): float32 on CPU, else its norm's dtype."""
        if self.kv_dtype is not None:
            return self.kv_dtype
        w = self.norm.weight
        return torch.float32 if w.device.type == "cpu" else w.dtype

    def new_cache(self, max_batch: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        dtype = dtype or self.kv_cache_dtype()
        return KVCache(self.config, max_batch, min(max_len, self.rope_len), dtype, self.device)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Transformer:
        # .to() / .float() / .share_memory() may give weights new memory: the C decode plan is rebuilt from them
        self._decode_blocks = None
        return cast("Transformer", super()._apply(fn, recurse))  # type: ignore[no-untyped-call]

    def decode_blocks(self, rows: int) -> DecodeBlocks | None:
        """The fused decode step's blocks as one C call (built once), or None for a batch of `rows` rows that
        some linear runs on the plan's prefill GEMM (Block.decode_fused then calls each linear itself)."""
        if self._decode_blocks is None:
            layers = cast("Iterable[Block]", self.layers)
            linears = [lin for b in layers for lin in b.fused_linears()]
            limit = min((lin.prefill_min_rows for lin in linears if lin.prefill_kernel != "none"), default=1 << 62)
            cfg = self.config
            self._decode_blocks = (DecodeBlocks([b.dq_weights() for b in layers], cfg.n_heads, cfg.n_kv_heads,
                                                cfg.head_dim), limit)
        blocks, limit = self._decode_blocks
        return blocks if rows < limit else None

    def forward(self, input_ids: Tensor, positions: Tensor, cache: KVCache, slots: Tensor | slice,
                kv_len: int | None = None, logits: str = "last") -> Tensor | None:
        """input_ids/positions [B, T]; slots: B cache slots (a tensor, or a slice when contiguous).

        kv_len: attend over cache positions [0, kv_len) (default: max(positions) + 1).
        logits: "last" -> [B, vocab] float32 for each row's last token, "all" -> [B, T, vocab], "none".
        """
        B, T = input_ids.shape
        if kv_len is None:
            kv_len = int(positions.max()) + 1
        if isinstance(slots, slice):
            slot_idx = torch.arange(slots.start, slots.stop, device=input_ids.device)
        else:
            slot_idx = slots
        x: Tensor = self.embed(input_ids)                                # [B, T, C]
        if self.act_dtype is not None:
            x = x.to(self.act_dtype)
        if self.fused_decode and T == 1 and cache.k[0].dtype == torch.float32 and x.device.type == "cpu":
            x = x.reshape(B, -1).contiguous()                            # [B, C]
            pos = positions.reshape(B).to(torch.int64).contiguous()
            slot_idx = slot_idx.to(torch.int64).contiguous()
            blocks = self.decode_blocks(B)
            if blocks is not None:
                blocks.run(x, slot_idx, pos, self.rope_cos, self.rope_sin, cache.k, cache.v)
            else:
                for i, block in enumerate(cast("Iterable[Block]", self.layers)):
                    # every layer's cache has the same shape: the indices are checked once, at layer 0
                    block.decode_fused(x, cache.k[i], cache.v[i], slot_idx, pos, self.rope_cos, self.rope_sin,
                                       validate=i == 0)
            if logits == "none":
                return None
            out = cast("FusedLinear", self.lm_head).fused(x, norm=self.norm)  # [B, V] float32
            return out if logits == "last" else out[:, None, :]
        dtype = x.dtype
        cos = self.rope_cos[positions].to(dtype).unsqueeze(2)            # [B, T, 1, hd]
        sin = self.rope_sin[positions].to(dtype).unsqueeze(2)
        # mask[b, 0, t, l]: cache position l is visible to the token at positions[b, t]; None when every row
        # is a prompt's start (positions 0..T-1, nothing earlier in the slot): plain causal attention, which
        # SDPA's CPU flash kernel runs 1.7-3x faster than the same mask given explicitly (measured on the
        # 0.5B's heads, 14/2 x 64: 256 tokens 35 -> 12 ms, 2,000 tokens 333 -> 198 ms per layer)
        mask: Tensor | None = None
        ar = torch.arange(kv_len, device=input_ids.device)
        if T == 1 or kv_len != T or not bool((positions == ar[None, :]).all()):
            mask = (ar[None, None, None, :] <= positions[:, None, :, None])  # [B, 1, T, L]
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, cache.k[i], cache.v[i], slots, slot_idx, positions, kv_len)
        if logits == "none":
            return None
        if logits == "last":
            x = x[:, -1, :]                                              # [B, C]
        head: Tensor = self.lm_head(self.norm(x))
        return head.float()

    def forward_ragged(self, input_ids: Tensor, positions: Tensor, cache: KVCache, seqs: list[tuple[int, int]],
                       logit_rows: list[int]) -> Tensor | None:
        """Sequences of different lengths in ONE forward, without padding: input_ids/positions [N], each
        sequence's tokens consecutive at consecutive positions; seqs: (cache slot, tokens) per sequence, in order.
        The linears see all N rows at once, so decode rows and prompt chunks share one read of the weights (a
        separate prompt-chunk forward would read them again: about one more decode step). Attention runs per
        group: runs of one-token sequences together (a decode step), every longer sequence alone (a prompt chunk);
        on the CPU integer kernels every row in one group while the chunks are small (_ragged_groups).
        Returns the float32 logits [len(logit_rows), vocab] of those token rows, or None when there are none."""
        device = input_ids.device
        pos = positions.tolist()
        x: Tensor = self.embed(input_ids[None])                          # [1, N, C]
        if self.act_dtype is not None:
            x = x.to(self.act_dtype)
        groups, tok_slots, cos, sin = self._ragged_groups(positions, pos, cache, seqs, x.dtype)
        slot_t = torch.tensor(tok_slots, device=device)
        for i, layer in enumerate(cast("Iterable[Block]", self.layers)):
            x = layer.forward_ragged(x, cos, sin, cache.k[i], cache.v[i], slot_t, positions, groups)
        if not logit_rows:
            return None
        head: Tensor = self.lm_head(self.norm(x[0, logit_rows]))
        return head.float()

    def _ragged_groups(self, positions: Tensor, pos: list[int], cache: KVCache, seqs: list[tuple[int, int]],
                       dtype: torch.dtype) -> tuple[list[AttnGroup], list[int], Tensor, Tensor]:
        """forward_ragged's attention groups, each row's cache slot, and the PyTorch RoPE tables [N, 1, hd] for the
        groups on SDPA (`positions` in their place where every row takes the fused C attention: unused)."""
        device = positions.device
        groups: list[AttnGroup] = []
        tok_slots: list[int] = []
        cos = sin = positions  # (the PyTorch RoPE's tables: only where a group runs on SDPA, below)
        fused_attn = (self.fused_decode and cache.k[0].dtype == torch.float32 and device.type == "cpu"
                      and (self.act_dtype or torch.float32) == torch.float32)
        if fused_attn and all(n == 1 or n * (pos[r] + n) <= FUSED_CHUNK_WORK for r, n in _seq_starts(seqs)):
            # every row, decode rows and small prompt chunks alike, through the fused C attention of a decode step
            # (RoPE, cache write and attention in one call a layer): it writes every row's key/value before any row
            # attends, so a chunk's rows see the chunk's earlier rows, as causal attention. PyTorch's form (RoPE,
            # two cache index_puts, SDPA under a mask, a cat: ops of ~50-150 us each between the GEMMs here) cost
            # more: 0.5B int8, 7 decode rows + a 57-row chunk at 128 / 600, A/B median of 5: 113.6 -> 109.6 /
            # 135.5 -> 132.1 ms a step. A big chunk stays on SDPA (FUSED_CHUNK_WORK).
            tok_slots = [slot for slot, n in seqs for _ in range(n)]
            slot_ids, pos64 = torch.tensor(tok_slots, device=device), positions.to(torch.int64).contiguous()
            cfg = self.config  # (checked here once for every layer, as a decode step does: their caches share a shape)
            ckernels.check_attention_rows(len(pos), cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, slot_ids, pos64,
                                          self.rope_cos, self.rope_sin, cache.k[0], cache.v[0])
            groups.append(AttnGroup(slice(0, len(pos)), len(pos), 1, slot_ids, max(pos) + 1, None,
                                    (pos64, self.rope_cos, self.rope_sin)))
        else:
            cos = self.rope_cos[positions].to(dtype).unsqueeze(1)      # [N, 1, hd]
            sin = self.rope_sin[positions].to(dtype).unsqueeze(1)
            row = 0
            i = 0
            while i < len(seqs):
                slot, n = seqs[i]
                if n == 1:  # a run of decode rows: one [B, 1] group, each row at its own position
                    j = i
                    while j < len(seqs) and seqs[j][1] == 1:
                        j += 1
                    slots = [s for s, _ in seqs[i:j]]
                    kv_len = max(pos[row:row + j - i]) + 1
                    slot_ids = torch.tensor(slots, device=device)
                    if fused_attn:  # the fused C attention (a gather of their slots for SDPA cost more than the
                        # rest of a 15-row step: 8 decode rows + 7 prompt rows, 70 -> 37 ms)
                        fused = (positions[row:row + j - i].to(torch.int64).contiguous(), self.rope_cos,
                                 self.rope_sin)
                        groups.append(AttnGroup(slice(row, row + j - i), j - i, 1, slot_ids, kv_len, None, fused))
                    else:
                        ar = torch.arange(kv_len, device=device)
                        rows_mask = ar[None, None, None, :] <= positions[row:row + j - i, None, None, None]
                        groups.append(AttnGroup(slice(row, row + j - i), j - i, 1, slot_ids, kv_len, rows_mask))
                    tok_slots += slots
                    row, i = row + j - i, j
                    continue
                start = pos[row]
                mask: Tensor | None = None
                if start > 0:  # earlier positions of this slot are all visible, the chunk itself causally
                    ar = torch.arange(start + n, device=device)
                    mask = (ar[None, None, None, :] <= positions[None, None, row:row + n, None])
                groups.append(AttnGroup(slice(row, row + n), 1, n, slice(slot, slot + 1), start + n, mask))
                tok_slots += [slot] * n
                row, i = row + n, i + 1
        return groups, tok_slots, cos, sin
