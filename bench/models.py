"""Benchmark models, built once and cached under models/ (git-ignored).

- The real Qwen2.5-0.5B GGUF (scripts/fetch_model.py) dequantized once by transformers and saved as a
  bf16 safetensors checkpoint, so transformers (generate and serve) and our runtime read the same
  weights that llama.cpp reads from the GGUF.
- A random-weight model with the exact DeepSeek-R1-Distill-Qwen-1.5B shape (speed does not depend on
  the values), with the real R1 tokenizer from third_party/reference.
- A Q8_0 GGUF made from the shipped Q4_K_M with llama.cpp's own quantize API. llama.cpp can only
  requantize what it has, so the Q8_0 codes carry Q4_K_M's error: a fair *speed* peer, not a
  quality one.
Each builder writes to a temporary sibling and renames it, so an interrupted build is never reused.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

R1_SHAPE: dict[str, Any] = {
    # DeepSeek-R1-Distill-Qwen-1.5B's config.json, minus the weights
    "hidden_size": 1536,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "intermediate_size": 8960,
    "vocab_size": 151936,
    "max_position_embeddings": 131072,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "bos_token_id": 151646,
    "eos_token_id": 151643,
    "use_sliding_window": False,
    "sliding_window": None,
    "max_window_layers": 21,
}
R1_GENERATION_CONFIG = {"bos_token_id": 151646, "eos_token_id": 151643, "do_sample": True,
                        "temperature": 0.6, "top_p": 0.95}


def _ready(dest: Path) -> bool:
    return (dest / ".complete").exists()


def _tmp(dest: Path) -> Path:
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _finish(tmp: Path, dest: Path, info: dict[str, Any]) -> None:
    (tmp / ".complete").write_text(json.dumps(info))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def dequantize_gguf_to_safetensors(gguf: Path, dest: Path) -> dict[str, Any]:
    """GGUF -> bf16 safetensors dir (config, weights, tokenizer with chat template, generation config)."""
    if _ready(dest):
        return {"cached": True, **json.loads((dest / ".complete").read_text())}
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    t0 = time.perf_counter()
    tmp = _tmp(dest)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # dequantize=True: plain bf16 tensors (transformers 5.x would otherwise keep GGUF blocks packed,
    # which neither save_pretrained nor the other engines can use)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16,
        quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True))
    for name, param in model.named_parameters():  # plain dense tensors only, or saving is wrong
        if type(param.data) is not torch.Tensor or not param.dtype.is_floating_point:
            raise RuntimeError(f"{name} was not dequantized ({type(param.data).__name__}, {param.dtype})")
    # the GGUF quantizer refuses to save even dequantized weights; they are plain bf16 now
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.config.dtype = "bfloat16"
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    info = {"source": str(gguf), "dtype": "bfloat16", "seconds": round(time.perf_counter() - t0, 1),
            "params": sum(p.numel() for p in model.parameters())}
    _finish(tmp, dest, info)
    return {"cached": False, **info}


def make_r1_shaped_model(dest: Path, tokenizer_dir: Path, layers: int | None = None) -> dict[str, Any]:
    """Random bf16 Qwen2ForCausalLM with the R1-Distill-Qwen-1.5B shape, plus the R1 tokenizer files."""
    if _ready(dest):
        return {"cached": True, **json.loads((dest / ".complete").read_text())}
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    t0 = time.perf_counter()
    tmp = _tmp(dest)
    shape = dict(R1_SHAPE)
    if layers:  # only for fast development runs
        shape["num_hidden_layers"] = layers
        shape["max_window_layers"] = layers
    config = Qwen2Config(**shape, dtype="bfloat16")
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(torch.float32)
    model.eval()
    model.save_pretrained(tmp, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, tmp / name)
    (tmp / "generation_config.json").write_text(json.dumps(R1_GENERATION_CONFIG, indent=2))
    info = {"shape": shape, "dtype": "bfloat16", "seconds": round(time.perf_counter() - t0, 1),
            "params": sum(p.numel() for p in model.parameters())}
    _finish(tmp, dest, info)
    return {"cached": False, **info}


def quantize_gguf_q8_0(src: Path, dest: Path, threads: int = 2) -> dict[str, Any]:
    """Requantize a GGUF to Q8_0 through llama_cpp.llama_model_quantize (cached)."""
    if dest.exists():
        return {"cached": True, "path": str(dest), "bytes": dest.stat().st_size}
    import llama_cpp

    if not hasattr(llama_cpp, "llama_model_quantize"):
        raise RuntimeError("this llama-cpp-python has no llama_model_quantize; Q8_0 peer skipped")
    t0 = time.perf_counter()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    params.nthread = threads
    params.allow_requantize = True  # the source is already quantized (Q4_K_M as shipped)
    tmp = dest.with_name(dest.name + ".partial")
    code = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
    if code != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama_model_quantize returned {code}")
    tmp.rename(dest)
    return {"cached": False, "path": str(dest), "bytes": dest.stat().st_size,
            "seconds": round(time.perf_counter() - t0, 1), "note": "requantized from Q4_K_M"}


def first_layers_student(teacher_dir: Path, dest: Path, layers: int) -> dict[str, Any]:
    """A distillation student: the teacher's embeddings, first `layers` decoder layers, final norm and head
    (a common KD initialisation: same tokenizer, same width, a fraction of the depth), in the teacher's dtype,
    with its tokenizer, chat template and generation config."""
    if _ready(dest):
        return {"cached": True, **json.loads((dest / ".complete").read_text())}
    from transformers import AutoConfig, AutoModelForCausalLM

    t0 = time.perf_counter()
    tmp = _tmp(dest)
    config = AutoConfig.from_pretrained(str(teacher_dir))
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:layers]
    if getattr(config, "max_window_layers", None):
        config.max_window_layers = min(config.max_window_layers, layers)
    # the checkpoint's layers beyond `layers` have no place in this config: transformers skips them
    model = AutoModelForCausalLM.from_pretrained(str(teacher_dir), config=config, dtype=config.dtype)
    model.save_pretrained(tmp)
    for f in teacher_dir.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name not in ("config.json", ".complete",
                                                                                  "model.safetensors.index.json"):
            shutil.copy(f, tmp / f.name)
    info = {"teacher": str(teacher_dir), "layers": layers, "seconds": round(time.perf_counter() - t0, 1),
            "params": sum(p.numel() for p in model.parameters())}
    _finish(tmp, dest, info)
    return {"cached": False, **info}
