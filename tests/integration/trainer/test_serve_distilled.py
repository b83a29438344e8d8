"""The runtime serves the distilled student's pre-quantized artifact unchanged (--prequantized) and reports
its lineage in /v1/models (the OpenAI list, which KServe V1 clients read too) and in the model's card."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from distillery_contract import flags
from distillery_contract.distillation import QUANTIZED_SUBDIR
from tests.reference import REPO_ROOT

pytestmark = pytest.mark.integration
MODEL = "distilled"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def served(distilled, tmp_path_factory):
    port = _free_port()
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    cmd = [sys.executable, "-m", "model_runtime", f"{flags.FLAG_MODEL_NAME}={MODEL}",
           f"{flags.FLAG_MODEL_DIR}={distilled.output / QUANTIZED_SUBDIR}", flags.FLAG_PREQUANTIZED,
           "--http_host=127.0.0.1", f"{flags.FLAG_HTTP_PORT}={port}", "--enable_grpc=false",
           f"{flags.FLAG_MAX_MODEL_LEN}=64", f"{flags.FLAG_DEVICE}=cpu"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(base + flags.HEALTH_READY_PATH_TEMPLATE.format(model_name=MODEL), timeout=1).is_success:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        else:
            pytest.fail(f"runtime not ready (exit {proc.poll()}):\n{log_path.read_text()[-4000:]}")
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_models_report_the_lineage(served, distilled):
    listed = httpx.get(f"{served}/v1/models").json()
    assert listed["models"] == [MODEL]  # KServe V1's shape still there
    card = listed["data"][0]
    assert card["id"] == MODEL
    assert card["lineage"]["teacher"]["uri"] == "pvc://models/teacher"
    assert card["lineage"]["weights"] == distilled.lineage["weights"]
    assert card["lineage"]["quantized"]["weights"] == distilled.lineage["quantized"]["weights"]
    assert httpx.get(f"{served}/openai/v1/models/{MODEL}").json()["lineage"] == card["lineage"]


def test_the_distilled_student_answers(served):
    resp = httpx.post(f"{served}/openai/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": [{"role": "user", "content": "Where is my order?"}], "max_tokens": 4})
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] >= 1
