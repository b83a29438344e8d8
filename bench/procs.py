"""Process plumbing for the harness: peak-RSS monitoring of a process tree, running one benchmark
step in its own subprocess, and starting/stopping an HTTP server under test.

Peak RSS is taken two ways and the larger is kept: a sampler that sums RSS over the process and its
children every few milliseconds (catches multi-process servers), and the kernel's ru_maxrss from
os.wait4 on the child (exact for the single biggest process, catches spikes between samples).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

REPO_ROOT = Path(__file__).resolve().parents[1]
LOG_DIR = REPO_ROOT / ".cache" / "bench" / "logs"
MIB = 1 << 20


def thread_env(threads: int) -> dict[str, str]:
    """Environment that pins every numeric library to `threads` threads (same for every engine)."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TORCH_NUM_THREADS",
                "DISTILLERY_THREADS", "LLAMA_NUM_THREADS"):
        env[var] = str(threads)
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["HF_HUB_OFFLINE"] = "1"  # no engine may reach a hub during the benchmark
    env["TRANSFORMERS_OFFLINE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tree_rss(proc: psutil.Process, field: str = "rss") -> int:
    """RSS (or another psutil memory_info field) of a process plus all its descendants, in bytes
    (processes that vanish count as 0)."""
    total = 0
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += getattr(p.memory_info(), field)
    return total


class RssMonitor:
    """Samples the RSS of a process tree on a thread; `peak` is the largest sum seen. `interval_s` may be changed
    while it runs (ServerUnderTest slows it once the server is ready)."""

    def __init__(self, pid: int, interval_s: float = 0.05) -> None:
        self._proc = psutil.Process(pid)
        self.interval_s = interval_s
        self._stop = threading.Event()
        self.peak = 0
        self.last = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> RssMonitor:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.last = tree_rss(self._proc)
            self.peak = max(self.peak, self.last)
            self._stop.wait(self.interval_s)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(timeout=2)
        return self.peak


def _wait4(proc: subprocess.Popen[Any], timeout_s: float) -> tuple[int | None, int]:
    """Wait for the child, returning (exit code, ru_maxrss bytes); (None, 0) on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, int(usage.ru_maxrss) * 1024  # Linux reports KiB
        if time.monotonic() > deadline:
            return None, 0
        time.sleep(0.05)


def _kill_group(proc: subprocess.Popen[Any]) -> None:
    """Stop a child we started in its own session, and everything it started, politely then firmly."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return
            time.sleep(0.1)


@dataclass
class StepResult:
    """What a subprocess step returned, plus how much memory it took."""

    ok: bool
    result: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    peak_rss_mb: float | None = None
    wall_s: float = 0.0
    log: str | None = None

    def as_dict(self) -> dict[str, Any]:
        out = dict(self.result)
        out.update({"peak_rss_mb": self.peak_rss_mb, "step_wall_s": round(self.wall_s, 2)})
        if self.error:
            out["error"] = self.error
        if self.log:
            out["log"] = self.log
        return out


def run_step(name: str, step: str, args: dict[str, Any], *, threads: int, timeout_s: float) -> StepResult:
    """Run `python -m bench.steps STEP` with `args` in a fresh process; never raises.

    The child writes its result as JSON to a file; any crash, timeout or error becomes
    StepResult(ok=False, error=...) with the tail of its log, so one broken peer does not stop the rest.
    """
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log_path = LOG_DIR / f"{name}.log"
    out_path = LOG_DIR / f"{name}.result.json"
    out_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "bench.steps", step, "--args", json.dumps(args), "--out", str(out_path)]
    t0 = time.monotonic()
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=thread_env(threads), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        monitor = RssMonitor(proc.pid).start()
        code, maxrss = _wait4(proc, timeout_s)
        if code is None:
            _kill_group(proc)
            code = proc.returncode
        peak = max(monitor.stop(), maxrss)
    wall = time.monotonic() - t0
    rss_mb = round(peak / MIB, 1) if peak else None
    if out_path.exists():
        payload = json.loads(out_path.read_text())
        if payload.get("error"):
            return StepResult(False, payload.get("result", {}), payload["error"], rss_mb, wall, str(log_path))
        return StepResult(True, payload.get("result", {}), None, rss_mb, wall, str(log_path))
    reason = f"timed out after {timeout_s:.0f}s" if wall >= timeout_s else f"exited with code {code}"
    return StepResult(False, {}, f"{reason}; log tail: {tail(log_path)}", rss_mb, wall, str(log_path))


