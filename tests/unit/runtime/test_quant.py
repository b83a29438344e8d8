"""Weight-only int8/int4: kernels vs their dequantized reference, quantized vs float outputs,
and the quantize -> save -> load artifact round trip (bit-exact, no re-quantization)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from model_runtime import quant
from model_runtime.kernels import (
    Int4Linear,
    Int8Linear,
    dequantize_int4,
    pack_nibbles,
    quantize_int4,
    quantize_int8,
    unpack_nibbles,
)
from model_runtime.loader import ModelLoadError, load_model
from model_runtime.quantize_cli import main as quantize_main

PROMPT = [151646, 151644, 9707, 1879, 11, 1246, 525, 498, 30, 151645]


def greedy(model, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and the first step's logits, through the KV cache."""
    cache = model.new_cache(1, len(prompt) + n + 1)
    with torch.inference_mode():
        logits = model(torch.tensor([prompt]), torch.arange(len(prompt))[None], cache, slice(0, 1))
        first = logits[0].clone()
        out = []
        for i in range(n):
            tok = int(logits[0].argmax())
            out.append(tok)
            pos = len(prompt) + i
            logits = model(torch.tensor([[tok]]), torch.tensor([[pos]]), cache, slice(0, 1))
    return out, first


@pytest.fixture(scope="module")
def float_model(tiny_qwen2_dir):
    return load_model(tiny_qwen2_dir, dtype="float32").model


def test_int8_kernel_matches_dequantized_reference():
    torch.manual_seed(0)
    w, b, x = torch.randn(96, 64), torch.randn(96), torch.randn(5, 64)
    codes, scales = quantize_int8(w)
    assert codes.dtype == torch.int8 and scales.shape == (96,)
    lin = Int8Linear(codes, scales, b, torch.bfloat16)
    ref = x.bfloat16().float() @ (codes.float() * scales.float()[:, None]).t() + b
    torch.testing.assert_close(lin(x.bfloat16()).float(), ref, atol=0.15, rtol=0.02)
    assert (codes.float() * scales.float()[:, None] - w).abs().max() <= scales.float().max() * 0.51


