"""loader.py: HF directories, GGUF files (a tiny one written here with gguf.GGUFWriter), refusals
of pickle weights and remote code, generation defaults; device.py's thread count."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from model_runtime.device import cgroup_cpu_limit, pick_device, pick_dtype
from model_runtime.loader import ModelLoadError, load_model

PROMPT = [151646, 151644, 9707, 1879, 151645]


def first_logits(model) -> torch.Tensor:
    with torch.inference_mode():
        ids = torch.tensor([PROMPT])
        return model(ids, torch.arange(len(PROMPT))[None], model.new_cache(1, 16), slice(0, 1))[0]


def copy_without_weights(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    return dst


def test_hf_dir_loads_tokenizer_template_and_generation_config(tiny_qwen2_dir):
    loaded = load_model(tiny_qwen2_dir)
    assert loaded.quantization == "none" and loaded.dtype == torch.bfloat16 and loaded.device.type == "cpu"
    assert loaded.eos_token_ids == [151643]
    assert loaded.generation_defaults == {"temperature": 0.6, "top_p": 0.95}
    assert loaded.max_model_len == 512 and loaded.config.tie_word_embeddings
    assert loaded.model.lm_head.weight is loaded.model.embed.weight
    text = loaded.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                add_generation_prompt=True)
    assert text.startswith("<｜begin▁of▁sentence｜><｜User｜>hi<｜Assistant｜>")
    assert load_model(tiny_qwen2_dir, max_model_len=128).max_model_len == 128
    with pytest.raises(ModelLoadError, match="exceeds"):
        load_model(tiny_qwen2_dir, max_model_len=100000)


def test_sharded_safetensors_with_index(tiny_qwen2_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    d = copy_without_weights(tiny_qwen2_dir, tmp_path / "sharded")
    state = load_file(str(tiny_qwen2_dir / "model.safetensors"))
    names = sorted(state)
    half = len(names) // 2
    weight_map = {}
    for i, chunk in enumerate((names[:half], names[half:])):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: state[k] for k in chunk}, str(d / fname))
        weight_map.update({k: fname for k in chunk})
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    a, b = load_model(d, dtype="float32").model, load_model(tiny_qwen2_dir, dtype="float32").model
    assert torch.equal(first_logits(a), first_logits(b))


def test_pickle_weights_are_refused_unless_allowed(tiny_qwen2_dir, tmp_path):
    from safetensors.torch import load_file

    d = copy_without_weights(tiny_qwen2_dir, tmp_path / "pickled")
    torch.save(load_file(str(tiny_qwen2_dir / "model.safetensors")), d / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=r"pickle.*--allow_pickle"):
        load_model(d)
    loaded = load_model(d, allow_pickle=True, dtype="float32")
    assert torch.equal(first_logits(loaded.model), first_logits(load_model(tiny_qwen2_dir, dtype="float32").model))


def test_remote_code_is_refused_unless_trusted(tiny_qwen2_dir, tmp_path):
    d = shutil.copytree(tiny_qwen2_dir, tmp_path / "custom")
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="--trust_remote_code"):
        load_model(d)
    assert load_model(d, trust_remote_code=True).config.arch == "qwen2"  # built-in code, never theirs


def test_bad_inputs_get_clear_errors(tiny_qwen2_dir, tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nope")
    d = shutil.copytree(tiny_qwen2_dir, tmp_path / "gpt")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="unsupported model_type"):
        load_model(d)
    with pytest.raises(ModelLoadError, match="unknown quantization"):
        load_model(tiny_qwen2_dir, quantization="int3")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(empty)


def test_storage_initializer_subfolder_is_found(tiny_qwen2_dir, tmp_path):
    shutil.copytree(tiny_qwen2_dir, tmp_path / "mnt" / "model")
    assert load_model(tmp_path / "mnt").config.n_layers == 2


def test_gguf_file_loads_weights_tokenizer_and_template(tiny_qwen2_gguf, tiny_qwen2_dir):
    g = load_model(tiny_qwen2_gguf, dtype="float32")
    ref = load_model(tiny_qwen2_dir, dtype="float32")
    assert g.source_format == "gguf" and g.config.n_kv_heads == 2 and g.config.qkv_bias
    # Q8_0 weights: close to the float model, not equal
    a, b = first_logits(g.model), first_logits(ref.model)
    assert F.cosine_similarity(a, b, dim=0) > 0.999 and not torch.equal(a, b)
    msgs = [{"role": "user", "content": "Hi there\n\n  x = 12345; 你好 <think>ok</think>"}]
    text = g.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == ref.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert g.tokenizer(text)["input_ids"] == ref.tokenizer(text)["input_ids"]
    assert g.tokenizer.decode(g.tokenizer(text)["input_ids"]) == text
    assert g.eos_token_ids == [151643]
    # a directory holding one .gguf is found too, and quantizing at load works on GGUF sources
    q = load_model(tiny_qwen2_gguf.parent, quantization="int8", dtype="float32")
    assert F.cosine_similarity(first_logits(q.model), b, dim=0) > 0.99


def test_cgroup_cpu_limit(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_limit(tmp_path) == 2
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(tmp_path) is None
    assert cgroup_cpu_limit(tmp_path / "missing") is None


def test_device_and_dtype_choice():
    assert pick_device("cpu").type == "cpu"
    assert pick_dtype("auto", torch.device("cpu")) == torch.bfloat16
    assert pick_dtype("float32") == torch.float32
    if not torch.cuda.is_available():
        assert pick_device("auto").type == "cpu"
        with pytest.raises(ValueError, match="CUDA"):
            pick_device("cuda")
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load_model("/nonexistent", dtype="int7")
