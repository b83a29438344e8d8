"""decode_blocks.py + dq_decode_blocks: a decode step's decoder blocks in one C call.

It must be the per-layer path (Block.decode_fused) exactly: the same logits and KV caches bit for bit, for int8
and int4, a batch at mixed positions in scattered slots; the model must take it for decode batches and leave
batches that go to the prefill GEMM to the per-layer path; and everything the C side trusts (shapes, slots,
positions, the cache's layers) must be refused with a ValueError before it runs.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from model_runtime import ckernels
from model_runtime.decode_blocks import DecodeBlocks
from model_runtime.loader import load_model
from model_runtime.model import Block, Transformer
from tests.cpu_kernels import needs_cpu_kernels

pytestmark = needs_cpu_kernels


@pytest.fixture(scope="module", params=["int8", "int4"])
def fused_model(request, tiny_qwen2_dir) -> Transformer:
    model = load_model(tiny_qwen2_dir, quantization=request.param, group_size=32).model
    assert model.fused_decode
    return model


def _prefilled_caches(model: Transformer, n: int) -> list:
    """n identical caches: 3 sequences of different lengths in slots 0, 2 and 3 of 4."""
    caches = [model.new_cache(4, 64) for _ in range(n)]
    with torch.inference_mode():
        for cache in caches:
            for slot, length in ((0, 5), (2, 9), (3, 2)):
                ids = torch.arange(100 + slot, 100 + slot + length)[None]
                model(ids, torch.arange(length)[None], cache, slice(slot, slot + 1), logits="none")
    return caches


def _decode(model: Transformer, cache, steps: int = 4) -> torch.Tensor:
    """Greedy steps of the 3 sequences in one batch; their logits [steps, 3, V]."""
    ids, pos, slots = torch.tensor([[7], [8], [9]]), torch.tensor([[5], [9], [2]]), torch.tensor([0, 2, 3])
    out = []
    with torch.inference_mode():
        for i in range(steps):
            logits = model(ids, pos + i, cache, slots)
            out.append(logits)
            ids = logits.argmax(-1, keepdim=True)
    return torch.stack(out)


def test_one_call_equals_the_per_layer_path_bit_for_bit(fused_model, monkeypatch):
    c_cache, layer_cache = _prefilled_caches(fused_model, 2)
    calls = []
    run = DecodeBlocks.run
    monkeypatch.setattr(DecodeBlocks, "run", lambda self, *a: calls.append(1) or run(self, *a))
    one_call = _decode(fused_model, c_cache)
    assert len(calls) == 4  # every step took the C call
    monkeypatch.setattr(fused_model, "decode_blocks", lambda rows: None)  # the per-layer loop
    per_layer = _decode(fused_model, layer_cache)
    assert len(calls) == 4
    assert torch.equal(one_call, per_layer)
    for a, b in zip(c_cache.k + c_cache.v, layer_cache.k + layer_cache.v, strict=True):
        assert torch.equal(a, b)
    assert c_cache.k[0][1].abs().sum() == 0  # the unused slot stays untouched


def test_a_second_cache_is_written_not_the_first(fused_model):
    first, second, reference = _prefilled_caches(fused_model, 3)
    _decode(fused_model, first, steps=1)
    before = [t.clone() for t in first.k]
    assert torch.equal(_decode(fused_model, second, steps=1), _decode(fused_model, reference, steps=1))
    assert all(torch.equal(a, b) for a, b in zip(first.k, before, strict=True))
    assert not torch.equal(second.k[0], _prefilled_caches(fused_model, 1)[0].k[0])


def test_batches_for_the_prefill_gemm_keep_the_per_layer_path(fused_model, monkeypatch):
    linears = [lin for b in fused_model.layers for lin in (b.attn.qkv, b.attn.o, b.mlp.gate_up, b.mlp.down)]
    monkeypatch.setattr(fused_model, "_decode_blocks", None)
    for i, lin in enumerate(linears):
        monkeypatch.setattr(lin, "prefill_kernel", "int_mm" if i % 2 else "none")
        monkeypatch.setattr(lin, "prefill_min_rows", 8 if i == 3 else 16)
    assert fused_model.decode_blocks(7) is not None
    assert fused_model.decode_blocks(8) is None
    monkeypatch.setattr(fused_model, "_decode_blocks", None)
    for lin in linears:
        monkeypatch.setattr(lin, "prefill_kernel", "none")
    assert fused_model.decode_blocks(4096) is not None  # no prefill GEMM: every batch


def test_silu_mul_is_torchs_within_rounding():
    gu = torch.randn(5, 2 * 136) * 6
    gu[0, :10] = torch.tensor([-200.0, -88.0, -87.0, -20.0, -1e-6, 0.0, 1e-6, 20.0, 88.0, 200.0])
    h = ckernels.silu_mul(gu)
    ref = F.silu(gu[:, :136].double()) * gu[:, 136:].double()
    assert torch.isfinite(h).all()
    assert torch.allclose(h.double(), ref, rtol=1e-6, atol=1e-30)
    with pytest.raises(ValueError, match="silu_mul"):
        ckernels.silu_mul(torch.randn(2, 12))       # I not a multiple of 8
    with pytest.raises(ValueError, match="silu_mul"):
        ckernels.silu_mul(torch.randn(2, 32).double())


def _plan(model: Transformer, **changes) -> DecodeBlocks:
    blocks = [b.dq_weights() for b in model.layers]
    blocks[-1] = replace(blocks[-1], **changes)
    cfg = model.config
    return DecodeBlocks(blocks, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim)


def test_weights_that_do_not_chain_are_refused(fused_model):
    block: Block = fused_model.layers[-1]
    w = block.dq_weights()
    with pytest.raises(ValueError, match="layer 1 o"):
        _plan(fused_model, o=w.qkv)
    with pytest.raises(ValueError, match="norm weight"):
        _plan(fused_model, mlp_norm=w.mlp_norm.double())
    with pytest.raises(ValueError, match="down.w"):
        _plan(fused_model, down=replace(w.down, w=w.down.w[:, :-1]))
    with pytest.raises(ValueError, match="no dq kernel"):
        _plan(fused_model, down=replace(w.down, bits=2))
    if w.down.bits == 8:  # the block sums the batch kernel reads: int32, one per activation block
        # kept with the weights only where the kernels read them (AVX-512; on AVX2 alone they would be bytes for nothing)
        assert (w.down.wsum is not None) == ckernels.w8_block_sums_read()
        wsum = w.down.wsum if w.down.wsum is not None else ckernels.w8_block_sums(w.down.w, w.down.block)
        with pytest.raises(ValueError, match="down.wsum"):
            _plan(fused_model, down=replace(w.down, wsum=wsum[:, :-1]))
        with pytest.raises(ValueError, match="down.wsum"):
            _plan(fused_model, down=replace(w.down, wsum=wsum.long()))
    else:
        with pytest.raises(ValueError, match="int4 takes no block sums"):
            _plan(fused_model, down=replace(w.down, wsum=torch.zeros(w.down.n, 1, dtype=torch.int32)))
    with pytest.raises(ValueError, match="no decoder blocks"):
        DecodeBlocks([], 4, 2, 16)


def test_the_int8_block_sums_reach_the_kernels(fused_model):
    """The plan hands each int8 linear's prepared block sums to the C call: wrong ones change a 3-row step where the
    kernels read them (AVX-512); elsewhere none are kept."""
    w = fused_model.layers[-1].dq_weights()
    if w.down.bits != 8:
        pytest.skip("int4 linears carry no block sums")
    if not ckernels.w8_block_sums_read():
        assert w.down.wsum is None
        return
    wrong = {name: replace(lw, wsum=lw.wsum + 1) for name in ("qkv", "o", "gate_up", "down")
             for lw in [getattr(w, name)] if lw.wsum is not None}
    assert len(wrong) == 4
    outs = []
    for plan in (_plan(fused_model), _plan(fused_model, **wrong)):
        cache = _prefilled_caches(fused_model, 1)[0]
        x = torch.randn(3, plan.hidden, generator=torch.Generator().manual_seed(0))
        plan.run(x, torch.tensor([0, 2, 3]), torch.tensor([5, 9, 2]), fused_model.rope_cos, fused_model.rope_sin,
                 cache.k, cache.v)
        outs.append(x)
    assert not torch.equal(outs[0], outs[1])


def test_bad_rows_and_caches_are_refused_before_the_c_call(fused_model):
    cfg = fused_model.config
    plan = fused_model.decode_blocks(1)
    assert plan is not None
    cache = fused_model.new_cache(2, 16)
    x = torch.zeros(2, cfg.hidden_size)
    slots, pos = torch.tensor([0, 1]), torch.tensor([3, 4])
    args = (fused_model.rope_cos, fused_model.rope_sin)
    with pytest.raises(ValueError, match="x must be"):
        plan.run(torch.zeros(2, cfg.hidden_size + 1), slots, pos, *args, cache.k, cache.v)
    with pytest.raises(ValueError, match="slot is outside"):
        plan.run(x, torch.tensor([0, 2]), pos, *args, cache.k, cache.v)
    with pytest.raises(ValueError, match="position is outside"):
        plan.run(x, slots, torch.tensor([3, 16]), *args, cache.k, cache.v)
    with pytest.raises(ValueError, match="one slot and one position per row"):
        plan.run(x, torch.tensor([0]), torch.tensor([1]), *args, cache.k, cache.v)
    with pytest.raises(ValueError, match="int64"):
        plan.run(x, slots.int(), pos, *args, cache.k, cache.v)
    with pytest.raises(ValueError, match="layers"):
        plan.run(x, slots, pos, *args, cache.k[:-1], cache.v[:-1])
    other = fused_model.new_cache(4, 16)
    with pytest.raises(ValueError, match="one shape"):
        plan.run(x, slots, pos, *args, [cache.k[0], other.k[1]], cache.v)
    assert all(t.abs().sum() == 0 for t in cache.k + cache.v)  # nothing was written


def test_prompt_rows_take_the_fused_linears_within_rounding_of_the_pytorch_block(fused_model, monkeypatch):
    """With the plan's fused decode, a block's prompt rows (a plain chunk and a ragged batch) go through the linears'
    fused forms, as a decode step does: the norms in the linears' input pass, the residuals in their output pass,
    SwiGLU in C, no PyTorch norm, add or silu in between; the block's PyTorch form gives the same within rounding."""
    import torch.nn.functional as F

    from model_runtime.model import AttnGroup

    assert all(b.fused_rows for b in fused_model.layers)  # build.py sets it with the plan's fused decode
    block = fused_model.layers[0]
    cfg = fused_model.config
    torch.manual_seed(5)
    x = torch.randn(1, 20, cfg.hidden_size)
    pos = torch.arange(20)
    cos, sin = fused_model.rope_cos[pos][None, :, None], fused_model.rope_sin[pos][None, :, None]
    calls: list[str] = []
    silu_mul, rms_norm, silu = ckernels.silu_mul, F.rms_norm, F.silu
    monkeypatch.setattr(ckernels, "silu_mul", lambda gu: calls.append("silu_mul") or silu_mul(gu))
    monkeypatch.setattr(F, "rms_norm", lambda *a, **kw: calls.append("rms_norm") or rms_norm(*a, **kw))
    monkeypatch.setattr(F, "silu", lambda *a, **kw: calls.append("silu") or silu(*a, **kw))

    def run(fused: bool, ragged: bool) -> tuple[torch.Tensor, torch.Tensor]:
        monkeypatch.setattr(block, "fused_rows", fused)
        cache = fused_model.new_cache(1, 32)
        with torch.inference_mode():
            if ragged:
                groups = [AttnGroup(slice(0, 20), 1, 20, slice(0, 1), 20, None)]
                y = block.forward_ragged(x.clone(), cos[0], sin[0], cache.k[0], cache.v[0], torch.zeros(20, dtype=torch.long),
                                         pos, groups)
            else:
                y = block(x.clone(), cos, sin, None, cache.k[0], cache.v[0], slice(0, 1), torch.tensor([0]), pos[None], 20)
        return y, cache.k[0][0, :, :20]

    for ragged in (False, True):
        calls.clear()
        fused, k_fused = run(True, ragged)
        assert calls == ["silu_mul"], calls
        plain, k_plain = run(False, ragged)
        assert "rms_norm" in calls and "silu" in calls  # the PyTorch form, for comparison
        assert torch.allclose(fused, plain, rtol=1e-3, atol=1e-3 * float(plain.abs().max()))
        assert torch.allclose(k_fused, k_plain, rtol=1e-4, atol=1e-4)
        assert not torch.equal(fused, x)  # (the block did something)


