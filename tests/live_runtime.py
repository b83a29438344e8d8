"""A real runtime server (`python -m model_runtime` on a tiny model) on a free loopback port, for tests of
the things that talk to it from outside: the evaluation runner, Prometheus scraping its /metrics, the
distilled student's artifact.

A plain context manager (the runtime's own tests keep their module fixture in test_server.py); it waits
for liveness and readiness, and always stops the server (SIGTERM, then kill).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx

from distillery_contract import flags

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def live_runtime(model_dir: Path, model_name: str, log_path: Path, extra: Sequence[str] = (),
                 start_timeout_s: float = 120.0, dtype: str | None = "float32") -> Iterator[str]:
    """Serve `model_dir` as `model_name` on CPU (float32, or `dtype`; None: the model's own, as a
    pre-quantized artifact needs); yields the base URL http://127.0.0.1:PORT."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "model_runtime",
        f"{flags.FLAG_MODEL_NAME}={model_name}", f"{flags.FLAG_MODEL_DIR}={model_dir}",
        "--http_host=127.0.0.1", f"{flags.FLAG_HTTP_PORT}={port}", "--enable_grpc=false",
        f"{flags.FLAG_DEVICE}=cpu", *([f"{flags.FLAG_DTYPE}={dtype}"] if dtype else []), *extra,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    base = f"http://127.0.0.1:{port}"
    ready_path = flags.HEALTH_READY_PATH_TEMPLATE.format(model_name=model_name)
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"runtime not ready (exit {proc.poll()}):\n{log_path.read_text()[-4000:]}")
            try:
                if (httpx.get(base + flags.HEALTH_LIVE_PATH, timeout=1).status_code == 200
                        and httpx.get(base + ready_path, timeout=1).status_code == 200):
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