@pytest.mark.parametrize("group_size", [32, 64])
def test_int4_kernel_matches_dequantized_reference(group_size):
    torch.manual_seed(0)
    w, x = torch.randn(128, 256), torch.randn(3, 256)
    codes, scales, zeros = quantize_int4(w, group_size)
    assert codes.max() <= 15 and scales.shape == (128, 256 // group_size)
    assert torch.equal(unpack_nibbles(pack_nibbles(codes)), codes)
    lin = Int4Linear(pack_nibbles(codes), scales, zeros, None, torch.bfloat16)
    ref = x.bfloat16().float() @ dequantize_int4(codes, scales, zeros).t()
    torch.testing.assert_close(lin(x.bfloat16()).float(), ref, atol=0.2, rtol=0.02)
    # quantization error bounded by half a step (+ bf16 rounding of scale/zero)
    err = (dequantize_int4(codes, scales, zeros) - w).abs().view(128, -1, group_size).amax(-1)
    assert (err <= scales.float() * 0.5 + 0.02).all()


def test_int4_group_size_falls_back_when_k_is_small():
    codes, scales, _ = quantize_int4(torch.randn(8, 64), 128)
    assert scales.shape == (8, 1)  # group 64 (largest supported size dividing K=64)


def test_int8_greedy_tokens_match_float(tiny_qwen2_dir, float_model):
    int8 = load_model(tiny_qwen2_dir, quantization="int8", dtype="float32").model
    assert isinstance(int8.layers[0].attn.qkv, Int8Linear) and isinstance(int8.lm_head, Int8Linear)  # auto head
    ref, _ = greedy(float_model, PROMPT, 12)
    got, _ = greedy(int8, PROMPT, 12)
    assert got[:8] == ref[:8]


def test_int4_logits_stay_close_to_float(tiny_qwen2_dir, float_model):
    """Random Gaussian weights are 4-bit's worst case (~9% rms error per weight at g64), so the bound
    is loose; a wrong packing/scale layout would give cosine ~0. Smaller groups must be closer."""
    _, ref = greedy(float_model, PROMPT, 1)
    errors = {}
    for group_size in (32, 64):
        int4 = load_model(tiny_qwen2_dir, quantization="int4", group_size=group_size, dtype="float32").model
        assert isinstance(int4.layers[1].mlp.down, Int4Linear) and int4.layers[1].mlp.down.group_size == group_size
        _, got = greedy(int4, PROMPT, 1)
        assert F.cosine_similarity(got, ref, dim=0) > 0.95
        errors[group_size] = float((got - ref).norm() / ref.norm())
        assert errors[group_size] < 0.3
    assert errors[32] < errors[64]


@pytest.mark.parametrize(("method", "extra"), [("int8", ["--quantize-lm-head"]), ("int4", ["--group-size", "32"])])
def test_quantize_save_load_round_trips_bit_exactly(tiny_qwen2_dir, tmp_path, method, extra, capsys):
    dst = tmp_path / f"tiny-{method}"
    assert quantize_main([str(tiny_qwen2_dir), str(dst), "--method", method, *extra]) == 0
    assert "quantizing" in capsys.readouterr().err  # the progress bar
    manifest = json.loads((dst / quant.MANIFEST).read_text())
    assert manifest["method"] == method and manifest["source_checksum"].startswith("sha256:")
    assert manifest["tool_version"] and manifest["config"]["vocab_size"] == 152064
    assert manifest["group_size"] == (32 if method == "int4" else None)
    assert manifest["lm_head"] == "int8"  # int8: --quantize-lm-head; int4: the auto default (int8 head)

    # the in-memory model the CLI saved, rebuilt the same way
    fresh = load_model(tiny_qwen2_dir, quantization=method, group_size=32, dtype="bfloat16",
                       quantize_lm_head=True if method == "int8" else None, keep_codes=True)
    loaded = load_model(dst)  # detects the manifest; no --quantization needed
    assert loaded.quantization == method and loaded.source_format == "quantized"
    assert loaded.tokenizer.chat_template and loaded.eos_token_ids == [151643]
    assert loaded.generation_defaults == {"temperature": 0.6, "top_p": 0.95}

    saved = quant.artifact_state(fresh.model)
    from safetensors.torch import load_file

    on_disk = load_file(str(dst / "model.safetensors"))
    assert saved.keys() == on_disk.keys()
    for k in saved:
        assert saved[k].dtype == on_disk[k].dtype and torch.equal(saved[k], on_disk[k]), k
    layer = loaded.model.layers[0].mlp.gate_up
    assert isinstance(layer, Int8Linear if method == "int8" else Int4Linear)
    ref = fresh.model.layers[0].mlp.gate_up
    for name in ("scales",) + (("codes",) if method == "int8" else ("zeros",)):
        assert torch.equal(getattr(layer, name), getattr(ref, name))
    out_fresh, logits_fresh = greedy(fresh.model, PROMPT, 6)
    out_loaded, logits_loaded = greedy(loaded.model, PROMPT, 6)
    assert out_fresh == out_loaded and torch.equal(logits_fresh, logits_loaded)


def test_artifact_refuses_a_different_quantization(tiny_qwen2_dir, tmp_path):
    dst = tmp_path / "int8"
    assert quantize_main([str(tiny_qwen2_dir), str(dst), "--method", "int8", "--no-progress"]) == 0
    with pytest.raises(ModelLoadError, match="holds int8 weights"):
        load_model(dst, quantization="int4")
    with pytest.raises(ModelLoadError, match="no quantization.json"):
        load_model(tiny_qwen2_dir, prequantized=True)
    assert quantize_main([str(tiny_qwen2_dir), str(dst), "--method", "int8"]) == 2  # DST not empty


def test_quantizers_give_the_same_result_whatever_the_row_chunking(monkeypatch):
    from model_runtime import kernels

    w = torch.randn(300, 128)
    whole8, whole4 = quantize_int8(w), quantize_int4(w, 32)
    monkeypatch.setattr(kernels, "CHUNK_ELEMENTS", 7 * 128)  # 16-row chunks (the minimum): 19 uneven ones
    for a, b in zip(quantize_int8(w), whole8, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(quantize_int4(w, 32), whole4, strict=True):
        assert torch.equal(a, b)


def test_lazy_rows_read_the_same_rows_as_the_whole_tensor(tiny_qwen2_dir):
    from model_runtime.safetensors_reader import SafetensorsFile

    f = SafetensorsFile(tiny_qwen2_dir / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    whole, lazy = f.tensor(name), f.lazy_rows(name)
    assert lazy is not None and lazy.shape == whole.shape
    assert torch.equal(lazy[5:17], whole[5:17]) and torch.equal(lazy[0:whole.shape[0]], whole)
    assert f.lazy_rows("model.norm.weight") is None  # 1-D: read whole


def test_tied_int8_model_shares_one_int8_copy_between_embedding_and_head(tiny_qwen2_dir, tmp_path):
    from model_runtime.kernels import Int8Embedding

    float_model = load_model(tiny_qwen2_dir, dtype="float32").model
    loaded = load_model(tiny_qwen2_dir, quantization="int8")  # auto: int8 head, tied -> shared
    model = loaded.model
    assert isinstance(model.embed, Int8Embedding) and isinstance(model.lm_head, Int8Linear)
    assert model.embed.codes is model.lm_head.codes and model.embed.scales is model.lm_head.scales
    ids = torch.tensor([[5, 151646, 42]])
    # per-row int8: every looked-up row within half a quantization step of the float row
    err = (model.embed(ids).float() - float_model.embed(ids)).abs().amax(-1)
    assert bool((err <= model.embed.scales[ids].float() * 0.51 + 1e-6).all())
    # the artifact stores the shared codes once, and reloads the sharing
    dst = tmp_path / "int8"
    assert quantize_main([str(tiny_qwen2_dir), str(dst), "--method", "int8"]) == 0
    from safetensors.torch import load_file

    keys = set(load_file(str(dst / "model.safetensors")))
    assert "lm_head.codes" in keys and not {"embed.codes", "embed.weight"} & keys
    again = load_model(dst).model
    assert isinstance(again.embed, Int8Embedding) and again.embed.codes is again.lm_head.codes
    assert torch.equal(again.embed(ids), model.embed(ids))


@pytest.mark.parametrize(("method", "embedding"), [("int4", "int4"), ("int8", "int8")])
def test_untied_model_gets_its_own_quantized_embedding_and_round_trips(tmp_path, r1_tokenizer_dir, method,
                                                                        embedding):
    from model_runtime.kernels import Int4Embedding, Int8Embedding
    from tests.runtime_fixtures import build_tiny_qwen2_dir

    src = build_tiny_qwen2_dir(tmp_path / "untied", r1_tokenizer_dir, tie_word_embeddings=False)
    float_model = load_model(src, dtype="float32").model
    model = load_model(src, quantization=method, group_size=32).model
    kind = Int4Embedding if embedding == "int4" else Int8Embedding
    assert isinstance(model.embed, kind) and isinstance(model.lm_head, Int8Linear)
    ids = torch.tensor([[5, 151646, 42, 7]])
    ref = float_model.embed(ids)
    assert F.cosine_similarity(model.embed(ids).float(), ref, dim=-1).min() > (0.98 if embedding == "int4" else 0.999)
    dst = tmp_path / method
    assert quantize_main([str(src), str(dst), "--method", method, "--group-size", "32"]) == 0
    again = load_model(dst).model
    assert isinstance(again.embed, kind)
    assert torch.equal(again.embed(ids), model.embed(ids))
    out_a, _ = greedy(model, PROMPT, 4)
    out_b, _ = greedy(again, PROMPT, 4)
    assert out_a == out_b


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_tied_model_with_a_float_head_keeps_the_float_embedding_it_shares(tiny_qwen2_dir, method):
    model = load_model(tiny_qwen2_dir, quantization=method, group_size=32, quantize_lm_head=False).model
    assert isinstance(model.embed, torch.nn.Embedding) and model.lm_head.weight is model.embed.weight
    out, _ = greedy(model, PROMPT, 2)
    assert len(out) == 2


def test_embedding_method_policy():
    from model_runtime.plan import embedding_method

    assert embedding_method("none", True, "none") == "float"
    assert embedding_method("int8", True, "int8") == "shared"   # 0.5B int8: one copy for head + embedding
    assert embedding_method("int4", True, "int8") == "shared"   # 0.5B int4 (auto int8 head)
    assert embedding_method("int4", False, "int8") == "int4"    # 1.5B int4: like llama.cpp's Q4_K_M
    assert embedding_method("int8", False, "int8") == "int8"
    assert embedding_method("int4", True, "int4") == "int4"     # head quantized int4 on request: no sharing
    assert embedding_method("int8", True, "none") == "float"    # a tied float head is the embedding
