"""Tokenizers and generation defaults: a directory's tokenizer files (cached per process by their
stat), generation_config.json, or a byte-level BPE tokenizer rebuilt from GGUF metadata."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from model_runtime.gguf_reader import GGUFFile
from model_runtime.load_error import ModelLoadError
from model_runtime.safetensors_reader import read_json

_TOKENIZERS: dict[tuple[object, ...], Any] = {}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                    "vocab.json", "merges.txt")


def _stat_key(files: list[Path]) -> tuple[tuple[str, int, int], ...]:
    return tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file())


def hf_tokenizer(d: Path, trust_remote_code: bool) -> Any:
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

def generation_config(d: Path) -> tuple[list[int], dict[str, Any]]:
    f = d / "generation_config.json"
    if not f.is_file():
        return [], {}
    gc = read_json(f)
    eos = gc.get("eos_token_id")
    eos_ids = [int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
    defaults = {k: gc[k] for k in ("temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens")
                if gc.get(k) is not None}
    if gc.get("do_sample") is False:
        defaults["temperature"] = 0.0
    return eos_ids, defaults


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


def gguf_tokenizer_and_eos(path: Path, g: GGUFFile) -> tuple[Any, list[int]]:
    beside = path.parent
    eos = [int(e) for e in (g.get("tokenizer.ggml.eos_token_id"),) if e is not None]
    if (beside / "tokenizer.json").is_file():
        return hf_tokenizer(beside, False), eos
    if "tokenizer.ggml.tokens" not in g.fields:
        raise ModelLoadError(f"{path} has no tokenizer metadata and no tokenizer.json beside it")
    key = ("gguf", str(path.resolve()), _stat_key([path]))
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = gguf_tokenizer(g)
    return _TOKENIZERS[key], eos
