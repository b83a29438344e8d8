"""lm-evaluation-harness as a real client of the runtime: the two tiny tasks shipped in tests/lm_eval_tasks
(multiple choice: log-likelihoods; generation: greedy generate_until with stop strings, exact match) run
through lm-eval's `local-completions` model against a live server, and through lm-eval's `hf` model on the
same checkpoint (tiny random Qwen2, float32, with the real R1 tokenizer); both must score every request the
same. Nothing is downloaded: the tasks read local JSON-lines files, the checkpoint is built here.

`local-completions` sends what it sends to vLLM: token-id prompts, several per request (batch_size), with
`echo`, `logprobs: 1`, `max_tokens: 1` for log-likelihoods, and a list of `stop` strings for generation,
with requests in flight concurrently.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lm_eval  # the dev extra installs it (make venv)
import pytest

from distillery_contract import flags
from tests.live_runtime import REPO, live_runtime

pytestmark = pytest.mark.integration

MODEL = "tiny-r1"
TASKS_DIR = REPO / "tests" / "lm_eval_tasks"
MC, GEN = "distillery_tiny_mc", "distillery_tiny_gen"
# float32 on both sides; the runtime's kernels add in another order than transformers'
LOGLIK_ABS_TOL = 1e-4
# the task's own: generation is compared with them, then with stop strings taken from hf's output
TASK_UNTIL = ["\n", "Q:"]


@pytest.fixture(scope="module")
def offline() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            mp.setenv(var, "1")
        yield


@pytest.fixture(scope="module")
def task_manager(offline):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR))


def evaluate(model: str, model_args: dict[str, Any], task_manager, tasks: list[str],
             gen_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    result = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks,
                                     task_manager=task_manager, log_samples=True, gen_kwargs=gen_kwargs)
    assert result is not None
    return result


def by_doc(result: dict[str, Any], task: str) -> dict[int, Any]:
    """Each document's responses: per choice [(loglikelihood, is_greedy)], or [generated text]."""
    return {s["doc_id"]: [r[0] for r in s["resps"]] for s in result["samples"][task]}


@pytest.fixture(scope="module")
def hf_result(tiny_qwen2_dir: Path, task_manager) -> dict[str, Any]:
    # lm-eval's default tokenization on both sides (add_bos_token unset): set on hf only, it would load the
    # tokenizer with a BOS-adding post-processor while local-completions' tokenizer adds none
    args = {"pretrained": str(tiny_qwen2_dir), "dtype": "float32", "device": "cpu"}
    return evaluate("hf", args, task_manager, [MC, GEN])


@pytest.fixture(scope="module")
def runtime(tiny_qwen2_dir: Path, tmp_path_factory, offline) -> Iterator[dict[str, Any]]:
    extra = [f"{flags.FLAG_MAX_MODEL_LEN}=512", f"{flags.FLAG_MAX_BATCH_SIZE}=4"]
    log = tmp_path_factory.mktemp("runtime") / "server.log"
    with live_runtime(tiny_qwen2_dir, MODEL, log, extra) as base:
        # lm-eval's defaults but for: several prompts per request and two requests in flight (what a
        # user sets to go faster), one retry (a refused request fails the test instead of being retried)
        yield {"model": MODEL, "base_url": f"{base}/v1/completions", "tokenizer": str(tiny_qwen2_dir),
               "tokenizer_backend": "huggingface", "batch_size": 4,
               "num_concurrent": 2, "max_retries": 1}


def test_hf_baseline_scores_every_document(hf_result):
    """The reference side itself: every document scored, finite log-likelihoods, generations not empty
    (a vacuous baseline would make the comparisons below pass for nothing)."""
    mc, gen = by_doc(hf_result, MC), by_doc(hf_result, GEN)
    assert len(mc) == 8 and all(len(choices) == 4 for choices in mc.values())
    assert all(math.isfinite(ll) and ll < 0 for choices in mc.values() for ll, _ in choices)
    assert len(gen) == 8 and all(texts[0] for texts in gen.values())


def test_multiple_choice_loglikelihoods_equal_hf(hf_result, runtime, task_manager):
    served = evaluate("local-completions", runtime, task_manager, [MC])
    want, got = by_doc(hf_result, MC), by_doc(served, MC)
    assert got.keys() == want.keys()
    for doc, choices in want.items():
        for (ll_hf, greedy_hf), (ll_rt, greedy_rt) in zip(choices, got[doc], strict=True):
            assert ll_rt == pytest.approx(ll_hf, abs=LOGLIK_ABS_TOL), (doc, choices, got[doc])
            assert greedy_rt == greedy_hf, (doc, choices, got[doc])
    assert served["results"][MC]["acc,none"] == hf_result["results"][MC]["acc,none"]
    assert served["results"][MC]["acc_norm,none"] == hf_result["results"][MC]["acc_norm,none"]


def cut(text: str, until: list[str]) -> str:
    """What lm-eval's hf model does with a generation and stop strings."""
    for stop in until:
        text = text.split(stop)[0]
    return text


def test_generation_equals_hf(hf_result, runtime, task_manager):
    want = {doc: texts[0] for doc, texts in by_doc(hf_result, GEN).items()}
    served = evaluate("local-completions", runtime, task_manager, [GEN])
    assert {doc: texts[0] for doc, texts in by_doc(served, GEN).items()} == want
    assert served["results"][GEN]["exact_match,none"] == hf_result["results"][GEN]["exact_match,none"]

    # stop strings the model does produce (from the middle of hf's texts), so the server has to cut
    stops = sorted({t[len(t) // 2: len(t) // 2 + 3] for t in want.values() if len(t) >= 6})
    assert stops
    until = [*TASK_UNTIL, *stops]
    expected = {doc: cut(text, until) for doc, text in want.items()}
    assert any(expected[doc] != text for doc, text in want.items())
    served = evaluate("local-completions", runtime, task_manager, [GEN], gen_kwargs={"until": until})
    assert {doc: texts[0] for doc, texts in by_doc(served, GEN).items()} == expected
