"""`distillery-eval` against a stub OpenAI server (aiohttp on loopback, in a thread) that answers chosen
replies, so the score is known: half the questions right -> 0.5 with no spread over repeats. The stub
records what it was asked, which shows R1's rules were followed; it can also fail, stall and refuse."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from distillery_operator.evaluation import cli
from distillery_operator.evaluation.dataset import Example, load_dataset
from distillery_operator.evaluation.result import RESULT_LIMIT_BYTES, ItemResult, parse_summary
from distillery_operator.evaluation.runner import (
    EvalConfig,
    percentile,
    r1_messages,
    request_body,
    summarise,
)
from distillery_operator.evaluation.scorers import BOXED_INSTRUCTION, SCORERS
from tests.reference import REPO_ROOT

MODEL = "r1-stub"
DATASET = REPO_ROOT / "operator" / "distillery_operator" / "evaluation" / "examples" / "arith.jsonl"
EXAMPLES = load_dataset(DATASET)
ANSWERS = {e.messages[-1]["content"]: (i, e.answer) for i, e in enumerate(EXAMPLES)}
# (status, body, delay_s) for a request body; the state lets a handler count attempts
Handler = Callable[[dict[str, Any], dict[str, Any]], tuple[int, dict[str, Any], float]]


def question_of(body: dict[str, Any]) -> str:
    return body["messages"][-1]["content"].removesuffix("\n" + BOXED_INSTRUCTION)


def completion(content: str, reasoning: str | None = None) -> dict[str, Any]:
    message = {"role": "assistant", "content": content, "reasoning_content": reasoning}
    return {"id": "x", "object": "chat.completion", "model": MODEL,
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}


def half_right(body: dict[str, Any], state: dict[str, Any]) -> tuple[int, dict[str, Any], float]:
    """The first half of the questions answered right, the rest wrong — with the right answer hidden in the
    reasoning (inline <think> and reasoning_content), which must not count."""
    index, answer = ANSWERS[question_of(body)]
    if index < len(EXAMPLES) // 2:
        reply = f"<think>\nMaybe \\boxed{{0}}? No.\n</think>\n\nSo it is \\boxed{{{answer}}}."
        return 200, completion(reply), 0.0
    return 200, completion(f"<think>it is \\boxed{{{answer}}}</think>\\boxed{{999}}",
                           reasoning=f"it is \\boxed{{{answer}}}"), 0.0


@contextmanager
def openai_stub(handler: Handler, models: tuple[str, ...] = (MODEL,),
                models_status: int = 200) -> Iterator[tuple[str, dict[str, Any]]]:
    state: dict[str, Any] = {"received": [], "in_flight": 0, "max_in_flight": 0, "attempts": Counter()}

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        state["received"].append(body)
        state["attempts"][question_of(body)] += 1
        state["in_flight"] += 1
        state["max_in_flight"] = max(state["max_in_flight"], state["in_flight"])
        try:
            status, payload, delay = handler(body, state)
            if delay:
                await asyncio.sleep(delay)
        finally:
            state["in_flight"] -= 1
        return web.json_response(payload, status=status)

    async def list_models(request: web.Request) -> web.Response:
        state["models_asked"] = state.get("models_asked", 0) + 1
        if models_status != 200:
            return web.json_response({"error": {"message": "model loading"}}, status=models_status)
        return web.json_response({"object": "list", "data": [{"id": m, "object": "model"} for m in models]})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", list_models)
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}", state
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


def run_cli(capsys, endpoint: str, *extra: str, dataset: Path = DATASET) -> tuple[int, str, str]:
    code = cli.main(["--endpoint", endpoint, "--model", MODEL, "--dataset", str(dataset), *extra])
    out, err = capsys.readouterr()
    return code, out, err


def test_half_right_scores_half_with_no_spread_and_follows_r1s_rules(capsys, tmp_path):
    output = tmp_path / "termination-log"
    with openai_stub(half_right) as (url, state):
        code, out, err = run_cli(capsys, url, "--repeats", "3", "--min-score", "0.4", "--output", str(output))
    assert code == 0, err
    result = json.loads(output.read_text())
    assert result == json.loads(out.strip().splitlines()[-1])  # the log carries the same result
    assert len(output.read_bytes()) < RESULT_LIMIT_BYTES
    assert result["score"] == 0.5 and result["scoreStdDev"] == 0.0 and result["scores"] == [0.5, 0.5, 0.5]
    assert (result["examples"], result["repeats"], result["requests"], result["errors"]) == (12, 3, 36, 0)
    assert result["passed"] is True and result["minScore"] == 0.4 and result["scorer"] == "boxed"
    lat = result["latencySeconds"]
    assert set(lat) == {"p50", "p90", "p99"} and 0 < lat["p50"] <= lat["p90"] <= lat["p99"] < 5
    # per-item details only in the log: one JSON line per answer, with what was extracted
    items = [json.loads(line) for line in out.splitlines() if line.startswith('{"repeat"')]
    assert len(items) == 36 and {i["answer"] for i in items if i["score"] == 0} == {"999"}
    assert "score 0.5000 ± 0.0000" in out and "PASSED" in out
    # R1's rules, as the server saw them
    assert len(state["received"]) == 36
    for body in state["received"]:
        assert body["model"] == MODEL and body["temperature"] == 0.6 and body["top_p"] == 0.95
        assert body["stream"] is False and "max_tokens" not in body  # the server's default unless asked
        assert all(m["role"] != "system" for m in body["messages"])
        assert body["messages"][-1]["role"] == "user"
        assert body["messages"][-1]["content"].endswith("\nPlease reason step by step, and put your final "
                                                        "answer within \\boxed{}.")
    assert set(Counter(question_of(b) for b in state["received"]).values()) == {3}  # each asked once a repeat


def test_below_min_score_is_a_result_not_a_failure(capsys):
    with openai_stub(half_right) as (url, _):
        code, out, _ = run_cli(capsys, url, "--min-score", "0.6")
    result = json.loads(out.strip().splitlines()[-1])
    assert code == 0
    assert result["score"] == 0.5 and result["passed"] is False and result["minScore"] == 0.6
    assert "FAILED (min 0.6)" in out


def test_limit_and_max_tokens_reach_the_server(capsys):
    with openai_stub(half_right) as (url, state):
        code, out, _ = run_cli(capsys, url, "--limit", "8", "--max-tokens", "64", "--min-score", "0.9")
    result = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and result["examples"] == 8 and result["requests"] == 8
    assert result["score"] == 0.75 and result["passed"] is False  # 6 of the first 8 are in the right half
    assert {b["max_tokens"] for b in state["received"]} == {64}


def test_5xx_and_429_are_retried(capsys):
    def flaky(body, state):
        if state["attempts"][question_of(body)] == 1:
            return (503 if len(state["received"]) % 2 else 429), {"error": {"message": "busy"}}, 0.0
        return half_right(body, state)

    with openai_stub(flaky) as (url, state):
        code, out, err = run_cli(capsys, url, "--retries", "1")
    result = json.loads(out.strip().splitlines()[-1])
    assert code == 0, err
    assert result["errors"] == 0 and result["score"] == 0.5
    assert len(state["received"]) == 24


def test_a_refused_request_is_not_retried_and_scores_zero(capsys):
    refused = EXAMPLES[0].messages[-1]["content"]

    def refuse_one(body, state):
        if question_of(body) == refused:
            return 400, {"error": {"message": "prompt too long", "type": "invalid_request_error"}}, 0.0
        return half_right(body, state)

    with openai_stub(refuse_one) as (url, state):
        code, out, _ = run_cli(capsys, url, "--repeats", "2", "--retries", "2")
    result = json.loads(out.strip().splitlines()[-1])
    assert code == 0
    assert result["errors"] == 2 and result["requests"] == 24
    assert result["score"] == pytest.approx(5 / 12)
    assert result["firstError"] == "HTTP 400: prompt too long"
    assert state["attempts"][refused] == 2  # once per repeat: a 400 is final


def test_a_stalled_request_times_out_as_an_error(capsys):
    stalled = EXAMPLES[1].messages[-1]["content"]

    def stall_one(body, state):
        status, payload, _ = half_right(body, state)
        return status, payload, (1.5 if question_of(body) == stalled else 0.0)

    with openai_stub(stall_one) as (url, _):
        code, out, _ = run_cli(capsys, url, "--timeout", "0.3", "--retries", "0", "--limit", "3")
    result = json.loads(out.strip().splitlines()[-1])
    assert code == 0
    assert result["errors"] == 1 and result["score"] == pytest.approx(2 / 3)
    assert "no answer within 0.3 s" in result["firstError"]


def test_concurrency_is_bounded(capsys):
    def slow(body, state):
        status, payload, _ = half_right(body, state)
        return status, payload, 0.1

    with openai_stub(slow) as (url, state):
        code, _, _ = run_cli(capsys, url, "--concurrency", "3")
    assert code == 0 and state["max_in_flight"] == 3


def test_every_request_failing_is_an_error_exit(capsys):
    with openai_stub(lambda body, state: (400, {"error": {"message": "no such adapter"}}, 0.0)) as (url, _):
        code, out, err = run_cli(capsys, url, "--limit", "2")
    assert code == 1
    assert "every one of 2 requests failed" in err and "no such adapter" in err


def test_an_unreachable_endpoint_exits_non_zero_after_retries(capsys):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        code, _, err = run_cli(capsys, f"http://127.0.0.1:{port}", "--retries", "1")
    assert code == 1
    assert f"endpoint http://127.0.0.1:{port}/v1/models unreachable after 2 attempts" in err


def test_an_endpoint_answering_5xx_is_retried_then_an_error_exit(capsys):
    with openai_stub(half_right, models_status=503) as (url, state):
        code, _, err = run_cli(capsys, url, "--retries", "1")
    assert code == 1 and f"endpoint {url}/v1/models answered HTTP 503 after 2 attempts" in err
    assert state["models_asked"] == 2 and state["received"] == []


def test_an_endpoint_without_a_model_list_is_still_evaluated(capsys):
    with openai_stub(half_right, models_status=404) as (url, _):
        code, out, err = run_cli(capsys, url, "--limit", "2")
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["score"] == 1.0


def test_a_model_the_endpoint_does_not_serve_is_refused(capsys):
    with openai_stub(half_right, models=("other",)) as (url, state):
        code, _, err = run_cli(capsys, url)
    assert code == 1 and "'r1-stub' is not served" in err and "['other']" in err
    assert state["received"] == []


def test_bad_input_exits_non_zero_with_a_message(capsys, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "answer": "1"}\n{"prompt": "q"\n')
    with openai_stub(half_right) as (url, state):
        assert run_cli(capsys, url, dataset=tmp_path / "absent.jsonl")[0] == 1
        code, _, err = run_cli(capsys, url, dataset=bad)
        assert code == 1 and f"{bad}:2: not valid JSON" in err
        code, _, err = run_cli(capsys, url, "--output", str(tmp_path / "no" / "dir.json"))
        assert code == 1 and "its directory does not exist" in err
        assert state["received"] == []  # nothing asked before the input is known good
    for args in (["--repeats", "0"], ["--min-score", "1.5"], ["--scorer", "bleu"], ["--timeout", "0"]):
        with pytest.raises(SystemExit) as exit_:
            run_cli(capsys, "http://127.0.0.1:1", *args)
        assert exit_.value.code == 2


def test_the_console_script(tmp_path):
    script = Path(sys.executable).parent / "distillery-eval"
    assert script.exists(), f"{script} is not installed: make venv installs the project's console scripts"
    with openai_stub(half_right) as (url, _):
        proc = subprocess.run([str(script), "--endpoint", url + "/v1", "--model", MODEL, "--dataset",
                               str(DATASET), "--scorer", "boxed", "--limit", "2", "--repeats", "2",
                               "--output", str(tmp_path / "r")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "r").read_text())["scores"] == [1.0, 1.0]


def test_system_turns_fold_into_the_user_turn():
    example = Example(1, ({"role": "system", "content": "Answer in French."},
                          {"role": "user", "content": "Capital of Italy?"},
                          {"role": "assistant", "content": "Rome."},
                          {"role": "user", "content": "And of Spain?"}), "Madrid")
    assert r1_messages(example, SCORERS["contains"]) == [
        {"role": "user", "content": "Answer in French.\n\nCapital of Italy?"},
        {"role": "assistant", "content": "Rome."},
        {"role": "user", "content": "And of Spain?"},
    ]
    body = request_body(example, SCORERS["boxed"], EvalConfig("http://x", MODEL, max_tokens=100))
    assert body["messages"][-1]["content"] == "And of Spain?\n" + BOXED_INSTRUCTION
    assert example.messages[0]["role"] == "system"  # the dataset's example is not modified


def test_the_result_fits_a_termination_message_and_std_is_the_sample_std():
    config = EvalConfig("http://x", MODEL, repeats=2000)
    items = [ItemResult(r, 1, float(r % 2), "1", "1", 0.1, "boom " * 200 if r == 1 else None)
             for r in range(1, 2001)]
    result = summarise(config, 1, items, 1.0, 0.5)
    assert len(result.to_json()) <= RESULT_LIMIT_BYTES
    assert "scores" not in json.loads(result.to_json())  # given up to fit
    two = summarise(EvalConfig("http://x", MODEL, repeats=2), 1,
                    [ItemResult(1, 1, 1.0, "", "", 0.2), ItemResult(2, 1, 0.0, "", "", 0.4)], 1.0, None)
    assert two.score == 0.5 and two.score_std == pytest.approx(0.5 ** 0.5)  # sample (n-1) std
    assert two.passed is None and json.loads(two.to_json())["passed"] is None


def test_percentile():
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([float(i) for i in range(1, 101)], 50) == 50.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 90) == pytest.approx(3.7)


def test_the_job_command_uses_the_parsers_own_flags():
    argv = cli.command("http://m-predictor.ns/openai", MODEL, "/data/evals.jsonl", scorer="contains",
                       limit=200, repeats=3, min_score=0.6, max_tokens=4096, concurrency=4, timeout_s=900.0)
    assert argv[0] == "distillery-eval"
    args = cli.build_parser().parse_args(argv[1:])
    assert (args.endpoint, args.model, args.dataset, args.scorer) == (
        "http://m-predictor.ns/openai", MODEL, "/data/evals.jsonl", "contains")
    assert (args.limit, args.repeats, args.min_score, args.max_tokens, args.concurrency, args.timeout) == (
        200, 3, 0.6, 4096, 4, 900.0)
    assert args.output == "/dev/termination-log"
    plain = cli.build_parser().parse_args(cli.command("http://x", MODEL, "d.jsonl", output=None)[1:])
    assert (plain.limit, plain.min_score, plain.output, plain.repeats) == (None, None, None, 1)


def test_the_operator_reads_back_what_the_runner_wrote(capsys, tmp_path):
    output = tmp_path / "termination-log"
    with openai_stub(half_right) as (url, _):
        assert run_cli(capsys, url, "--repeats", "2", "--min-score", "0.6", "--output", str(output))[0] == 0
    summary = parse_summary(output.read_text())
    assert (summary.score, summary.score_std, summary.scores, summary.passed) == (0.5, 0.0, (0.5, 0.5), False)
    assert (summary.examples, summary.repeats, summary.requests, summary.errors) == (12, 2, 24, 0)
    assert summary.min_score == 0.6 and summary.first_error is None and summary.model == MODEL
    assert set(summary.latency_s) == {"p50", "p90", "p99"} and summary.latency_s["p99"] is not None


@pytest.mark.parametrize("text,message", [
    ("", "not JSON"), ("Error: OOMKilled", "not JSON"), ("[1]", "must be a JSON object"),
    ('{"score": 0.5}', "'latencySeconds' must be an object"),
    ('{"latencySeconds": {}, "score": "high", "examples": 1, "repeats": 1, "requests": 1, "errors": 0}',
     "'score' must be a number"),
    ('{"latencySeconds": {}, "score": 1, "scoreStdDev": 0, "examples": 1, "repeats": 1, "requests": 1,'
     ' "errors": 0, "durationSeconds": 1, "passed": "yes"}', "'passed' must be true, false or null"),
])
def test_a_result_that_is_not_one_is_refused(text, message):
    with pytest.raises(ValueError, match=message):
        parse_summary(text)
