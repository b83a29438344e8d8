"""Perplexity of our runtime's model on the fixed text (bench/ppl_text.py), per quantization mode.

Runs in a bench.steps subprocess: loads the model with model_runtime.loader.load_model (the same
code the server uses), scores the text in non-overlapping windows (each window's first token is
context only), and reports perplexity = exp(mean negative log-likelihood). It also counts the weight
bytes the loaded model actually stores for one decode step (everything but the embedding table,
lm_head included even when tied), to cross-check the bandwidth-bound arithmetic.
"""

from __future__ import annotations

import math
import time
from typing import Any


def window_slices(n_tokens: int, window: int) -> list[tuple[int, int]]:
    """Non-overlapping [start, end) windows covering n_tokens; a last window shorter than 2 is dropped
    (it would score nothing)."""
    if window < 2:
        raise ValueError("window must be at least 2 tokens")
    out = []
    for start in range(0, n_tokens, window):
        end = min(start + window, n_tokens)
        if end - start >= 2:
            out.append((start, end))
    return out


def relative_rise(ppl: float, baseline: float) -> float:
    """(ppl - baseline) / baseline: 0.01 means 1% worse than the baseline."""
    return (ppl - baseline) / baseline


def _forward_all_logits(model: Any, x: Any) -> Any:
    """[1, T] ids -> [1, T, vocab] logits through the runtime's Transformer (fresh KV cache per window)."""
    import inspect

    import torch

    params = inspect.signature(model.forward).parameters
    if "positions" in params:  # model_runtime.model.Transformer(input_ids, positions, cache, slots, ...)
        T = x.shape[1]
        cache = model.new_cache(1, T)
        positions = torch.arange(T, device=x.device)[None, :]
        return model(x, positions, cache, slice(0, 1), kv_len=T, logits="all")
    return _logits_of(model(x))


def _logits_of(output: Any) -> Any:
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)):
        return output[0]
    return output


def _module_tensors(module: Any) -> list[Any]:
    import torch

    tensors = list(module._parameters.values()) + list(module._buffers.values())
    # tensor attributes (e.g. packed quantized weights); not the rope cos/sin tables, which a
    # decode step indexes one row of
    tensors += [v for k, v in vars(module).items() if isinstance(v, torch.Tensor) and not k.startswith("rope")]
    return [t for t in tensors if isinstance(t, torch.Tensor)]


def _is_embedding(name: str, module: Any) -> bool:
    import torch

    # nn.Embedding, our Int8Embedding/Int4Embedding, and the usual names of other implementations
    return isinstance(module, torch.nn.Embedding) or type(module).__name__.endswith("Embedding") or \
        name.endswith(("embed_tokens", "wte", "tok_embeddings"))


def stored_decode_bytes(model: Any) -> dict[str, int]:
    """Bytes of every tensor the model holds (parameters, buffers and tensor attributes of modules,
    deduplicated by storage), split into the embedding table (a decode step reads one row of it)
    and what a decode step reads whole: everything else, including an lm_head that shares its
    storage with the embedding (tied float weights, or a tied int8 head whose codes are the table)."""
    def key(t: Any) -> tuple[int, int]:
        return t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()

    embed: dict[tuple[int, int], int] = {}
    other: dict[tuple[int, int], int] = {}
    for name, module in model.named_modules():
        target = embed if _is_embedding(name, module) else other
        for t in _module_tensors(module):
            target.setdefault(key(t), t.untyped_storage().nbytes())
    lm_head = getattr(model, "lm_head", None)
    head_keys = {key(t) for m in (lm_head.modules() if lm_head is not None else []) for t in _module_tensors(m)}
    tied = bool(head_keys & embed.keys())
    read = {k: v for k, v in other.items()} | {k: embed[k] for k in head_keys & embed.keys()}
    embed_only = sum(v for k, v in embed.items() if k not in head_keys)
    return {"embedding_bytes": sum(embed.values()), "embedding_only_bytes": embed_only,
            "decode_bytes_per_token": sum(read.values()), "tied_lm_head": tied}


def runtime_perplexity(model_dir: str, quantization: str, *, max_tokens: int | None = None,
                       window: int = 512, threads: int = 2) -> dict[str, Any]:
    import torch

    from bench.ppl_text import PPL_TEXT
    from model_runtime.loader import load_model

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    loaded = load_model(model_dir, quantization=quantization, device="cpu")
    load_s = time.perf_counter() - t0
    ids = loaded.tokenizer(PPL_TEXT)["input_ids"]
    if max_tokens:
        ids = ids[:max_tokens]
    nll = 0.0
    scored = 0
    t1 = time.perf_counter()
    with torch.inference_mode():
        for start, end in window_slices(len(ids), window):
            x = torch.tensor([ids[start:end]], dtype=torch.long, device=loaded.device)
            logits = _forward_all_logits(loaded.model, x).float()  # [1, T, vocab]
            logp = torch.log_softmax(logits[0, :-1], dim=-1)
            target = x[0, 1:]
            nll -= float(logp.gather(1, target[:, None]).sum())
            scored += int(target.numel())
    return {
        "quantization": quantization,
        "dtype": str(loaded.dtype).replace("torch.", ""),
        "tokens_scored": scored,
        "window": window,
        "nll_mean": nll / scored,
        "perplexity": math.exp(nll / scored),
        "load_s": round(load_s, 2),
        "score_s": round(time.perf_counter() - t1, 2),
        **stored_decode_bytes(loaded.model),
    }
