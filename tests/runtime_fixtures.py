"""Builders of tiny models for the runtime tests (both conftests import this plain module).

Nothing here downloads: weights are random (seeded), the tokenizer is the real R1-Distill one
carried in third_party/reference/ (vocab 152064, so the tiny model's vocab matches it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

TINY_VOCAB = 152064
R1_GENERATION_CONFIG = {"bos_token_id": 151646, "eos_token_id": 151643, "do_sample": True,
                        "temperature": 0.6, "top_p": 0.95}


def tiny_qwen2_config(**overrides) -> dict:
    """A transformers Qwen2 config.json dict: 2 layers, hidden 64, GQA 4/2, the R1 vocab."""
    cfg = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": TINY_VOCAB, "max_position_embeddings": 512,
        "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
        "hidden_act": "silu", "bos_token_id": 151646, "eos_token_id": 151643,
        # a wide init keeps the random model's next-token choice clear of near-ties
        "initializer_range": 0.1, "torch_dtype": "float32",
    }
    cfg.update(overrides)
    return cfg


def build_tiny_qwen2_dir(path: Path, tokenizer_dir: Path, *, seed: int = 0, **overrides) -> Path:
    """Write config.json, model.safetensors (transformers' Qwen2ForCausalLM, random), tokenizer
    files, chat template and generation_config.json into `path`."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = tiny_qwen2_config(**overrides)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**cfg)).eval()
    with torch.no_grad():  # q/k/v biases start at zero: make them count
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.1)
    model.save_pretrained(path, safe_serialization=True)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))  # our exact dict, not 5.x's rewrite
    (path / "generation_config.json").write_text(json.dumps(R1_GENERATION_CONFIG, indent=2))
    for f in Path(tokenizer_dir).iterdir():
        if f.is_file():
            shutil.copy(f, path / f.name)
    return path


def build_tiny_gguf(path: Path, hf_dir: Path, *, quant: str = "F32", with_tokenizer: bool = True) -> Path:
    """Write the tiny HF model in `hf_dir` as a GGUF file (llama.cpp's qwen2 naming), optionally
    quantizing the 2-D weights (Q8_0 / F16) and embedding the R1 tokenizer + chat template."""
    import gguf
    from safetensors.torch import load_file

    hf_dir = Path(hf_dir)
    cfg = json.loads((hf_dir / "config.json").read_text())
    sd = load_file(str(next(hf_dir.glob("*.safetensors"))))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_name("tiny-qwen2")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if quant == "F32" else gguf.LlamaFileType.MOSTLY_Q8_0)
    if with_tokenizer:
        _add_tokenizer(w, hf_dir)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
                 "post_attention_layernorm": "ffn_norm"}
    for name, t in sd.items():
        if name in names:
            out = names[name]
        else:
            _, _, i, rest = name.split(".", 3)
            mod, kind = rest.rsplit(".", 1)
            out = f"blk.{i}.{per_layer[mod]}.{kind}"
        a = t.float().numpy()
        if a.ndim == 2 and quant != "F32":
            qtype = gguf.GGMLQuantizationType[quant]
            w.add_tensor(out, gguf.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(out, a.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def _add_tokenizer(w, hf_dir: Path) -> None:
    """The R1 tokenizer as GGUF metadata (gpt2-style BPE: tokens, types, merges, special ids)."""
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    vocab = dict(tok["model"]["vocab"])
    special = {a["content"]: a["id"] for a in tok.get("added_tokens", [])}
    size = max(max(vocab.values()), max(special.values(), default=0)) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [5] * size  # UNUSED
    for t, i in vocab.items():
        tokens[i], types[i] = t, 1  # NORMAL
    for a in tok.get("added_tokens", []):
        tokens[a["id"]], types[a["id"]] = a["content"], 3 if a.get("special") else 4  # CONTROL / USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("deepseek-r1-qwen")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(151646)
    w.add_eos_token_id(151643)
    w.add_add_bos_token(False)  # the R1 chat template writes the bos itself
    template = hf_dir / "chat_template.jinja"
    if template.exists():
        w.add_chat_template(template.read_text())
