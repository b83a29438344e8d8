"""In-process peers, each run inside a bench.steps subprocess: transformers `generate` and llama.cpp.

Both decode greedily from the same prompt for exactly `new_tokens` tokens and time every token, so
their decode rate ((n-1) / (last - first)) and time to first token compare with the HTTP figures.
"""

from __future__ import annotations

import time
from typing import Any

from bench.stats import decode_rate, percentile


def hf_generate(model_dir: str, dtype: str, prompt: str, new_tokens: int, repeats: int,
                threads: int) -> dict[str, Any]:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(threads)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype)
    model.eval()
    load_s = time.perf_counter() - t0

    class Clock(BaseStreamer):
        """Records the time of every generated token (the first put() is the prompt)."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self._prompt_seen = False

        def put(self, value: Any) -> None:
            if not self._prompt_seen:
                self._prompt_seen = True
                return
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    ids = tok(prompt, return_tensors="pt")

    def run(n: int) -> tuple[float, list[float]]:
        clock = Clock()
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(**ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=clock,
                           pad_token_id=tok.pad_token_id or tok.eos_token_id)
        return start, clock.times

    run(4)  # warm-up
    rates, ttfts = [], []
    for _ in range(repeats):
        start, times = run(new_tokens)
        if (rate := decode_rate(times)) is not None:
            rates.append(rate)
        if times:
            ttfts.append(times[0] - start)
    return {
        "engine": "transformers-generate", "mode": dtype, "version": transformers.__version__,
        "load_s": round(load_s, 2),
        "single_stream": {
            "decode_tok_s": _r(percentile(rates, 50)), "decode_tok_s_runs": [_r(r) for r in rates],
            "ttft_s": _r(percentile(ttfts, 50), 4), "completion_tokens": [new_tokens] * len(rates),
        },
    }


def llamacpp_generate(gguf: str, prompt: str, new_tokens: int, repeats: int, threads: int) -> dict[str, Any]:
    import llama_cpp

    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=gguf, n_threads=threads, n_threads_batch=threads,
                          n_ctx=max(512, new_tokens + 256), verbose=False)
    load_s = time.perf_counter() - t0
    tokens = llm.tokenize(prompt.encode(), add_bos=False, special=False)

    def run(n: int) -> tuple[float, list[float]]:
        llm.reset()
        times: list[float] = []
        start = time.perf_counter()
        # greedy: temp 0; reset=True re-evaluates the prompt (KV of an earlier run is discarded above)
        for _tok in llm.generate(tokens, temp=0.0, top_k=1, reset=True):
            times.append(time.perf_counter())
            if len(times) >= n:
                break
        return start, times

    run(4)
    rates, ttfts, counts = [], [], []
    for _ in range(repeats):
        start, times = run(new_tokens)
        counts.append(len(times))
        if (rate := decode_rate(times)) is not None:
            rates.append(rate)
        if times:
            ttfts.append(times[0] - start)
    return {
        "engine": "llama.cpp", "version": getattr(llama_cpp, "__version__", "?"),
        "load_s": round(load_s, 2),
        "single_stream": {
            "decode_tok_s": _r(percentile(rates, 50)), "decode_tok_s_runs": [_r(r) for r in rates],
            "ttft_s": _r(percentile(ttfts, 50), 4), "completion_tokens": counts,
        },
    }


def _r(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)
