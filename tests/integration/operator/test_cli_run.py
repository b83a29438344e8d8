"""`distillery run` as a process, the way a cluster runs it: it logs in through a kubeconfig, serves its
liveness and metrics endpoints, reconciles, and stops cleanly (exit 0) on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=2) as response:
        return response.read().decode()


def start_operator(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "distillery_operator.cli", "run", "--all-namespaces",
                                 "--standalone"], env=env, stdout=out, stderr=subprocess.STDOUT)


async def test_distillery_run_reconciles_serves_probes_and_stops_on_sigterm(cluster, sample_dm, tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "emu",
        "clusters": [{"name": "emu", "cluster": {"server": cluster.url}}],
        "users": [{"name": "emu", "user": {}}],
        "contexts": [{"name": "emu", "context": {"cluster": "emu", "user": "emu"}}],
    }))
    liveness, metrics = free_port(), free_port()
    env = dict(os.environ, KUBECONFIG=str(kubeconfig), DISTILLERY_LIVENESS_PORT=str(liveness),
               DISTILLERY_METRICS_PORT=str(metrics), DISTILLERY_LOG_FORMAT="json", DISTILLERY_LOG_LEVEL="INFO")
    log = tmp_path / "operator.log"
    proc = start_operator(env, log)
    try:
        await cluster.apply(sample_dm("r1-cli"))
        await cluster.eventually(lambda: cluster.isvc("r1-cli"), timeout=30, what="the child, made by `distillery run`")
        await cluster.eventually(lambda: cluster.phase("r1-cli") == "Deploying", what="the status")
        assert await asyncio.to_thread(fetch, f"http://127.0.0.1:{liveness}/healthz")
        text = await asyncio.to_thread(fetch, f"http://127.0.0.1:{metrics}/metrics")
        assert 'distillery_operator_reconciles_total{result="created",trigger="create"} 1.0' in text
    finally:
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 30)
    assert code == 0, log.read_text()[-2000:]
    assert '"message"' in log.read_text(), "JSON log lines"
