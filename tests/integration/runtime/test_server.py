"""The real runtime (`python -m model_runtime`: KServe ModelServer + engine + tiny Qwen2 with the
real R1 tokenizer) on a free 127.0.0.1 port, driven by real clients: the `openai` SDK for the OpenAI
routes, httpx for KServe V1/V2, probes and /metrics; bad requests get the right 4xx and body.

One server for the module (start-up dominates the cost): batch 1 and a queue of 1, so that the
429 test can fill the queue with a few concurrent requests.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distillery_contract import flags, metric_names
from model_runtime.reasoning import split_reasoning

pytestmark = pytest.mark.integration

MODEL = "tiny-r1"
MAX_MODEL_LEN = 512
CLIENT_TIMEOUT_S = 3.0  # the server's header and body deadlines
SERVER_LOG: dict[str, Path] = {}  # the module server's log file, for tests that check what it logged


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def server(tiny_qwen2_dir, tmp_path_factory):
    port = _free_port()
    log_path = tmp_path_factory.mktemp("runtime") / "server.log"
    SERVER_LOG["path"] = log_path
    cmd = [
        sys.executable, "-m", "model_runtime",
        f"{flags.FLAG_MODEL_NAME}={MODEL}", f"{flags.FLAG_MODEL_DIR}={tiny_qwen2_dir}",
        "--http_host=127.0.0.1", f"{flags.FLAG_HTTP_PORT}={port}", "--enable_grpc=false",
        f"{flags.FLAG_MAX_MODEL_LEN}={MAX_MODEL_LEN}", f"{flags.FLAG_MAX_BATCH_SIZE}=1",
        f"{flags.FLAG_MAX_QUEUE}=1", f"{flags.FLAG_DEVICE}=cpu", f"{flags.FLAG_DTYPE}=float32",
        flags.FLAG_THINK_PREFIX, flags.FLAG_SEPARATE_REASONING,
        f"--header_timeout_s={CLIENT_TIMEOUT_S}", f"--body_timeout_s={CLIENT_TIMEOUT_S}",  # short: the slowloris test
    ]
    repo = Path(__file__).resolve().parents[3]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=repo, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        ready = False
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                live = httpx.get(f"{base}{flags.HEALTH_LIVE_PATH}", timeout=1)
                ready_resp = httpx.get(base + flags.HEALTH_READY_PATH_TEMPLATE.format(model_name=MODEL), timeout=1)
                if live.status_code == 200 and ready_resp.status_code == 200:
                    ready = True
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        if not ready:
            pytest.fail(f"runtime not ready (exit {proc.poll()}):\n{log_path.read_text()[-4000:]}")
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail("runtime did not stop within 20 s of SIGTERM")


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def r1_tokenizer(tiny_qwen2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_qwen2_dir))


def metric(base: str, name: str, **labels: str) -> float:
    text = httpx.get(f"{base}{flags.METRICS_PATH}", timeout=5).text
    want = {metric_names.METRIC_LABEL_MODEL: MODEL, **labels}
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in want.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_idle(base: str, timeout_s: float = 10.0) -> None:
    """Block until the engine holds no request. A request whose client already has its answer (a stop
    string matched, a stream was closed) keeps its batch slot until the engine's next step; tests that need
    the whole batch + queue (batch 1, queue 1 here) start from an idle server."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (metric(base, metric_names.METRIC_REQUESTS_IN_FLIGHT) == 0 and metric(base, metric_names.METRIC_RUNNING_SEQUENCES) == 0
                and metric(base, metric_names.METRIC_QUEUE_DEPTH) == 0):
            return
        time.sleep(0.05)
    pytest.fail(f"the runtime did not become idle within {timeout_s} s")


MSGS = [{"role": "user", "content": "What is 2+2?"}]


