"""The engine under closed-loop load, in-process: U users each submitting a prompt of random tokens and waiting
for its completion, again and again, for S seconds; no HTTP and no load client beside the engine (what guidellm
measures through the server, minus the client's share of the machine).

    python -m bench.closed_loop --mode int8 --users 8 --seconds 45 [--budget 64] [--sampled]

Prints output tokens/s (every delivered token over the wall time), TTFT and inter-token latency medians.
"""

from __future__ import annotations

import argparse
import random
import statistics
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(model_dir: str, mode: str, users: int, seconds: float, *, budget: int | None = None, prompt_tokens: int = 256,
        output_tokens: int = 128, sampled: bool = False) -> dict[str, float]:
    from model_runtime.engine import Engine, EngineConfig, SamplingParams, TokenEvent
    from model_runtime.loader import load_model

    loaded = load_model(model_dir, quantization=mode, device="cpu", max_model_len=4096)
    config = EngineConfig(max_batch_size=max(8, users), max_model_len=4096)
    if budget:
        config.max_num_batched_tokens = budget
    engine = Engine(loaded, config)
    engine.start()
    rng = random.Random(0)
    lock = threading.Lock()
    delivered = 0
    ttfts: list[float] = []
    itls: list[float] = []
    stop = time.monotonic() + seconds
    params = (SamplingParams(max_tokens=output_tokens, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05,
                             ignore_eos=True) if sampled else
              SamplingParams(max_tokens=output_tokens, temperature=0.0, ignore_eos=True))

    def user(u: int) -> None:
        nonlocal delivered
        n = 0
        while time.monotonic() < stop:
            done = threading.Event()
            last = [time.monotonic()]
            started = [False]

            def deliver(event: TokenEvent, done: threading.Event = done, last: list[float] = last,
                        started: list[bool] = started) -> None:
                nonlocal delivered
                now = time.monotonic()
                with lock:
                    (itls if started[0] else ttfts).append(now - last[0])
                    if event.token_id is not None:
                        delivered += 1
                started[0], last[0] = True, now
                if event.finish_reason is not None:
                    done.set()

            with lock:
                prompt = [rng.randrange(1000, 30000) for _ in range(prompt_tokens)]
            engine.submit(prompt, params, f"u{u}-{n}", deliver)
            if not done.wait(300):
                raise TimeoutError(f"user {u}: no completion in 300 s")
            n += 1

    t0 = time.monotonic()
    threads = [threading.Thread(target=user, args=(u,)) for u in range(users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    engine.stop()
    return {"users": users, "budget": config.max_num_batched_tokens, "output_tok_s": round(delivered / wall, 1),
            "wall_s": round(wall, 1), "ttft_s_median": round(statistics.median(ttfts), 3),
            "itl_ms_median": round(statistics.median(itls) * 1e3, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_dir", default=str(REPO / "models" / "qwen2.5-0.5b-st"))
    p.add_argument("--mode", default="int8", choices=["none", "int8", "int4"])
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--seconds", type=float, default=45.0)
    p.add_argument("--budget", type=int, default=None, help="max_num_batched_tokens (default: the engine's)")
    p.add_argument("--sampled", action="store_true", help="temperature 0.7, top-p 0.8, top-k 20, penalty 1.05")
    a = p.parse_args()
    print(run(a.model_dir, a.mode, a.users, a.seconds, budget=a.budget, sampled=a.sampled))


if __name__ == "__main__":
    main()
