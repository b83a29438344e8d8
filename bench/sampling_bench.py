"""Per-row cost of choosing a token over the R1 vocabulary (151,936 logits) with and without sampling controls.

What the engine thread pays per running request per step in _sample_and_emit besides the forward: the batch's
one max-reduction (greedy token + poison check), then RequestSampler.choose (the raw argmax, or the nucleus
sampler), and for requests that set controls the row edit (logit_bias, penalties at the request's own token ids,
min_tokens mask) and for those that asked the log-probabilities. A request without controls must cost what it
cost before controls existed. Single-threaded torch, the best of a few repeats (the machine is shared).

    .venv/bin/python -m bench.sampling_bench
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import torch

from model_runtime.sampling import RequestSampler, SamplingParams, token_logprobs

VOCAB = 151936
CONTROLS: dict[str, Any] = {"presence_penalty": 0.5, "frequency_penalty": 0.5, "repetition_penalty": 1.1,
                            "logit_bias": {5: 1.0, 77: -2.0}, "min_tokens": 100}
CASES: dict[str, dict[str, Any]] = {
    "greedy": {"temperature": 0.0},
    "greedy + controls": {"temperature": 0.0, **CONTROLS},
    "sampled (t 0.6, top_p 0.95)": {"temperature": 0.6, "top_p": 0.95, "seed": 1},
    "sampled + controls": {"temperature": 0.6, "top_p": 0.95, "seed": 1, **CONTROLS},
    "sampled + top_k 50 + min_p 0.05": {"temperature": 0.6, "top_p": 0.95, "top_k": 50, "min_p": 0.05, "seed": 1},
}


def best_ms(fn: Callable[[], object], n: int, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - start) / n * 1e3)
    return best


def run(prompt_len: int = 500, generated: int = 200) -> dict[str, float]:
    torch.set_num_threads(1)
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(0)) * 3
    out: dict[str, float] = {}
    for name, kw in CASES.items():
        s = RequestSampler(SamplingParams(1024, **kw), list(range(prompt_len)), {151643}, torch.device("cpu"))
        for t in range(generated):  # a request some way into its answer: penalties have tokens to act on
            s.observe(1000 + 7 * t)

        def step(s: RequestSampler = s) -> None:
            best = logits.max(dim=-1)
            torch.isfinite(best.values).tolist()
            s.observe(s.choose(logits[0], int(best.indices[0]), generated))

        out[f"{name} ms/row"] = round(best_ms(step, 100 if kw["temperature"] == 0 else 30), 3)
    for k in (0, 5):
        out[f"logprobs (top {k}) ms/row"] = round(best_ms(lambda k=k: token_logprobs(logits, [1], k), 50), 3)
    return out


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