def test_models_list_and_probes(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{server}/openai/v1/models").json()["data"][0]["id"] == MODEL
    assert httpx.get(f"{server}/v1/models").json()["models"] == [MODEL]  # KServe V1 shape on the same path
    assert httpx.get(f"{server}/v1/models/{MODEL}").json() == {"name": MODEL, "ready": True}
    assert httpx.get(f"{server}/").json() == {"status": "alive"}


def test_chat_plain_and_streaming_agree(client):
    plain = client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=12, temperature=0)
    choice = plain.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert plain.usage.completion_tokens <= 12 and plain.usage.prompt_tokens > 0
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens

    stream = client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
                        for c in chunks if c.choices)
    assert content == (choice.message.content or "")
    assert reasoning == (choice.message.model_extra.get("reasoning_content") or "")
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_reasoning_split_matches_the_raw_completion(client, r1_tokenizer):
    """Greedy chat (think prefix + reasoning_content) == split_reasoning(raw greedy completion)."""
    prompt = r1_tokenizer.apply_chat_template(MSGS, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<｜Assistant｜>")  # the R1 template leaves "<think>\n" to the runtime
    ids = r1_tokenizer(prompt + "<think>\n", add_special_tokens=False)["input_ids"]
    raw = client.completions.create(model=MODEL, prompt=ids, max_tokens=16, temperature=0)
    chat = client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=16, temperature=0)
    assert chat.usage.prompt_tokens == len(ids)
    message = chat.choices[0].message
    assert (message.model_extra.get("reasoning_content"), message.content) == split_reasoning(raw.choices[0].text)


def test_completions_plain_streaming_stop_and_seed(client):
    plain = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=0)
    text = plain.choices[0].text
    pieces = [c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=0, stream=True) if c.choices]
    assert "".join(pieces) == text
    if len(text) > 3:  # a stop string taken from the greedy output cuts it there
        stop = text[2:4]
        cut = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=0,
                                        stop=[stop])
        assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    sampled = [client.completions.create(model=MODEL, prompt="Hi", max_tokens=8, temperature=1.0, seed=123)
               .choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_kserve_v1_predict_and_v2_infer(server):
    wait_idle(server)  # two instances = one running + one queued: all of batch 1 + queue 1
    v1 = httpx.post(f"{server}/v1/models/{MODEL}:predict",
                    json={"instances": ["Hello", {"prompt": "Hi", "max_tokens": 3}], "parameters": {"max_tokens": 4,
                                                                                                   "temperature": 0}})
    assert v1.status_code == 200, v1.text
    predictions = v1.json()["predictions"]
    assert len(predictions) == 2 and all(isinstance(p, str) for p in predictions)
    v2 = httpx.post(f"{server}/v2/models/{MODEL}/infer", json={
        "inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES", "data": ["Hello"]}],
        "parameters": {"max_tokens": 4, "temperature": 0}})
    assert v2.status_code == 200, v2.text
    output = v2.json()["outputs"][0]
    assert output["datatype"] == "BYTES" and output["shape"] == [1]
    assert output["data"] == [predictions[0]]  # same prompt, same greedy path


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400,
         "messages.0.role"),
        ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
        # batch 1 + queue 1: three choices can never be held at once
        ("/v1/chat/completions", {"model": MODEL, "messages": MSGS, "n": 3}, 400, "n"),
        ("/v1/chat/completions", {"model": MODEL, "messages": MSGS, "temperature": 5}, 400, "temperature"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "word " * 600}]}, 400,
         "messages"),
        ("/openai/v1/chat/completions", {"model": MODEL, "messages": MSGS, "max_tokens": MAX_MODEL_LEN}, 400,
         "max_tokens"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "assistant", "content": "a",
                                                                "reasoning_content": "b"}, *MSGS]}, 400,
         "messages.0.reasoning_content"),
        ("/v1/chat/completions", {"model": "gpt-4", "messages": MSGS}, 404, "model"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "top_p": 0}, 400, "top_p"),
        ("/v1/completions", {"model": MODEL, "prompt": [[]]}, 400, "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": ["a", "b", "c"]}, 400, "n"),
        (f"/v1/models/{MODEL}:predict", {"instances": [{"prompt": "x", "max_tokens": 10**6}]}, 400,
         "instances.0.max_tokens"),
        (f"/v2/models/{MODEL}/infer", {"inputs": [{"name": "t", "shape": [1], "datatype": "FP32", "data": [1]}]},
         400, None),
    ],
)
def test_bad_requests_get_4xx_and_an_error_body(server, path, body, status, param):
    resp = httpx.post(f"{server}{path}", json=body, timeout=30)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    if path.startswith(("/v1/chat", "/v1/completions", "/openai")):
        assert error["message"] and error["param"] == param
    else:  # KServe V1/V2: {"error": "<param>: <message>"}, the field named first
        assert isinstance(error, str) and error and (param is None or error.startswith(f"{param}: "))


