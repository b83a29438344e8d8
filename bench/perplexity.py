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


def stored_decode_bytes(model: Any) -> dict[str, int]:
    """Bytes of every tensor the model holds (parameters, buffers and tensor attributes of modules,
    deduplicated by storage), split into the embedding table and the rest."""
    import torch

    seen: set[tuple[int, int]] = set()
    embed_bytes = 0
    other_bytes = 0
    embed_ptrs: set[int] = set()
    for name, module in model.named_modules():
        tensors = list(module._parameters.values()) + list(module._buffers.values())
        # tensor attributes (e.g. packed quantized weights); not the rope cos/sin tables, which a
        # decode step indexes one row of
        tensors += [v for k, v in vars(module).items() if isinstance(v, torch.Tensor) and not k.startswith("rope")]
        is_embed = isinstance(module, torch.nn.Embedding) or name.endswith(("embed_tokens", "wte", "tok_embeddings"))
        for t in tensors:
            if t is None or not isinstance(t, torch.Tensor):
                continue
            key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            if key in seen:
                continue
            seen.add(key)
            nbytes = t.untyped_storage().nbytes()
            if is_embed:
                embed_bytes += nbytes
                embed_ptrs.add(key[0])
            else:
                other_bytes += nbytes
    lm_head = getattr(model, "lm_head", None)
    tied = lm_head is not None and getattr(lm_head, "weight", None) is not None and \
        lm_head.weight.untyped_storage().data_ptr() in embed_ptrs
    # a tied lm_head reads the whole embedding table every step
    decode_bytes = other_bytes + (embed_bytes if tied else 0)
    return {"embedding_bytes": embed_bytes, "decode_bytes_per_token": decode_bytes, "tied_lm_head": tied}


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