def tail(path: Path, lines: int = 6) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


# ServerUnderTest's RSS sampling once the server is ready. Every sample scans the process table (psutil's
# children()): at RssMonitor's 50 ms that took 3.2% of a CPU, on the 2 vCPUs the server under load shares with it,
# and each wake-up preempts one of the engine's two OpenMP threads, which the other then waits for at the next
# barrier (measured in-process: a competitor busy 1 ms in 20 cost the 8-user closed loop ~8%). Loading, where the
# peak comes, keeps the fast sampling; under load the RSS grows by KV pages, slowly, and the main process's own
# peak (ru_maxrss at exit) is counted as well.
SERVING_RSS_INTERVAL_S = 1.0


class ServerUnderTest:
    """An HTTP server started as a subprocess (its own session), watched for RSS (SERVING_RSS_INTERVAL_S once
    ready), stopped at exit."""

    def __init__(self, name: str, cmd: list[str], ready_url: str, *, threads: int,
                 ready_timeout_s: float = 600.0, env: dict[str, str] | None = None) -> None:
        self.extra_env = env or {}
        self.name = name
        self.cmd = cmd
        self.ready_url = ready_url
        self.threads = threads
        self.ready_timeout_s = ready_timeout_s
        self.load_s: float | None = None
        self.peak_rss_mb: float | None = None
        self.rss_after_load_mb: float | None = None
        self.rss_file_after_load_mb: float | None = None
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.log_path = LOG_DIR / f"{name}.log"
        self._proc: subprocess.Popen[Any] | None = None
        self._monitor: RssMonitor | None = None
        self._log: Any = None

    def __enter__(self) -> ServerUnderTest:
        self._log = self.log_path.open("w")
        t0 = time.monotonic()
        self._proc = subprocess.Popen(self.cmd, cwd=REPO_ROOT, env={**thread_env(self.threads), **self.extra_env},
                                      stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        self._monitor = RssMonitor(self._proc.pid).start()
        try:
            self._wait_ready(t0)
        except BaseException:
            self.__exit__()  # `with` does not call __exit__ when __enter__ raises: never leak the server
            raise
        self.load_s = round(time.monotonic() - t0, 2)
        self._monitor.interval_s = SERVING_RSS_INTERVAL_S
        self.rss_after_load_mb = round(tree_rss(psutil.Process(self._proc.pid)) / MIB, 1)
        # file-backed + shared resident pages (e.g. weights still mmapped from safetensors)
        self.rss_file_after_load_mb = round(tree_rss(psutil.Process(self._proc.pid), "shared") / MIB, 1)
        return self

    def _wait_ready(self, t0: float) -> None:
        assert self._proc is not None
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with code {self._proc.returncode} before it was "
                                   f"ready; log tail: {tail(self.log_path)}")
            if time.monotonic() - t0 > self.ready_timeout_s:
                raise RuntimeError(f"{self.name} not ready after {self.ready_timeout_s:.0f}s; "
                                   f"log tail: {tail(self.log_path)}")
            if _http_ok(self.ready_url):
                return
            time.sleep(0.25)

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __exit__(self, *exc: object) -> None:
        if self._proc is None:
            return
        assert self._monitor is not None
        peak = self._monitor.peak
        maxrss = 0
        if self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGTERM)
            code, maxrss = _wait4(self._proc, 15.0)
            if code is None:
                _kill_group(self._proc)
        self.peak_rss_mb = round(max(self._monitor.stop(), peak, maxrss) / MIB, 1)
        if self._log:
            self._log.close()


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - 127.0.0.1 only
            return 200 <= resp.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False