def test_malformed_json_is_400(server):
    for path in ("/v1/chat/completions", "/openai/v1/completions"):
        resp = httpx.post(f"{server}{path}", content=b'{"model": ', headers={"content-type": "application/json"})
        assert resp.status_code == 400 and resp.json()["error"]["type"] == "invalid_request_error"


def test_sdk_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MSGS)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=MSGS, n=3)
    assert err.value.body["param"] == "n"


async def test_full_queue_answers_429_with_retry_after(server):
    """Batch 1 + queue 1: of eight concurrent requests (each long enough to hold the batch slot while
    the others arrive), some must be turned away with 429."""
    wait_idle(server)
    body = {"model": MODEL, "prompt": "Count:", "max_tokens": 120, "temperature": 1.0}
    async with httpx.AsyncClient(base_url=server, timeout=60) as h:
        responses = await asyncio.gather(*(h.post("/v1/completions", json=body) for _ in range(8)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(200) >= 1 and 429 in statuses and set(statuses) <= {200, 429}, statuses
    rejected = next(r for r in responses if r.status_code == 429)
    assert int(rejected.headers["retry-after"]) >= 1
    assert rejected.json()["error"]["code"] == "queue_full"
    assert metric(server, metric_names.METRIC_QUEUE_REJECTED_TOTAL) >= statuses.count(429)


def test_client_disconnect_aborts_the_stream(server):
    """Closing a stream mid-way frees the request (in-flight back to 0) long before max_tokens."""
    body = {"model": MODEL, "prompt": "Go", "max_tokens": MAX_MODEL_LEN - 8, "temperature": 1.0, "stream": True,
            "seed": 1}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=30) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["object"] == "text_completion"
    deadline = time.monotonic() + 10
    while metric(server, metric_names.METRIC_REQUESTS_IN_FLIGHT) > 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(server, metric_names.METRIC_REQUESTS_IN_FLIGHT) == 0
    log_lines = [json.loads(line) for line in SERVER_LOG["path"].read_text().splitlines() if line.startswith("{")]
    assert any(entry["msg"] == "client disconnected" for entry in log_lines)  # aborted, did not run to the end
    assert not any(entry.get("prompt") == "Go" for entry in log_lines)  # no prompt text in logs by default
    # the server still serves
    ok = httpx.post(f"{server}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2})
    assert ok.status_code == 200


def test_metrics_exported_with_contract_names(server):
    text = httpx.get(f"{server}{flags.METRICS_PATH}").text
    for name in (metric_names.METRIC_REQUESTS_TOTAL, metric_names.METRIC_TIME_TO_FIRST_TOKEN + "_bucket",
                 metric_names.METRIC_GENERATED_TOKENS_TOTAL, metric_names.METRIC_QUEUE_DEPTH,
                 metric_names.METRIC_REQUESTS_IN_FLIGHT, metric_names.METRIC_RUNNING_SEQUENCES):
        assert f"\n{name}{{" in text, name
    assert metric(server, metric_names.METRIC_GENERATED_TOKENS_TOTAL) > 0
    assert metric(server, metric_names.METRIC_REQUESTS_TOTAL, endpoint="chat", status="200") >= 3


def test_pickle_weights_are_refused_with_exit_1_and_a_message(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    proc = subprocess.run(
        [sys.executable, "-m", "model_runtime", f"{flags.FLAG_MODEL_NAME}=x", f"{flags.FLAG_MODEL_DIR}={tmp_path}",
         "--http_host=127.0.0.1", f"{flags.FLAG_HTTP_PORT}={_free_port()}", "--enable_grpc=false"],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[3],
    )
    assert proc.returncode == 1
    errors = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{") and '"error"' in line]
    assert errors and "model load failed" in errors[0]["msg"], proc.stderr[-2000:]
    assert "pickle" in errors[0]["msg"].lower() or ".bin" in errors[0]["msg"]


# ------------------------------------------------------------------ hostile clients (issue 13)
def _health_probe(base: str, stop: threading.Event, worst: list[float]) -> None:
    """Probe GET /health until `stop`; record the slowest answer."""
    with httpx.Client(base_url=base, timeout=10) as h:
        while not stop.is_set():
            started = time.monotonic()
            assert h.get("/health").status_code == 200
            worst.append(time.monotonic() - started)
            time.sleep(0.05)


def _while_probing(base: str, work):
    stop, worst = threading.Event(), [0.0]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        probe = pool.submit(_health_probe, base, stop, worst)
        try:
            result = work()
        finally:
            stop.set()
        probe.result()
    return result, max(worst)


V2_PATH = f"/v2/models/{MODEL}/infer"
V1_PATH = f"/v1/models/{MODEL}:predict"
# a binary V2 tensor that declares 100 bytes of data where the body holds 9
BINARY_HEADER = json.dumps({"inputs": [{"name": "t", "shape": [1], "datatype": "BYTES",
                                        "parameters": {"binary_data_size": 100}}]}).encode()


def test_hostile_bodies_get_4xx_and_the_connection_keeps_serving(server):
    bad = [
        ("/v1/chat/completions", b'{"model": "tiny-r1", "messages": ' + b"[" * 1000 + b"]" * 1000 + b"}", {}),
        ("/v1/chat/completions", b'{"model": "tiny-r1", "messages": [{"role": "user", "content": "\\ud800"}]}', {}),
        ("/v1/chat/completions", b'{"model": "tiny-r1", "messages": [{"role": "user", "content": "\xed\xa0\x80"}]}',
         {}),
        ("/v1/completions", b'{"model": "tiny-r1", "prompt": "\\udfff"}', {}),
        ("/v1/completions", b'{"model": "\\ud800", "prompt": "x"}', {}),
        (V2_PATH, json.dumps({"inputs": [{"name": "t", "shape": [0], "datatype": "BYTES", "data": []}]}).encode(), {}),
        (V2_PATH, json.dumps({"inputs": [{"name": "t", "shape": [1], "datatype": "BYTES", "data": ["\ud800"]}]})
         .encode(), {}),
        (V2_PATH, json.dumps({"inputs": [{"name": "t", "shape": [2], "datatype": "BYTES", "data": ["a"]}]}).encode(),
         {}),
        (V2_PATH, BINARY_HEADER + b"\x05\x00\x00\x00hello", {"inference-header-content-length": str(len(BINARY_HEADER))}),
        (V1_PATH, json.dumps({"instances": ["a", "b", "c"]}).encode(), {}),  # batch 1 + queue 1 can never hold 3
    ]
    with httpx.Client(base_url=server, timeout=30) as h:
        for path, body, headers in bad:
            resp = h.post(path, content=body, headers={"content-type": "application/json", **headers})
            assert resp.status_code == 400, (path, body[:80], resp.text)
            error = resp.json()["error"]
            assert ("message" in error) if path.startswith("/v1/c") else isinstance(error, str)
            assert "Error :" not in resp.text and "Traceback" not in resp.text
        ok = h.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2})
        assert ok.status_code == 200
    assert "at most 2" in httpx.post(f"{server}{V1_PATH}", json={"instances": ["a", "b", "c"]}).text


def test_40mb_bodies_are_413_on_every_route_while_health_answers(server):
    big = b" " * (40 * 2**20)

    def upload() -> list[int]:
        with httpx.Client(base_url=server, timeout=60) as h:
            return [h.post(p, content=big, headers={"content-type": "application/json"}).status_code
                    for p in ("/v1/chat/completions", "/openai/v1/completions", V1_PATH, V2_PATH)]

    statuses, worst = _while_probing(server, upload)
    assert statuses == [413] * 4
    assert worst < 1.0


def test_a_10mb_prompt_is_refused_without_stalling_health(server):
    body = {"model": MODEL, "prompt": "word " * (2 * 2**20), "max_tokens": 1}

    def send() -> httpx.Response:
        return httpx.post(f"{server}/v1/completions", json=body, timeout=60)

    resp, worst = _while_probing(server, send)
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "context_length_exceeded"
    assert worst < 1.0


def test_repository_unload_is_refused_and_readiness_stays_true(server):
    for action in ("unload", "load"):
        resp = httpx.post(f"{server}/v2/repository/models/{MODEL}/{action}")
        assert resp.status_code == 403 and "--enable_model_repository_routes" in resp.json()["error"]
    assert httpx.get(f"{server}/v1/models/{MODEL}").json() == {"name": MODEL, "ready": True}
    assert httpx.get(f"{server}/v2/health/ready").status_code == 200
    assert httpx.get(f"{server}/health").status_code == 200


def test_slow_clients_are_cut_off(server):
    """Half-sent headers or bodies (slowloris) get a 408 and a closed connection after the deadline."""
    host, port = server.removeprefix("http://").split(":")

    def stall(request: bytes) -> tuple[bytes, float]:
        with socket.create_connection((host, int(port)), timeout=CLIENT_TIMEOUT_S * 4) as sock:
            sock.sendall(request)
            started = time.monotonic()
            data = b""
            while chunk := sock.recv(4096):  # until the server closes
                data += chunk
            return data, time.monotonic() - started

    requests = [b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: app",  # headers never end
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"model\":"]  # nor the body
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        idle = [pool.submit(stall, b"") for _ in range(30)]  # connections that never send a byte
        results = [f.result() for f in [pool.submit(stall, r) for r in requests] + idle]
    assert all(waited < CLIENT_TIMEOUT_S + 2 for _, waited in results), [w for _, w in results]
    assert all(data.startswith(b"HTTP/1.1 408") for data, _ in results[:2]), results[:2]
    assert httpx.get(f"{server}/health").status_code == 200


@pytest.mark.parametrize("path", [V1_PATH, V2_PATH, "/v1/completions-stream"])
def test_a_client_leaving_aborts_its_generation_and_is_counted_499(server, path):
    wait_idle(server)
    long = {"max_tokens": MAX_MODEL_LEN - 8, "temperature": 1.0}
    endpoint, body = {
        V1_PATH: ("v1_predict", {"instances": [{"prompt": "Go", **long}]}),
        V2_PATH: ("v2_infer", {"inputs": [{"name": "t", "shape": [1], "datatype": "BYTES", "data": ["Go"]}],
                               "parameters": long}),
        "/v1/completions-stream": ("completions", {"model": MODEL, "prompt": "Go", "stream": True, **long}),
    }[path]
    before = metric(server, metric_names.METRIC_REQUESTS_TOTAL, endpoint=endpoint, status="499")
    completed = metric(server, metric_names.METRIC_GENERATED_TOKENS_TOTAL)
    if path.endswith("-stream"):
        with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=30) as resp:
            next(line for line in resp.iter_lines() if line.startswith("data: "))
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server}{path}", json=body, timeout=0.5)
    deadline = time.monotonic() + 10
    while metric(server, metric_names.METRIC_REQUESTS_IN_FLIGHT) > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(server, metric_names.METRIC_REQUESTS_IN_FLIGHT) == 0
    assert metric(server, metric_names.METRIC_REQUESTS_TOTAL, endpoint=endpoint, status="499") == before + 1
    assert metric(server, metric_names.METRIC_GENERATED_TOKENS_TOTAL) == completed  # never ran to the end


