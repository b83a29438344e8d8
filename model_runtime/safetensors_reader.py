"""Hugging Face checkpoints: config.json + *.safetensors (single or sharded with an index), read a
tensor (or a range of rows) at a time with plain file reads. Pickle weights (.bin/.pt/.pth) and
custom code (auto_map) are refused unless explicitly allowed."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from model_runtime.config import SUPPORTED_ARCHS, ModelConfig
from model_runtime.load_error import ModelLoadError
from model_runtime.tensor_source import LazyRows, TensorSource

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def hf_names(cfg: ModelConfig) -> dict[str, list[str]]:
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


def read_json(path: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
        return data
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc


def check_remote_code(d: Path, cfg: dict[str, Any], trust_remote_code: bool) -> None:
    tok_cfg = d / "tokenizer_config.json"
    custom = "auto_map" in cfg or (tok_cfg.is_file() and "auto_map" in read_json(tok_cfg))
    if custom and not trust_remote_code:
        raise ModelLoadError(
            f"{d} declares custom Python code (auto_map in config.json/tokenizer_config.json). This runtime "
            f"never runs model code from the checkpoint; the built-in architectures are "
            f"{', '.join(SUPPORTED_ARCHS)}. If this model is one of them, pass --trust_remote_code to "
            f"load it with the built-in implementation.")


def hf_source(d: Path, mapping: dict[str, list[str]], allow_pickle: bool) -> TensorSource:
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
    index = d / "model.safetensors.index.json"
    files = sorted({d / f for f in read_json(index)["weight_map"].values()}) if index.is_file() else st_files
    where: dict[str, SafetensorsFile] = {}
    for f in files:
        if not f.is_file():
            raise ModelLoadError(f"{index.name} lists {f.name}, which is missing from {d}")
        handle = SafetensorsFile(f)
        for k in handle.entries:
            where[k] = handle
    return TensorSource(set(where), lambda k: where[k].tensor(k), mapping, rows=lambda k: where[k].lazy_rows(k))

_ST_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "BOOL": torch.bool,
}


class SafetensorsFile:
    """Reads one safetensors file a tensor at a time with plain file reads.

    safetensors' own reader memory-maps the whole file: every page it touches stays mapped, and counted in
    the process's RSS, for as long as any tensor or handle lives, so a quantized model would carry its
    float checkpoint's pages beside its own int8/int4 copy. Reading each tensor into its own buffer keeps
    peak memory at (model so far + one float tensor).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        with path.open("rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        header.pop("__metadata__", None)
        self.data_start = 8 + size
        self.entries: dict[str, dict[str, Any]] = header

    def tensor(self, name: str) -> Tensor:
        entry = self.entries[name]
        dtype = _ST_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ModelLoadError(f"{self.path.name}: tensor {name} has unsupported dtype {entry['dtype']}")
        begin, end = entry["data_offsets"]
        return self._read(name, begin, end).view(dtype).reshape(entry["shape"])

    def lazy_rows(self, name: str) -> LazyRows | None:
        entry = self.entries[name]
        dtype = _ST_DTYPES.get(entry["dtype"])
        if dtype is None or len(entry["shape"]) != 2:
            return None
        n, k = entry["shape"]
        row_bytes = k * torch.empty((), dtype=dtype).element_size()
        begin = entry["data_offsets"][0]

        def read(r0: int, r1: int) -> Tensor:
            return self._read(name, begin + r0 * row_bytes, begin + r1 * row_bytes).view(dtype).reshape(r1 - r0, k)

        return LazyRows((n, k), read)

    def _read(self, name: str, begin: int, end: int) -> Tensor:
        buf = torch.empty(end - begin, dtype=torch.uint8)
        with self.path.open("rb", buffering=0) as fh:
            fh.seek(self.data_start + begin)
            # an ndarray has the buffer protocol; numpy's stubs declare __buffer__ for Python >= 3.12 only
            view = memoryview(buf.numpy())  # type: ignore[arg-type]
            got = 0
            while got < len(view):
                n = fh.readinto(view[got:])
                if not n:
                    raise ModelLoadError(f"{self.path.name} is truncated (tensor {name})")
                got += n
        return buf


_TOKENIZERS: dict[tuple[object, ...], Any] = {}
