"""model.py against transformers' reference implementations (tiny random models, float32)."""

from __future__ import annotations

import pytest
import torch

from model_runtime.loader import load_model
from tests.cpu_kernels import needs_cpu_kernels

PROMPT = [151646, 100, 2000, 30000, 4, 151644, 77, 151645, 9]


@pytest.fixture(scope="module")
def hf_qwen2(tiny_qwen2_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_qwen2_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def ours(tiny_qwen2_dir):
    return load_model(tiny_qwen2_dir, dtype="float32", device="cpu").model


def test_logits_match_transformers_qwen2(hf_qwen2, ours):
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        ref = hf_qwen2(ids).logits
        got = ours(ids, torch.arange(len(PROMPT))[None], ours.new_cache(2, 32), slice(1, 2), logits="all")
    assert got.shape == ref.shape == (1, len(PROMPT), 152064)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_chunked_prefill_then_decode_matches_full_forward(hf_qwen2, ours):
    """KV-cache reuse: prefill in two chunks, then one token at a time, equals the full-sequence logits."""
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        ref = hf_qwen2(ids).logits[0]
        cache = ours.new_cache(3, 32)
        slot = torch.tensor([2])
        assert ours(ids[:, :3], torch.arange(3)[None], cache, slot, logits="none") is None
        part = ours(ids[:, 3:6], torch.arange(3, 6)[None], cache, slot, logits="all")[0]
        torch.testing.assert_close(part, ref[3:6], atol=1e-4, rtol=1e-4)
        for p in range(6, len(PROMPT)):
            step = ours(ids[:, p:p + 1], torch.tensor([[p]]), cache, slot, logits="last")[0]
            torch.testing.assert_close(step, ref[p], atol=1e-4, rtol=1e-4)


def test_batched_decode_rows_at_different_positions(hf_qwen2, ours):
    """One decode forward for sequences of different lengths in non-contiguous slots."""
    seqs = [PROMPT[:4], PROMPT[:7], PROMPT[2:4]]
    slots = [3, 0, 2]
    cache = ours.new_cache(4, 32)
    with torch.no_grad():
        for s, slot in zip(seqs, slots, strict=True):  # prefill all but each sequence's last token
            ours(torch.tensor([s[:-1]]), torch.arange(len(s) - 1)[None], cache, torch.tensor([slot]), logits="none")
        ids = torch.tensor([[s[-1]] for s in seqs])
        pos = torch.tensor([[len(s) - 1] for s in seqs])
        got = ours(ids, pos, cache, torch.tensor(slots), logits="last")
        for row, s in enumerate(seqs):
            ref = hf_qwen2(torch.tensor([s])).logits[0, -1]
            torch.testing.assert_close(got[row], ref, atol=1e-4, rtol=1e-4)


def test_llama_with_llama3_rope_scaling_matches_transformers(tmp_path):
    """R1-Distill-Llama's architecture: no q/k/v bias, untied head, llama3 RoPE scaling."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, rope_theta=500000.0,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                      tie_word_embeddings=False, initializer_range=0.1)
    torch.manual_seed(1)
    hf = LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")  # not used by this test
    import json

    from model_runtime.build import build_model
    from model_runtime.config import ModelConfig
    from model_runtime.plan import Machine, make_plan
    from model_runtime.safetensors_reader import hf_names, hf_source
    mc = ModelConfig.from_hf(json.loads((tmp_path / "config.json").read_text()))
    assert mc.arch == "llama" and not mc.qkv_bias and mc.rope_scaling["rope_type"] == "llama3"
    plan = make_plan(mc, Machine("cpu"), dtype=torch.float32)
    model = build_model(mc, hf_source(tmp_path, hf_names(mc), False), plan, max_len=256)
    ids = torch.randint(0, 512, (1, 200))
    with torch.no_grad():
        ref = hf(ids).logits
        got = model(ids, torch.arange(200)[None], model.new_cache(1, 256), slice(0, 1), logits="all")
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4)


def test_prefill_from_position_0_runs_causal_sdpa_and_matches_the_masked_path(hf_qwen2, ours, monkeypatch):
    """A prompt's start (positions 0..T-1, B rows) gives SDPA no mask but is_causal (its CPU flash kernel then
    skips the blocks above the diagonal); a later chunk gives the explicit mask. Both equal transformers, and
    the causal form's logits equal the masked form's on the same tokens."""
    import torch.nn.functional as F

    calls: list[tuple[bool, bool]] = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append((kwargs.get("attn_mask") is None, bool(kwargs.get("is_causal"))))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 152064, (2, 150), generator=gen)
    with torch.no_grad():
        ref = hf_qwen2(ids).logits
        cache = ours.new_cache(2, 256)
        whole = ours(ids, torch.arange(150)[None].expand(2, -1), cache, slice(0, 2), logits="all")
        assert calls and all(c == (True, True) for c in calls)
        torch.testing.assert_close(whole, ref, atol=1e-4, rtol=1e-4)
        calls.clear()
        # the same tokens with an earlier chunk in the slot: the explicit mask, same logits
        ours(ids[:1, :40], torch.arange(40)[None], cache, slice(1, 2), logits="none")
        calls.clear()
        rest = ours(ids[:1, 40:], torch.arange(40, 150)[None], cache, slice(1, 2), logits="all")
        assert calls and all(c == (False, False) for c in calls)
    torch.testing.assert_close(rest[0], whole[0, 40:], atol=1e-5, rtol=1e-5)


def test_ragged_forward_equals_separate_decode_and_prefill_forwards(ours):
    """Decode rows and prompt chunks (one from position 0, one continuing a slot) in one forward_ragged give the
    logits and the cache contents of a decode forward plus one forward per chunk."""
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 152064, (n,), generator=gen).tolist() for n in (6, 9, 40, 70)]
    caches = [ours.new_cache(4, 128), ours.new_cache(4, 128)]
    with torch.no_grad():
        for cache in caches:  # slots 0, 1: decoding, all but their last token cached; slot 3: 30 tokens cached
            for slot, p in ((0, prompts[0]), (1, prompts[1])):
                ours(torch.tensor([p[:-1]]), torch.arange(len(p) - 1)[None], cache, slice(slot, slot + 1), logits="none")
            ours(torch.tensor([prompts[3][:30]]), torch.arange(30)[None], cache, slice(3, 4), logits="none")
        a, b = caches
        dec = ours(torch.tensor([[prompts[0][-1]], [prompts[1][-1]]]), torch.tensor([[5], [8]]), a,
                   torch.tensor([0, 1]), logits="last")
        fresh = ours(torch.tensor([prompts[2][:25]]), torch.arange(25)[None], a, slice(2, 3), logits="last")
        more = ours(torch.tensor([prompts[3][30:50]]), torch.arange(30, 50)[None], a, slice(3, 4), logits="last")
        ids = torch.tensor([prompts[0][-1], prompts[1][-1], *prompts[2][:25], *prompts[3][30:50]])
        pos = torch.tensor([5, 8, *range(25), *range(30, 50)])
        got = ours.forward_ragged(ids, pos, b, [(0, 1), (1, 1), (2, 25), (3, 20)], logit_rows=[0, 1, 26, 46])
    torch.testing.assert_close(got, torch.cat([dec, fresh, more]), atol=1e-4, rtol=1e-4)
    for ka, kb in zip(a.k + a.v, b.k + b.v, strict=True):
        torch.testing.assert_close(ka, kb, atol=1e-5, rtol=1e-5)


@needs_cpu_kernels
@pytest.mark.parametrize(("work", "fused_rows"), [(None, 2 + 12 + 7), (0, 2)])
def test_ragged_rows_take_the_fused_attention_of_a_decode_step(tiny_qwen2_dir, monkeypatch, work, fused_rows):
    """On the CPU integer kernels (int8, fused decode), every row of a ragged forward, the decode rows, a chunk
    continuing its slot and a chunk starting one alike, attends through ckernels.attn_decode in one call a layer
    (RoPE, cache write, each row over its own slot up to its own position: a chunk's rows see its earlier rows);
    chunks bigger than FUSED_CHUNK_WORK (here every one: work 0) take SDPA and only the decode rows the C kernel.
    Either way the logits and cache equal a fused decode step plus a forward (PyTorch's causal SDPA) per chunk."""
    from model_runtime import ckernels
    from model_runtime import model as model_module

    if work is not None:
        monkeypatch.setattr(model_module, "FUSED_CHUNK_WORK", work)
    loaded = load_model(tiny_qwen2_dir, quantization="int8", device="cpu")
    model = loaded.model
    assert model.fused_decode
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 152064, (n,), generator=gen).tolist() for n in (6, 9, 40, 7)]
    caches = [model.new_cache(4, 128), model.new_cache(4, 128)]
    with torch.no_grad():
        for cache in caches:
            for slot, p in ((0, prompts[0]), (1, prompts[1])):
                model(torch.tensor([p[:-1]]), torch.arange(len(p) - 1)[None], cache, slice(slot, slot + 1),
                      logits="none")
            model(torch.tensor([prompts[2][:10]]), torch.arange(10)[None], cache, slice(2, 3), logits="none")
            cache.k[0][3].fill_(3.0)  # slot 3 starts its prompt over stale keys: none may be attended
        a, b = caches
        dec = model(torch.tensor([[prompts[0][-1]], [prompts[1][-1]]]), torch.tensor([[5], [8]]), a,
                    torch.tensor([0, 1]), logits="last")
        more = model(torch.tensor([prompts[2][10:22]]), torch.arange(10, 22)[None], a, slice(2, 3), logits="last")
        fresh = model(torch.tensor([prompts[3]]), torch.arange(7)[None], a, slice(3, 4), logits="last")
        calls: list[int] = []
        real = ckernels.attn_decode
        monkeypatch.setattr(ckernels, "attn_decode", lambda qkv, *args, **kw: calls.append(qkv.shape[0]) or
                            real(qkv, *args, **kw))
        ids = torch.tensor([prompts[0][-1], prompts[1][-1], *prompts[2][10:22], *prompts[3]])
        pos = torch.tensor([5, 8, *range(10, 22), *range(7)])
        got = model.forward_ragged(ids, pos, b, [(0, 1), (1, 1), (2, 12), (3, 7)], logit_rows=[0, 1, 13, 20])
    assert calls == [fused_rows] * model.config.n_layers  # one call a layer
    torch.testing.assert_close(got, torch.cat([dec, more, fresh]), atol=2e-3, rtol=2e-3)
    for ka, kb in zip(a.k + a.v, b.k + b.v, strict=True):
        torch.testing.assert_close(ka[:, :, :22], kb[:, :, :22], atol=1e-4, rtol=1e-4)