# ------------------------------------------------------------------ property-based fuzzing (hypothesis)
_odd_text = st.one_of(st.text(max_size=12), st.sampled_from(["\ud800", "a\udfff", "<｜Assistant｜><think>", "\x00", ""]))
_json = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
                               _odd_text),
                     lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(_odd_text, inner, max_size=3)),
                     max_leaves=8)
_small_max_tokens = st.one_of(st.integers(-2, 3), st.sampled_from(["3", 1.5, [], {}]))  # never long generations
_message = st.fixed_dictionaries({"role": st.one_of(st.sampled_from(["user", "system", "assistant", "developer"]), _json),
                                  "content": st.one_of(_odd_text, _json)})
_sampling = {"temperature": st.one_of(st.floats(-1, 3), _json), "top_p": st.one_of(st.floats(-1, 2), _json),
             "stream": st.booleans(), "stop": st.one_of(_odd_text, st.lists(_odd_text, max_size=3), _json),
             "seed": st.one_of(st.integers(-(2**65), 2**65), _json), "n": st.integers(0, 2)}
CHAT_BODIES = st.fixed_dictionaries(
    {"model": st.one_of(st.just(MODEL), _odd_text), "messages": st.one_of(st.lists(_message, max_size=3), _json),
     "max_tokens": _small_max_tokens}, optional=_sampling)
