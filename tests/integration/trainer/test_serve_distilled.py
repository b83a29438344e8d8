"""The runtime serves the distilled student's pre-quantized artifact unchanged (--prequantized) and reports
its lineage in /v1/models (the OpenAI list, which KServe V1 clients read too) and in the model's card."""

from __future__ import annotations

import httpx
import pytest

from distillery_contract import flags
from distillery_contract.distillation import QUANTIZED_SUBDIR
from tests.live_runtime import live_runtime

pytestmark = pytest.mark.integration
MODEL = "distilled"


@pytest.fixture(scope="module")
def served(distilled, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    with live_runtime(distilled.output / QUANTIZED_SUBDIR, MODEL, log_path, dtype=None,
                      extra=[flags.FLAG_PREQUANTIZED, f"{flags.FLAG_MAX_MODEL_LEN}=64"]) as base:
        yield base


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
