"""`distillery-eval` against the real runtime (tiny random Qwen2 with the real R1 tokenizer) on the dataset
shipped in the repository: the answers are noise, so the score is only bounded; what is checked is that
the runner talks to a real OpenAI-compatible server end to end — every request answered and counted by
the runtime, repeats, the JSON result's shape and size, the latency figures, both of the runtime's API
prefixes. What the server is asked (R1's rules) is checked exactly on the stub in tests/unit/evaluation."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

from distillery_contract import flags, metric_names
from distillery_operator.evaluation.result import RESULT_LIMIT_BYTES
from tests.live_runtime import REPO, live_runtime
from tests.runtime_fixtures import build_tiny_qwen2_dir

pytestmark = pytest.mark.integration

MODEL = "tiny-r1"
DATASET = REPO / "operator" / "distillery_operator" / "evaluation" / "examples" / "arith.jsonl"


@pytest.fixture(scope="module")
def runtime(tmp_path_factory, r1_tokenizer_dir):
    model_dir = build_tiny_qwen2_dir(tmp_path_factory.mktemp("tiny-qwen2"), r1_tokenizer_dir)
    extra = [f"{flags.FLAG_MAX_MODEL_LEN}=512", f"{flags.FLAG_MAX_BATCH_SIZE}=4", flags.FLAG_THINK_PREFIX,
             flags.FLAG_SEPARATE_REASONING]
    with live_runtime(model_dir, MODEL, tmp_path_factory.mktemp("runtime") / "server.log", extra) as base:
        yield base


def served_ok(base: str) -> float:
    """Requests the runtime answered with 200, over every endpoint."""
    text = httpx.get(base + flags.METRICS_PATH, timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(metric_names.METRIC_REQUESTS_TOTAL + "{") and 'status="200"' in line)


def run_eval(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "distillery_operator.evaluation.cli", "--model", MODEL,
           "--dataset", str(DATASET), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)


def test_eval_against_the_live_runtime(runtime, tmp_path):
    before = served_ok(runtime)
    output = tmp_path / "termination-log"
    proc = run_eval("--endpoint", runtime, "--scorer", "boxed", "--limit", "3", "--repeats", "2",
                    "--max-tokens", "8", "--concurrency", "2", "--min-score", "0.5", "--output", str(output))
    assert proc.returncode == 0, proc.stderr
    assert len(output.read_bytes()) <= RESULT_LIMIT_BYTES
    result = json.loads(output.read_text())
    assert set(result) == {"model", "scorer", "examples", "repeats", "score", "scoreStdDev", "scores",
                           "latencySeconds", "requests", "errors", "durationSeconds", "minScore", "passed"}
    assert (result["model"], result["scorer"]) == (MODEL, "boxed")
    assert (result["examples"], result["repeats"]) == (3, 2)
    assert (result["requests"], result["errors"]) == (6, 0)
    assert len(result["scores"]) == 2  # each a share of 3 questions
    assert all(s * 3 == pytest.approx(round(s * 3)) for s in result["scores"])
    assert 0 <= result["score"] <= 1 and result["scoreStdDev"] >= 0
    assert result["passed"] is (result["score"] >= 0.5)
    lat = result["latencySeconds"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= result["durationSeconds"]
    # every answer came from the runtime (six 200s more), and each one is in the log with what was extracted
    assert served_ok(runtime) - before == 6
    items = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"repeat"')]
    assert sorted((i["repeat"], i["line"]) for i in items) == [(r, n) for r in (1, 2) for n in (1, 2, 3)]
    assert all(i["error"] is None and i["latency_s"] > 0 for i in items)


def test_eval_on_the_openai_prefix_with_another_scorer(runtime):
    proc = run_eval("--endpoint", f"{runtime}/openai/v1", "--scorer", "contains", "--limit", "2",
                    "--max-tokens", "4")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (result["scorer"], result["requests"], result["errors"]) == ("contains", 2, 0)
    assert result["passed"] is None  # no --min-score


def test_a_model_the_runtime_does_not_serve_is_an_error(runtime):
    proc = subprocess.run([sys.executable, "-m", "distillery_operator.evaluation.cli", "--endpoint", runtime,
                           "--model", "not-there", "--dataset", str(DATASET)],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 1
    assert "'not-there' is not served" in proc.stderr and MODEL in proc.stderr