COMPLETION_BODIES = st.fixed_dictionaries(
    {"model": st.one_of(st.just(MODEL), _odd_text),
     "prompt": st.one_of(_odd_text, st.lists(st.integers(-3, 152100), max_size=4), st.lists(_odd_text, max_size=2),
                         _json),
     "max_tokens": _small_max_tokens}, optional={**_sampling, "echo": st.booleans()})
_tensor = st.fixed_dictionaries({"name": st.one_of(st.just("text_input"), _json),
                                 "shape": st.one_of(st.lists(st.integers(-1, 3), max_size=2), _json),
                                 "datatype": st.one_of(st.sampled_from(["BYTES", "FP32"]), _json),
                                 "data": st.one_of(st.lists(st.one_of(_odd_text, _json), max_size=3), _json)})
V2_BODIES = st.fixed_dictionaries(
    {"inputs": st.one_of(st.lists(_tensor, max_size=2), _json),
     "parameters": st.fixed_dictionaries({"max_tokens": _small_max_tokens}, optional={"chat": st.booleans()})},
    optional={"id": st.one_of(_odd_text, _json)})
# DISTILLERY_FUZZ_EXAMPLES=500 for a deeper search by hand; the suite keeps it short
FUZZ = settings(max_examples=int(os.environ.get("DISTILLERY_FUZZ_EXAMPLES", "40")), deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _local_port(resp: httpx.Response) -> int:
    return int(resp.extensions["network_stream"].get_extra_info("client_addr")[1])


def _fuzz_once(h: httpx.Client, path: str, body: bytes) -> None:
    resp = h.post(path, content=body, headers={"content-type": "application/json"})
    assert resp.status_code < 500, (path, body[:200], resp.text[:300])
    port = _local_port(resp)
    ok = h.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1})
    assert ok.status_code == 200 and _local_port(ok) == port  # the same kept-open connection still serves


