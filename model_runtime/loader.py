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

import functools
import json
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from model_runtime import quant
from model_runtime.config import SUPPORTED_ARCHS, ModelConfig
from model_runtime.device import configure_threads, pick_device, pick_dtype
from model_runtime.kernels import Int4Embedding, Int8Embedding, Int8Linear
from model_runtime.model import RMSNorm, Transformer

log = logging.getLogger("model_runtime.loader")

MOUNT_DIR = Path("/mnt/models")
DEFAULT_MAX_MODEL_LEN = 32768  # the KV cache is reserved lazily, but bound the address space
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class ModelLoadError(Exception):
    """The model cannot be loaded; the message says what was wrong and how to fix it."""


@dataclass
class LoadedModel:
    model: Transformer
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


class LazyRows:
    """A 2-D weight in a file, read a range of rows at a time (`w[r0:r1]`): the quantizers walk
    big matrices (a 150k-row lm_head) chunk by chunk without ever holding the whole float tensor."""

    def __init__(self, shape: tuple[int, int], read: Callable[[int, int], Tensor]) -> None:
        self.shape = torch.Size(shape)
        self._read = read

    def __getitem__(self, rows: slice) -> Tensor:
        start, stop, step = rows.indices(self.shape[0])
        if step != 1:
            raise ValueError("LazyRows reads contiguous row ranges only")
        return self._read(start, stop)


def _stacked_rows(parts: list[LazyRows]) -> Tensor | LazyRows:
    """Row-wise concatenation of lazily read matrices (the fused q/k/v or gate/up weight)."""
    k = parts[0].shape[1]
    if any(p.shape[1] != k for p in parts):
        return torch.cat([p[0:p.shape[0]] for p in parts], dim=0)
    starts = [0]
    for p in parts:
        starts.append(starts[-1] + p.shape[0])

    def read(r0: int, r1: int) -> Tensor:
        pieces = []
        for p, lo, hi in zip(parts, starts, starts[1:], strict=False):
            a, b = max(r0, lo), min(r1, hi)
            if a < b:
                pieces.append(p[a - lo:b - lo])
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)

    return LazyRows((starts[-1], k), read)


class TensorSource:
    """name -> tensor on demand (ours), fusing q/k/v and gate/up as they are read."""

    def __init__(self, names: set[str], get: Callable[[str], Tensor], mapping: dict[str, list[str]],
                 rows: Callable[[str], LazyRows | None] | None = None) -> None:
        self.available = names
        self._get = get
        self._rows = rows
        self.mapping = mapping

    def to_quantize(self, ours: str, device: torch.device) -> Tensor | LazyRows:
        """A weight about to be quantized: on CPU read lazily, a chunk of rows at a time where the
        file allows (no whole float copy); elsewhere the tensor, moved to the device."""
        return self.lazy(ours) if device.type == "cpu" else self.get(ours).to(device)

    def lazy(self, ours: str) -> Tensor | LazyRows:
        """The weight as row-readable from the file when the format allows it (2-D source tensors;
        fused q/k/v or gate/up read across their sources), else the tensor itself."""
        srcs = self.mapping.get(ours, [ours])
        parts = [self._rows(s) for s in srcs] if self._rows is not None else [None]
        if any(p is None for p in parts):
            return self.get(ours)
        if len(parts) == 1:
            return cast(LazyRows, parts[0])  # not None: checked above
        return _stacked_rows([p for p in parts if p is not None])

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
        data: dict[str, Any] = json.loads(path.read_text())
        return data
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
    index = d / "model.safetensors.index.json"
    files = sorted({d / f for f in _read_json(index)["weight_map"].values()}) if index.is_file() else st_files
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
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                    "vocab.json", "merges.txt")


def _stat_key(files: list[Path]) -> tuple[tuple[str, int, int], ...]:
    return tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file())


def _hf_tokenizer(d: Path, trust_remote_code: bool) -> Any:
    """The directory's tokenizer, cached per process by its files' (name, size, mtime): parsing a
    150k-token tokenizer.json takes seconds, and tokenizers are only read after loading."""
    key = ("hf", _stat_key([d / f for f in _TOKENIZER_FILES]))
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = _load_hf_tokenizer(d)
    return _TOKENIZERS[key]


