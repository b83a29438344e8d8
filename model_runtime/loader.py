"""Load a model for serving: a Hugging Face directory, a GGUF file, or our quantized artifact.

The steps, one module each: find the model and its format (here); read its config and open its
tensors (safetensors_reader, gguf_reader, artifact_reader); decide the KernelPlan from the request
and the machine (plan.py) before any module exists; build the model on the plan's device
(build.py); the tokenizer and generation defaults (tokenizer_loader). Weights are read one tensor
at a time and quantized as they arrive, so loading a quantized model never holds the whole float
model in memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model_runtime import quant
from model_runtime.artifact_reader import read_artifact, stored_layout
from model_runtime.build import build_model, has_own_head
from model_runtime.config import ModelConfig
from model_runtime.device import configure_threads, pick_device, pick_dtype
from model_runtime.gguf_reader import GGUFFile, gguf_config, gguf_source
from model_runtime.load_error import ModelLoadError
from model_runtime.load_memory import LoadTimeMalloc
from model_runtime.omp_pool import on_own_thread
from model_runtime.plan import (
    KernelPlan,
    Machine,
    PlanError,
    embedding_method,
    lm_head_method,
    log_plan,
    make_plan,
)
from model_runtime.safetensors_reader import (
    PICKLE_SUFFIXES,
    check_remote_code,
    hf_names,
    hf_source,
    read_json,
)
from model_runtime.tensor_source import TensorSource
from model_runtime.tokenizer_loader import generation_config, gguf_tokenizer_and_eos, hf_tokenizer

__all__ = ["LoadedModel", "ModelLoadError", "detect_format", "load_model", "resolve_model_path"]

log = logging.getLogger("model_runtime.loader")

MOUNT_DIR = Path("/mnt/models")
DEFAULT_MAX_MODEL_LEN = 32768  # the KV cache is reserved lazily, but bound the address space
# --model_format -> the formats detect_format may find for it
FORMAT_ACCEPTS = {"auto": ("hf", "quantized", "gguf"), "safetensors": ("hf", "quantized"), "gguf": ("gguf",)}


@dataclass
class LoadedModel:
    model: Any   # model.Transformer
    config: ModelConfig
    tokenizer: Any
    eos_token_ids: list[int]
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.bfloat16
    quantization: str = "none"
    max_model_len: int = 4096
    source_format: str = "hf"   # "hf" | "gguf" | "quantized"
    group_size: int | None = None
    source_path: str = ""
    plan: KernelPlan | None = None


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



@on_own_thread  # loading's OpenMP pool must not outlive it beside the engine thread's (omp_pool.py says why)
def load_model(model_dir: str | Path, *, quantization: str = "none", group_size: int = 128,
               prequantized: bool | None = None, dtype: str | torch.dtype = "auto",
               device: str | torch.device = "auto", max_model_len: int | None = None,
               allow_pickle: bool = False, trust_remote_code: bool = False,
               quantize_lm_head: bool | None = None, keep_codes: bool = False, model_format: str = "auto",
               kernels: str | None = None, compile: bool | None = None,
               progress: Callable[[list[str]], Any] | None = None) -> LoadedModel:
    """kernels: the linear backend override (plan.KERNEL_CHOICES; None: DISTILLERY_CPU_KERNELS or auto);
    compile: torch.compile the decode step (None: DISTILLERY_COMPILE, else on for CUDA only)."""
    quantization = quantization or "none"
    if quantization not in ("none", *quant.METHODS):
        raise ModelLoadError(f"unknown quantization {quantization!r} (none, int8, int4)")
    if model_format not in FORMAT_ACCEPTS:
        raise ModelLoadError(f"unknown model format {model_format!r} ({', '.join(FORMAT_ACCEPTS)})")
    try:
        dev = pick_device(device)
        dt = pick_dtype(dtype, dev) if dtype not in (None, "", "auto") else None
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from exc
    if dev.type == "cpu":
        configure_threads()
    path = resolve_model_path(model_dir)
    fmt, path = detect_format(path)
    if fmt not in FORMAT_ACCEPTS[model_format]:
        found = "a GGUF file" if fmt == "gguf" else "safetensors weights"
        raise ModelLoadError(f"--model_format {model_format} but {path} holds {found}")
    if prequantized and fmt != "quantized":
        raise ModelLoadError(f"--prequantized was given but {path} has no {quant.MANIFEST}; "
                             f"write one with `model-runtime quantize SRC DST`")
    if prequantized is False and fmt == "quantized":
        raise ModelLoadError(f"{path} is a quantized artifact ({quant.MANIFEST}) but --prequantized=false")

    eos_ids: list[int] = []
    defaults: dict[str, Any] = {}
    src: TensorSource
    if fmt == "gguf":
        try:
            reader = GGUFFile(path)
        except Exception as exc:  # noqa: BLE001
            raise ModelLoadError(f"cannot read GGUF file {path}: {exc}") from exc
        cfg = gguf_config(reader)
        src = gguf_source(reader, cfg)
        tokenizer, eos_ids = gguf_tokenizer_and_eos(path, reader)
    else:
        raw = read_json(path / "config.json")
        check_remote_code(path, raw, trust_remote_code)
        try:
            cfg = ModelConfig.from_hf(raw)
        except (KeyError, ValueError) as exc:
            raise ModelLoadError(f"{path}/config.json: {exc}") from exc
        if fmt == "quantized":
            artifact = read_artifact(path, quantization)
            cfg, quantization, src = artifact.config, artifact.method, artifact.source
            group_size = artifact.group_size or group_size
        else:
            src = hf_source(path, hf_names(cfg), allow_pickle)
        tokenizer = hf_tokenizer(path, trust_remote_code)
        eos_ids, defaults = generation_config(path)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        eos_ids.append(int(tokenizer.eos_token_id))
    eos_ids = sorted(set(eos_ids))

    limit = min(cfg.max_position, DEFAULT_MAX_MODEL_LEN)
    if max_model_len is None:
        max_model_len = limit
    elif max_model_len > cfg.max_position:
        raise ModelLoadError(f"max_model_len {max_model_len} exceeds the model's max_position_embeddings "
                             f"{cfg.max_position}")
    if not has_own_head(src):
        cfg.tie_word_embeddings = True
    if fmt == "quantized":
        head, embedding = stored_layout(src.available, cfg.tie_word_embeddings)
    else:
        head = lm_head_method(quantization, quantize_lm_head)
        embedding = embedding_method(quantization, cfg.tie_word_embeddings, head)
    try:
        plan = make_plan(cfg, Machine.probe(dev), quantization=quantization, group_size=group_size, lm_head=head,
                         embedding=embedding, dtype=dt, kernels=kernels, compile=compile,
                         source_format=fmt, prequantized=fmt == "quantized")
    except PlanError as exc:
        raise ModelLoadError(str(exc)) from exc
    log_plan(plan)
    with torch.inference_mode(False), torch.no_grad(), LoadTimeMalloc():
        model = build_model(cfg, src, plan, max_len=max_model_len, keep_codes=keep_codes, progress=progress)
    log.info("loaded %s (%s) quantization=%s dtype=%s device=%s backend=%s", path, fmt, quantization,
             plan.float_dtype, dev, plan.backend)
    return LoadedModel(model=model, config=cfg, tokenizer=tokenizer, eos_token_ids=eos_ids,
                       generation_defaults=defaults, device=dev, dtype=plan.float_dtype, quantization=quantization,
                       max_model_len=int(max_model_len), source_format=fmt,
                       group_size=plan.group_size if quantization == "int4" else None,
                       source_path=str(path), plan=plan)