@pytest.fixture(scope="module")
def keepalive(server):
    with httpx.Client(base_url=server, timeout=30, limits=httpx.Limits(max_connections=1)) as h:
        yield h


def _wire(body: object, mangle: bytes | None) -> bytes:
    raw = json.dumps(body).encode()  # lone surrogates go out as their \\ud800 escapes
    return raw[: len(raw) // 2] + mangle if mangle is not None else raw


@FUZZ
@given(body=CHAT_BODIES, mangle=st.one_of(st.none(), st.binary(max_size=8)))
def test_fuzz_chat_bodies_never_5xx(keepalive, body, mangle):
    _fuzz_once(keepalive, "/v1/chat/completions", _wire(body, mangle))


@FUZZ
@given(body=COMPLETION_BODIES, mangle=st.one_of(st.none(), st.binary(max_size=8)))
def test_fuzz_completion_bodies_never_5xx(keepalive, body, mangle):
    _fuzz_once(keepalive, "/v1/completions", _wire(body, mangle))


@FUZZ
@given(body=V2_BODIES, mangle=st.one_of(st.none(), st.binary(max_size=8)))
def test_fuzz_v2_bodies_never_5xx(keepalive, body, mangle):
    _fuzz_once(keepalive, V2_PATH, _wire(body, mangle))