def _load_hf_tokenizer(d: Path) -> Any:
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


def _gguf_source(g: GGUFFile, cfg: ModelConfig) -> TensorSource:
    import numpy as np

    def get(name: str) -> Tensor:
        w = torch.from_numpy(np.array(g.tensor(name), dtype=np.float32))
        if cfg.arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            # llama.cpp permutes llama's q/k rows for its interleaved RoPE; undo it (HF layout)
            heads = cfg.n_heads if "attn_q" in name else cfg.n_kv_heads
            w = w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
        return w

    return TensorSource(set(g.tensors), get, _gguf_names(cfg))


# pre-tokenizer regexes by tokenizer.ggml.pre (llama.cpp's names)
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")


def gguf_tokenizer(g: GGUFFile) -> Any:
    """A fast tokenizer rebuilt from GGUF metadata (byte-level BPE: Qwen2 / Llama-3 style)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if g.get("tokenizer.ggml.model") != "gpt2":
        raise ModelLoadError(f"GGUF tokenizer model {g.get('tokenizer.ggml.model')!r} is not supported "
                             f"(byte-level BPE 'gpt2' only); put a tokenizer.json beside the .gguf file")
    tokens: list[str] = g.get("tokenizer.ggml.tokens")
    types: list[int] = g.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in g.get("tokenizer.ggml.merges", [])]
    vocab = {t: i for i, t in enumerate(tokens)}  # every id; added tokens below keep theirs
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
    split = _LLAMA3_SPLIT if g.get("tokenizer.ggml.pre") in ("llama-bpe", "llama3", "smaug-bpe") else _QWEN2_SPLIT
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tk.decoder = decoders.ByteLevel()
    added = [(i, t) for i, t in enumerate(tokens) if types[i] in (3, 4)]  # control, user-defined
    tk.add_tokens([AddedToken(t, special=types[i] == 3, normalized=False) for i, t in added])
    for i, t in added:
        if tk.token_to_id(t) != i:  # duplicate token strings in the metadata
            raise ModelLoadError(f"GGUF tokenizer: token {t!r} is listed twice; put a tokenizer.json beside the file")

    def tok(key: str) -> str | None:
        i = g.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos = tok("bos")
    if g.get("tokenizer.ggml.add_bos_token") and bos is not None:
        bos_id = g.get("tokenizer.ggml.bos_token_id")
        tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                          special_tokens=[(bos, bos_id)])
    # transformers' PreTrainedTokenizerFast (TokenizersBackend) has an unannotated __init__
    out = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos, eos_token=tok("eos"),  # type: ignore[no-untyped-call]
                                  pad_token=tok("padding"), unk_token=tok("unknown"))
    out.chat_template = g.get("tokenizer.chat_template")
    return out


def _gguf_tokenizer(path: Path, g: GGUFFile) -> tuple[Any, list[int]]:
    beside = path.parent
    eos = [int(e) for e in (g.get("tokenizer.ggml.eos_token_id"),) if e is not None]
    if (beside / "tokenizer.json").is_file():
        return _hf_tokenizer(beside, False), eos
    if "tokenizer.ggml.tokens" not in g.fields:
        raise ModelLoadError(f"{path} has no tokenizer metadata and no tokenizer.json beside it")
    key = ("gguf", str(path.resolve()), _stat_key([path]))
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = gguf_tokenizer(g)
    return _TOKENIZERS[key], eos


# ---------------------------------------------------------------- building the module
def lm_head_method(quantization: str, quantize_lm_head: bool | None) -> str:
    """lm_head's quantization. None (auto): int8 whenever the decoder is quantized. The head is
    ~28% of the 0.5B model's weight bytes read per token, and per-channel int8 keeps it close to
    float (llama.cpp's Q4_K_M likewise keeps the output layer at higher precision).
    True: the decoder's method; False: float."""
    if quantization == "none" or quantize_lm_head is False:
        return "none"
    return quantization if quantize_lm_head else "int8"


def build_model(cfg: ModelConfig, src: TensorSource, *, dtype: torch.dtype, device: torch.device,
                max_len: int, quantization: str = "none", group_size: int = 128,
                quantize_lm_head: bool | None = None, keep_codes: bool = False,
                progress: Callable[[list[str]], Any] | None = None) -> Transformer:
    """Materialise a Transformer from `src`, one tensor at a time (quantizing Linears on the way
    when `quantization` is int8/int4, or rebuilding stored quantized layers as they are)."""
    if not src.has("lm_head.weight") and not any(k.startswith("lm_head.") for k in src.available):
        cfg.tie_word_embeddings = True
    with torch.device("meta"):
        model = Transformer(cfg)
    keys = src.available
    head_method = lm_head_method(quantization, quantize_lm_head)
    modules = list(model.named_modules())
    # the two vocabulary-sized matrices first, while nothing else is resident: their load-time
    # transients then never stack on top of the whole decoder (peak RSS)
    names = sorted((n for n, _ in modules if n), key=lambda n: n not in ("embed", "lm_head"))
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
                if head_method == "none":
                    continue  # tied after the loop
            if not src.has(wname):
                raise ModelLoadError(f"the checkpoint has no weight for {name} ({src.mapping.get(wname, [wname])})")
            method = head_method if name == "lm_head" else quantization
            weight = src.to_quantize(wname, device) if method != "none" else src.get(wname)
            bias = src.get(f"{name}.bias").to(device) if module.bias is not None and src.has(f"{name}.bias") else None
            expected = (module.out_features, module.in_features)
            if tuple(weight.shape) != expected:
                raise ModelLoadError(f"{name}: weight shape {tuple(weight.shape)} != expected {expected}")
            if method != "none":
                model.set_submodule(name, quant.quantize_linear(weight, bias, method, group_size, dtype, keep_codes))
                del weight
            else:
                new = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
                # method "none": src.get() gave the whole tensor, not LazyRows
                new.weight = nn.Parameter(cast(Tensor, weight).to(device=device, dtype=dtype), requires_grad=False)
                if module.bias is not None:
                    b = bias if bias is not None else torch.zeros(module.out_features)
                    new.bias = nn.Parameter(b.to(device=device, dtype=dtype), requires_grad=False)
                model.set_submodule(name, new)
        elif name == "embed" and _quantized_embedding(model, src, keys, quantization, head_method, group_size,
                                                      dtype, device):
            continue
        elif isinstance(module, (nn.Embedding, RMSNorm)):
            w = src.get(f"{name}.weight")
            if tuple(w.shape) != tuple(module.weight.shape):
                raise ModelLoadError(f"{name}: weight shape {tuple(w.shape)} != expected {tuple(module.weight.shape)}")
            module.weight = nn.Parameter(w.to(device=device, dtype=dtype), requires_grad=False)
    if isinstance(model.lm_head, nn.Linear) and model.lm_head.weight.is_meta:
        # a float head left untied in the loop: the embedding is float too (embedding_method)
        model.lm_head.weight = cast(nn.Embedding, model.embed).weight
    if isinstance(model.embed, nn.Embedding) and model.embed.weight.is_meta:
        # tied and int8: the embedding is the int8 lm_head's rows (one copy for both)
        assert isinstance(model.lm_head, Int8Linear)
        model.embed = Int8Embedding(model.lm_head.codes, model.lm_head.scales, dtype)
    model.set_rope(max_len, device)
    model.float_dtype = dtype
    use_float32_activations(model)
    return model.eval().requires_grad_(False)


def embedding_method(quantization: str, tied: bool, head_method: str) -> str:
    """How the token embedding is stored: "float", "shared" (a tied model's int8 head rows serve as
    the embedding: one copy), "int8" (per row) or "int4" (group-wise, for int4 models: llama.cpp's
    Q4_K_M keeps token_embd at 4-5 bits too). A lookup reads one row per token: the width costs
    no speed, only memory (151936 x 1536: bf16 467 MB, int8 233 MB, int4 124 MB)."""
    if quantization == "none" or (tied and head_method == "none"):
        return "float"  # (a tied float head is the embedding's own weight)
    if tied and head_method == "int8":
        return "shared"
    return "int4" if quantization == "int4" else "int8"


def _quantized_embedding(model: Transformer, src: TensorSource, keys: set[str], quantization: str,
                         head_method: str, group_size: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Handle the embedding when it is stored quantized (True), or leave it to the float path (False):
    a stored int8/int4 embedding is rebuilt; a "shared" one is left on "meta" here and tied to the
    int8 head after the loop; otherwise it is quantized a chunk of rows at a time."""
    if "embed.codes" in keys:
        model.embed = Int8Embedding(src.get("embed.codes").to(device), src.get("embed.scales").to(device), dtype)
        return True
    if "embed.qweight" in keys:
        model.embed = Int4Embedding(src.get("embed.qweight").to(device), src.get("embed.scales").to(device),
                                    src.get("embed.zeros").to(device), dtype)
        return True
    tied = model.config.tie_word_embeddings
    if tied and "embed.weight" not in keys and "lm_head.codes" in keys:
        return True  # an artifact whose int8 head is also the embedding
    method = embedding_method(quantization, tied, head_method)
    if method == "float":
        return False
    if method == "shared":
        return True
    if not src.has("embed.weight"):
        raise ModelLoadError(f"the checkpoint has no token embedding ({src.mapping.get('embed.weight', ['embed.weight'])})")
    weight = src.to_quantize("embed.weight", device)
    if tuple(weight.shape) != (model.config.vocab_size, model.config.hidden_size):
        raise ModelLoadError(f"embed: weight shape {tuple(weight.shape)} != expected "
                             f"{(model.config.vocab_size, model.config.hidden_size)}")
    model.embed = (Int4Embedding.from_weight(weight, group_size, dtype) if method == "int4"
                   else Int8Embedding.from_weight(weight, dtype))
    return True


@functools.cache
def _libc() -> Any | None:
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return None


def release_free_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc malloc_trim): loading frees many float
    temporaries below malloc's mmap threshold, which otherwise stay in the process's RSS."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


class _LoadTimeMalloc:
    """While loading, blocks >= 256 KiB come from mmap and go back to the OS the moment they are
    freed (quantization temporaries then never pile up in the heap: lower peak RSS). Afterwards
    the threshold is 1 MiB (glibc's default grows it up to 32 MiB as big blocks are freed, and the
    engine thread's arena then keeps ~40 MB of freed step tensors resident); a decode step's
    tensors are below it, only prefill activations and batched logits are mmapped (~0.1 ms each)."""

    def __enter__(self) -> None:
        libc = _libc()
        if libc is not None:
            libc.mallopt(M_MMAP_THRESHOLD, 256 << 10)

    def __exit__(self, *exc: object) -> None:
        libc = _libc()
        if libc is not None:
            libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
        release_free_memory()


def use_float32_activations(model: Transformer) -> bool:
    """Switch to float32 activations when every linear runs on the CPU integer kernels (which take
    float32 rows): norms and biases become float32 (a few KiB), the embedding stays as stored."""
    linears = [m for m in model.modules() if isinstance(m, (nn.Linear, *quant.QUANTIZED_LINEARS))]
    if not linears or not all(getattr(m, "backend", None) == "dq" for m in linears):
        return False
    for m in model.modules():
        if isinstance(m, RMSNorm):
            m.weight = nn.Parameter(m.weight.data.float(), requires_grad=False)
    model.act_dtype = torch.float32
    if isinstance(model.embed, (Int8Embedding, Int4Embedding)):
        model.embed.out_dtype = torch.float32  # dequantize straight to float32
    model.fused_decode = True
    return True


def load_model(model_dir: str | Path, *, quantization: str = "none", group_size: int = 128,
               prequantized: bool | None = None, dtype: str | torch.dtype = "auto",
               device: str | torch.device = "auto", max_model_len: int | None = None,
               allow_pickle: bool = False, trust_remote_code: bool = False,
               quantize_lm_head: bool | None = None, keep_codes: bool = False,
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
            reader = GGUFFile(path)
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
    with torch.inference_mode(False), torch.no_grad(), _LoadTimeMalloc():
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
