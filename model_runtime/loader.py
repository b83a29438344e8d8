"""Load a model for serving: a Hugging Face directory, a GGUF file, or our quantized artifact.

- HF: config.json, *.safetensors (single or sharded with model.safetensors.index.json),
  tokenizer files, chat template, generation_config.json. Pickle weights (.bin/.pt/.pth) and
  custom code (auto_map) are refused unless explicitly allowed.
- GGUF (llama.cpp): tensors dequantized with the `gguf` package (Q4_K/Q5_0/Q6_K/Q8_0/F16/...),
  shape from its metadata, tokenizer + chat template from its metadata (or a tokenizer.json
  beside the file).
- Our artifact (quantization.json manifest, written by quantize_cli): codes/scales loaded as
  stored, no re-quantization.
Weights are read one tensor at a time and quantized as they arrive, so loading a quantized model
never holds the whole float model in memory.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from model_runtime import quant
from model_runtime.config import SUPPORTED_ARCHS, ModelConfig
from model_runtime.device import configure_threads, pick_device, pick_dtype
from model_runtime.model import RMSNorm, Transformer

log = logging.getLogger("model_runtime.loader")

MOUNT_DIR = Path("/mnt/models")
DEFAULT_MAX_MODEL_LEN = 32768  # the KV cache is reserved lazily, but bound the address space
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class ModelLoadError(Exception):
    """The model cannot be loaded; the message says what was wrong and how to fix it."""


@dataclass
class LoadedModel:
    model: nn.Module
    config: ModelConfig
    tokenizer: Any
    eos_token_ids: list[int]
    generation_defaults: dict = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.bfloat16
    quantization: str = "none"
    max_model_len: int = 4096
    source_format: str = "hf"   # "hf" | "gguf" | "quantized"
    group_size: int | None = None
    source_path: str = ""


# ---------------------------------------------------------------- name maps (ours <- theirs)
def _hf_names(cfg: ModelConfig) -> dict[str, list[str]]:
    m = {"embed.weight": ["model.embed_tokens.weight"], "norm.weight": ["model.norm.weight"],
         "lm_head.weight": ["lm_head.weight"]}
    for i in range(cfg.n_layers):
        p, o = f"model.layers.{i}.", f"layers.{i}."
        m[o + "attn_norm.weight"] = [p + "input_layernorm.weight"]
        m[o + "mlp_norm.weight"] = [p + "post_attention_layernorm.weight"]
        for kind in ("weight", "bias"):
            m[o + f"attn.qkv.{kind}"] = [p + f"self_attn.{x}_proj.{kind}" for x in "qkv"]
        m[o + "attn.o.weight"] = [p + "self_attn.o_proj.weight"]
        m[o + "mlp.gate_up.weight"] = [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]
        m[o + "mlp.down.weight"] = [p + "mlp.down_proj.weight"]
    return m


def _gguf_names(cfg: ModelConfig) -> dict[str, list[str]]:
    m = {"embed.weight": ["token_embd.weight"], "norm.weight": ["output_norm.weight"],
         "lm_head.weight": ["output.weight"]}
    for i in range(cfg.n_layers):
        p, o = f"blk.{i}.", f"layers.{i}."
        m[o + "attn_norm.weight"] = [p + "attn_norm.weight"]
        m[o + "mlp_norm.weight"] = [p + "ffn_norm.weight"]
        for kind in ("weight", "bias"):
            m[o + f"attn.qkv.{kind}"] = [p + f"attn_{x}.{kind}" for x in "qkv"]
        m[o + "attn.o.weight"] = [p + "attn_output.weight"]
        m[o + "mlp.gate_up.weight"] = [p + "ffn_gate.weight", p + "ffn_up.weight"]
        m[o + "mlp.down.weight"] = [p + "ffn_down.weight"]
    return m


class TensorSource:
    """name -> tensor on demand (ours), fusing q/k/v and gate/up as they are read."""

    def __init__(self, names: set[str], get: Callable[[str], Tensor], mapping: dict[str, list[str]]) -> None:
        self.available = names
        self._get = get
        self.mapping = mapping

    def has(self, ours: str) -> bool:
        srcs = self.mapping.get(ours, [ours])
        return all(s in self.available for s in srcs)

    def get(self, ours: str) -> Tensor:
        srcs = self.mapping.get(ours, [ours])
        parts = [self._get(s) for s in srcs]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


# ---------------------------------------------------------------- locating the model
def resolve_model_path(model_dir: str | Path) -> Path:
    p = Path(model_dir)
    if not p.exists() and not p.is_absolute() and (MOUNT_DIR / p).exists():
        p = MOUNT_DIR / p
    if not p.exists():
        raise ModelLoadError(f"model path {model_dir} does not exist (a directory with config.json and "
                             f"*.safetensors, a .gguf file, or a directory holding one)")
    if p.is_dir() and not _looks_like_model(p):
        subdirs = [d for d in p.iterdir() if d.is_dir() and _looks_like_model(d)]
        if len(subdirs) == 1:  # storage initializers sometimes unpack into a subfolder
            p = subdirs[0]
    return p


def _looks_like_model(d: Path) -> bool:
    return any((d / f).exists() for f in ("config.json", quant.MANIFEST)) or any(d.glob("*.gguf"))


def detect_format(p: Path) -> tuple[str, Path]:
    if p.is_file():
        if p.suffix == ".gguf":
            return "gguf", p
        if p.suffix in PICKLE_SUFFIXES:
            raise ModelLoadError(f"{p} is a pickle checkpoint; give the model directory (with config.json)")
        raise ModelLoadError(f"{p} is not a model: expected a .gguf file or a model directory")
    if (p / quant.MANIFEST).is_file():
        return "quantized", p
    if (p / "config.json").is_file():
        return "hf", p
    ggufs = sorted(p.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf", ggufs[0]
    if len(ggufs) > 1:
        raise ModelLoadError(f"{p} holds several .gguf files ({', '.join(g.name for g in ggufs)}); "
                             f"pass the file itself as the model path")
    raise ModelLoadError(f"{p} has no config.json, no {quant.MANIFEST} and no .gguf file")


# ---------------------------------------------------------------- HF checkpoints
def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc


def _check_remote_code(d: Path, cfg: dict[str, Any], trust_remote_code: bool) -> None:
    tok_cfg = d / "tokenizer_config.json"
    custom = "auto_map" in cfg or (tok_cfg.is_file() and "auto_map" in _read_json(tok_cfg))
    if custom and not trust_remote_code:
        raise ModelLoadError(
            f"{d} declares custom Python code (auto_map in config.json/tokenizer_config.json). This runtime "
            f"never runs model code from the checkpoint; the built-in architectures are "
            f"{', '.join(SUPPORTED_ARCHS)}. If this model is one of them, pass --trust_remote_code to "
            f"load it with the built-in implementation.")


def _hf_source(d: Path, mapping: dict[str, list[str]], allow_pickle: bool) -> TensorSource:
    st_files = sorted(d.glob("*.safetensors"))
    pickles = sorted(f for f in d.iterdir() if f.suffix in PICKLE_SUFFIXES)
    if not st_files:
        if not pickles:
            raise ModelLoadError(f"{d} has no *.safetensors weights")
        if not allow_pickle:
            raise ModelLoadError(
                f"{d} only has pickle weights ({', '.join(f.name for f in pickles)}): loading pickle can run "
                f"arbitrary code, so it is refused. Convert the checkpoint to safetensors, or pass "
                f"--allow_pickle if you trust its source.")
        state: dict[str, Tensor] = {}
        for f in pickles:
            state.update(torch.load(f, map_location="cpu", weights_only=True, mmap=True))
        return TensorSource(set(state), state.__getitem__, mapping)
    from safetensors import safe_open

    index = d / "model.safetensors.index.json"
    files = sorted({d / f for f in _read_json(index)["weight_map"].values()}) if index.is_file() else st_files
    where: dict[str, Any] = {}
    for f in files:
        if not f.is_file():
            raise ModelLoadError(f"{index.name} lists {f.name}, which is missing from {d}")
        handle = safe_open(str(f), framework="pt")
        for k in handle.keys():  # noqa: SIM118 - safe_open has keys(), not __iter__
            where[k] = handle
    return TensorSource(set(where), lambda k: where[k].get_tensor(k), mapping)


def _hf_tokenizer(d: Path, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(d), trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - many failure types; all mean "no usable tokenizer"
        raise ModelLoadError(f"cannot load the tokenizer from {d}: {exc}") from exc
    if getattr(tok, "chat_template", None) is None and (d / "chat_template.jinja").is_file():
        tok.chat_template = (d / "chat_template.jinja").read_text()
    return tok


def _generation_config(d: Path) -> tuple[list[int], dict[str, Any]]:
    f = d / "generation_config.json"
    if not f.is_file():
        return [], {}
    gc = _read_json(f)
    eos = gc.get("eos_token_id")
    eos_ids = [int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
    defaults = {k: gc[k] for k in ("temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens")
                if gc.get(k) is not None}
    if gc.get("do_sample") is False:
        defaults["temperature"] = 0.0
    return eos_ids, defaults


# ---------------------------------------------------------------- GGUF files
def _gguf_field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def gguf_config(reader: Any) -> ModelConfig:
    arch = _gguf_field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ModelLoadError(f"GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHS)})")
    a = lambda k, d=None: _gguf_field(reader, f"{arch}.{k}", d)  # noqa: E731
    n_heads = int(a("attention.head_count"))
    tensors = {t.name: t for t in reader.tensors}
    vocab = int(tensors["token_embd.weight"].shape[-1])
    hidden = int(a("embedding_length"))
    scaling = None
    if arch == "llama" and "rope_freqs.weight" in tensors:
        raise ModelLoadError("GGUF llama with rope_freqs (llama3 scaling) is not supported yet; use the HF checkpoint")
    return ModelConfig(
        arch=arch, hidden_size=hidden, n_layers=int(a("block_count")), n_heads=n_heads,
        n_kv_heads=int(a("attention.head_count_kv", n_heads)), intermediate_size=int(a("feed_forward_length")),
        vocab_size=vocab, rope_theta=float(a("rope.freq_base", 10000.0)),
        rms_eps=float(a("attention.layer_norm_rms_epsilon", 1e-6)),
        tie_word_embeddings="output.weight" not in tensors, max_position=int(a("context_length", 4096)),
        qkv_bias="blk.0.attn_q.bias" in tensors, head_dim=int(a("attention.key_length", 0) or 0),
        rope_scaling=scaling,
    )


def _gguf_source(reader: Any, cfg: ModelConfig) -> TensorSource:
    import gguf
    import numpy as np

    tensors = {t.name: t for t in reader.tensors}

    def get(name: str) -> Tensor:
        t = tensors[name]
        a = gguf.dequantize(t.data, t.tensor_type)  # numpy float32, shape reversed from GGUF's ne
        w = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
        if cfg.arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            # llama.cpp permutes llama's q/k rows for its interleaved RoPE; undo it (HF layout)
            heads = cfg.n_heads if "attn_q" in name else cfg.n_kv_heads
            w = w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
        return w

    return TensorSource(set(tensors), get, _gguf_names(cfg))


def _gguf_tokenizer(path: Path, reader: Any) -> tuple[Any, list[int]]:
    from transformers import AutoTokenizer

    beside = path.parent
    try:
        if (beside / "tokenizer.json").is_file():
            tok = AutoTokenizer.from_pretrained(str(beside))
        else:
            tok = AutoTokenizer.from_pretrained(str(beside), gguf_file=path.name)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"cannot build a tokenizer from {path}'s metadata: {exc}") from exc
    template = _gguf_field(reader, "tokenizer.chat_template")
    if template and not getattr(tok, "chat_template", None):
        tok.chat_template = template
    eos = [int(e) for e in (_gguf_field(reader, "tokenizer.ggml.eos_token_id"),) if e is not None]
    return tok, eos


# ---------------------------------------------------------------- building the module
def build_model(cfg: ModelConfig, src: TensorSource, *, dtype: torch.dtype, device: torch.device,
                max_len: int, quantization: str = "none", group_size: int = 128,
                quantize_lm_head: bool = False, keep_codes: bool = False,
                progress: Callable[[list[str]], Any] | None = None) -> Transformer:
    """Materialise a Transformer from `src`, one tensor at a time (quantizing Linears on the way
    when `quantization` is int8/int4, or rebuilding stored quantized layers as they are)."""
    if not src.has("lm_head.weight") and not any(k.startswith("lm_head.") for k in src.available):
        cfg.tie_word_embeddings = True
    with torch.device("meta"):
        model = Transformer(cfg)
    keys = src.available
    modules = list(model.named_modules())
    names = [n for n, _ in modules if n]
    for name in progress(names) if progress else names:
        module = model.get_submodule(name)
        if isinstance(module, nn.Linear):
            stored = quant.linear_from_state(name, keys, src.get, dtype, device)
            if stored is not None:
                model.set_submodule(name, stored)
                continue
            wname = f"{name}.weight"
            if name == "lm_head" and not src.has(wname):
                wname = "embed.weight"  # tied
                if not (quantization != "none" and quantize_lm_head):
                    continue  # tied after the loop
            if not src.has(wname):
                raise ModelLoadError(f"the checkpoint has no weight for {name} ({src.mapping.get(wname, [wname])})")
            weight = src.get(wname)
            bias = src.get(f"{name}.bias").to(device) if module.bias is not None and src.has(f"{name}.bias") else None
            expected = (module.out_features, module.in_features)
            if tuple(weight.shape) != expected:
                raise ModelLoadError(f"{name}: weight shape {tuple(weight.shape)} != expected {expected}")
            if quantization != "none" and (name != "lm_head" or quantize_lm_head):
                model.set_submodule(name, quant.quantize_linear(weight.to(device), bias, quantization, group_size,
                                                                dtype, keep_codes))
            else:
                new = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
                new.weight = nn.Parameter(weight.to(device=device, dtype=dtype), requires_grad=False)
                if module.bias is not None:
                    b = bias if bias is not None else torch.zeros(module.out_features)
                    new.bias = nn.Parameter(b.to(device=device, dtype=dtype), requires_grad=False)
                model.set_submodule(name, new)
        elif isinstance(module, (nn.Embedding, RMSNorm)):
            w = src.get(f"{name}.weight")
            if tuple(w.shape) != tuple(module.weight.shape):
                raise ModelLoadError(f"{name}: weight shape {tuple(w.shape)} != expected {tuple(module.weight.shape)}")
            module.weight = nn.Parameter(w.to(device=device, dtype=dtype), requires_grad=False)
    if isinstance(model.lm_head, nn.Linear) and model.lm_head.weight.is_meta:
        model.lm_head.weight = model.embed.weight
    model.set_rope(max_len, device)
    return model.eval().requires_grad_(False)


def load_model(model_dir: str | Path, *, quantization: str = "none", group_size: int = 128,
               prequantized: bool | None = None, dtype: str | torch.dtype = "auto",
               device: str | torch.device = "auto", max_model_len: int | None = None,
               allow_pickle: bool = False, trust_remote_code: bool = False,
               quantize_lm_head: bool = False, keep_codes: bool = False,
               progress: Callable[[list[str]], Any] | None = None) -> LoadedModel:
    quantization = quantization or "none"
    if quantization not in ("none", *quant.METHODS):
        raise ModelLoadError(f"unknown quantization {quantization!r} (none, int8, int4)")
    try:
        dev = pick_device(device)
        dt = pick_dtype(dtype, dev)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from exc
    if dev.type == "cpu":
        configure_threads()
    path = resolve_model_path(model_dir)
    fmt, path = detect_format(path)
    if prequantized and fmt != "quantized":
        raise ModelLoadError(f"--prequantized was given but {path} has no {quant.MANIFEST}; "
                             f"write one with `model-runtime quantize SRC DST`")
    if prequantized is False and fmt == "quantized":
        raise ModelLoadError(f"{path} is a quantized artifact ({quant.MANIFEST}) but --prequantized=false")

    eos_ids: list[int] = []
    defaults: dict[str, Any] = {}
    stored_group: int | None = None
    if fmt == "gguf":
        try:
            import gguf

            reader = gguf.GGUFReader(str(path))
        except Exception as exc:  # noqa: BLE001
            raise ModelLoadError(f"cannot read GGUF file {path}: {exc}") from exc
        cfg = gguf_config(reader)
        src = _gguf_source(reader, cfg)
        tokenizer, eos_ids = _gguf_tokenizer(path, reader)
    else:
        raw = _read_json(path / "config.json")
        _check_remote_code(path, raw, trust_remote_code)
        try:
            cfg = ModelConfig.from_hf(raw)
        except (KeyError, ValueError) as exc:
            raise ModelLoadError(f"{path}/config.json: {exc}") from exc
        if fmt == "quantized":
            try:
                manifest = quant.read_manifest(path)
            except ValueError as exc:
                raise ModelLoadError(str(exc)) from exc
            assert manifest is not None
            if quantization not in ("none", manifest["method"]):
                raise ModelLoadError(f"{path} holds {manifest['method']} weights; --quantization {quantization} "
                                     f"would need the float checkpoint (omit it, or pass {manifest['method']})")
            quantization, stored_group = manifest["method"], manifest.get("group_size")
            cfg = ModelConfig(**manifest["config"])
        src = _hf_source(path, {} if fmt == "quantized" else _hf_names(cfg), allow_pickle)
        tokenizer = _hf_tokenizer(path, trust_remote_code)
        eos_ids, defaults = _generation_config(path)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        eos_ids.append(int(tokenizer.eos_token_id))
    eos_ids = sorted(set(eos_ids))

    limit = min(cfg.max_position, DEFAULT_MAX_MODEL_LEN)
    if max_model_len is None:
        max_model_len = limit
    elif max_model_len > cfg.max_position:
        raise ModelLoadError(f"max_model_len {max_model_len} exceeds the model's max_position_embeddings "
                             f"{cfg.max_position}")
    with torch.inference_mode(False), torch.no_grad():
        model = build_model(cfg, src, dtype=dt, device=dev, max_len=max_model_len,
                            quantization="none" if fmt == "quantized" else quantization,
                            group_size=group_size, quantize_lm_head=quantize_lm_head, keep_codes=keep_codes,
                            progress=progress)
    log.info("loaded %s (%s) quantization=%s dtype=%s device=%s", path, fmt, quantization, dt, dev)
    return LoadedModel(model=model, config=cfg, tokenizer=tokenizer, eos_token_ids=eos_ids,
                       generation_defaults=defaults, device=dev, dtype=dt, quantization=quantization,
                       max_model_len=int(max_model_len), source_format=fmt,
                       group_size=stored_group if fmt == "quantized" else (group_size if quantization == "int4"
                                                                             else None),
                       source_path=str(path))
