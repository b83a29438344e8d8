"""GGUF files (llama.cpp): metadata and tensors read directly; tensors dequantized to float32 with the
`gguf` package (Q4_K/Q5_0/Q6_K/Q8_0/F16/...), the model's shape from its metadata."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from model_runtime.config import SUPPORTED_ARCHS, ModelConfig
from model_runtime.load_error import ModelLoadError
from model_runtime.tensor_source import TensorSource


def gguf_names(cfg: ModelConfig) -> dict[str, list[str]]:
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


class GGUFFile:
    """A minimal GGUF (v2/v3) reader: metadata as Python values, tensors as numpy views.

    gguf.GGUFReader builds a numpy view per string, which takes ~14 s for a 150k-token vocab;
    this reads the same metadata in well under a second. Dequantization uses gguf.dequantize."""

    _SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
    _NP = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<?", 10: "<u8", 11: "<i8",
           12: "<f8"}

    def __init__(self, path: Path) -> None:
        import struct

        import numpy as np

        self.path = Path(path)
        self.mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        # metadata is parsed from plain bytes (slicing the memmap per string is ~10x slower)
        with open(self.path, "rb") as f:
            head = f.read(64 << 20)
        self._pos = 0
        self._struct = struct

        def take(n: int) -> bytes:
            nonlocal head
            if self._pos + n > len(head):
                with open(self.path, "rb") as f:
                    head = f.read()
            b = head[self._pos:self._pos + n]
            self._pos += n
            return b

        self._take = take
        if take(4) != b"GGUF":
            raise ValueError("not a GGUF file (bad magic)")
        (version,) = struct.unpack("<I", take(4))
        if version < 2:
            raise ValueError(f"GGUF version {version} is too old")
        n_tensors, n_kv = struct.unpack("<QQ", take(16))
        self.fields: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            (vtype,) = struct.unpack("<I", take(4))
            self.fields[key] = self._value(vtype)
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            (n_dims,) = struct.unpack("<I", take(4))
            dims = struct.unpack(f"<{n_dims}Q", take(8 * n_dims))
            qtype, offset = struct.unpack("<IQ", take(12))
            infos.append((name, dims, qtype, offset))
        align = int(self.fields.get("general.alignment", 32))
        data_start = (self._pos + align - 1) // align * align
        self.tensors = {name: (dims, qtype, data_start + offset) for name, dims, qtype, offset in infos}

    def _string(self) -> str:
        (n,) = self._struct.unpack("<Q", self._take(8))
        return self._take(n).decode("utf-8", errors="replace")

    def _value(self, vtype: int) -> Any:
        import numpy as np

        if vtype == 8:
            return self._string()
        if vtype == 9:
            etype, count = self._struct.unpack("<IQ", self._take(12))
            if etype == 8:
                return [self._string() for _ in range(count)]
            if etype == 9:
                return [self._value(9) for _ in range(count)]
            dt = np.dtype(self._NP[etype])
            arr = np.frombuffer(self._take(dt.itemsize * count), dtype=dt)
            return arr.tolist()
        fmt = self._SCALARS[vtype]
        (v,) = self._struct.unpack(fmt, self._take(self._struct.calcsize(fmt)))
        return v

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def shape(self, name: str) -> tuple[int, ...]:
        """numpy order (GGUF stores ne0 first): [out, in] for 2-D weights."""
        return tuple(int(d) for d in reversed(self.tensors[name][0]))

    def tensor(self, name: str) -> Any:
        """Float32 numpy array of the (dequantized) tensor."""
        import gguf
        import numpy as np

        dims, qtype_id, start = self.tensors[name]
        qtype = gguf.GGMLQuantizationType(qtype_id)
        shape = self.shape(name)
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        n = int(np.prod(shape))
        nbytes = n // block * type_size
        raw = self.mm[start:start + nbytes]
        if qtype == gguf.GGMLQuantizationType.F32:
            return raw.view(np.float32).reshape(shape)
        if qtype == gguf.GGMLQuantizationType.F16:
            return raw.view(np.float16).reshape(shape).astype(np.float32)
        raw = raw.reshape(gguf.quant_shape_to_byte_shape(shape, qtype))
        return gguf.dequantize(raw, qtype).reshape(shape)


def gguf_config(g: GGUFFile) -> ModelConfig:
    arch = g.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ModelLoadError(f"GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHS)})")

    def a(k: str, d: Any = None) -> Any:
        return g.get(f"{arch}.{k}", d)

    n_heads = int(a("attention.head_count"))
    if "rope_freqs.weight" in g.tensors:
        raise ModelLoadError("GGUF with rope_freqs (llama3 RoPE scaling) is not supported yet; use the HF checkpoint")
    return ModelConfig(
        arch=arch, hidden_size=int(a("embedding_length")), n_layers=int(a("block_count")), n_heads=n_heads,
        n_kv_heads=int(a("attention.head_count_kv", n_heads)), intermediate_size=int(a("feed_forward_length")),
        vocab_size=g.shape("token_embd.weight")[0], rope_theta=float(a("rope.freq_base", 10000.0)),
        rms_eps=float(a("attention.layer_norm_rms_epsilon", 1e-6)),
        tie_word_embeddings="output.weight" not in g.tensors, max_position=int(a("context_length", 4096)),
        qkv_bias="blk.0.attn_q.bias" in g.tensors, head_dim=int(a("attention.key_length", 0) or 0),
    )

def gguf_source(g: GGUFFile, cfg: ModelConfig) -> TensorSource:
    import numpy as np

    def get(name: str) -> Tensor:
        w = torch.from_numpy(np.array(g.tensor(name), dtype=np.float32))
        if cfg.arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            # llama.cpp permutes llama's q/k rows for its interleaved RoPE; undo it (HF layout)
            heads = cfg.n_heads if "attn_q" in name else cfg.n_kv_heads
            w = w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
        return w

    return TensorSource(set(g.tensors), get, gguf_names(cfg))