def test_a_replaced_cache_layer_is_written_not_the_old_one(fused_model):
    cache, reference = _prefilled_caches(fused_model, 2)
    _decode(fused_model, cache, steps=1)   # the plan has taken this cache's pointers
    _decode(fused_model, reference, steps=1)
    old = cache.k[1]
    before = old.clone()
    cache.k[1] = torch.zeros_like(old)     # the same list, a new tensor in it
    _decode(fused_model, cache, steps=1)   # writes the same positions again
    assert torch.equal(old, before)        # the replaced tensor is left alone
    for slot, p in ((0, 5), (2, 9), (3, 2)):  # the new one holds exactly this step's keys
        assert torch.equal(cache.k[1][slot, :, p], reference.k[1][slot, :, p])
    assert int((cache.k[1].abs().sum(-1) > 0).sum()) == 3 * fused_model.config.n_kv_heads


def test_moving_the_model_drops_its_plan(tiny_qwen2_dir):
    model = load_model(tiny_qwen2_dir, quantization="int4", group_size=32).model
    plan = model.decode_blocks(1)
    assert plan is not None and model.decode_blocks(1) is plan
    model.to(torch.float32)                # nn.Module._apply: weights may get new memory
    assert model._decode_blocks is None and model.decode_blocks(1) is not plan
    # the plan's tensors are its own aliases: replacing a parameter's memory does not free what it points into
    norm = model.layers[0].attn_norm.weight
    alias = model.decode_blocks(1).blocks[0].attn_norm
    assert alias.data_ptr() == norm.data_ptr() and alias is not norm


def test_shapes_the_kernels_refuse_are_refused_when_the_plan_is_built(fused_model):
    w = fused_model.layers[-1].dq_weights()
    with pytest.raises(ValueError, match="layer 1 qkv"):  # int4: no group of 48; int8: no block of 48
        _plan(fused_model, qkv=replace(w.qkv, block=48))
