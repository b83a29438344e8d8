"""serving.py against a scripted engine (the real R1 tokenizer, no model): chat template and R1
rules, sampling defaults, validation, detokenization, stop strings, reasoning split, usage, 429.

ScriptedEngine follows engine.py's interface (generate() yields TokenEvents; closing the iterator
aborts; a full queue raises QueueFullError) and replays fixed token ids: no model, no scheduler.
The integration tests (tests/integration/runtime) run the real engine and model.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest
from transformers import AutoTokenizer

from model_runtime.engine import QueueFullError, TokenEvent
from model_runtime.protocol import ChatCompletionRequest, CompletionRequest, GenerationParameters
from model_runtime.serving import (
    IncrementalDetokenizer,
    Serving,
    ServingConfig,
    ServingError,
    StopMatcher,
    fold_system_into_first_user,
)

EOS = 151643


class ScriptedEngine:
    def __init__(self, tokens: list[int], *, finish: str = "stop", queue_full: bool = False,
                 delay_s: float = 0.0) -> None:
        self.tokens = tokens
        self.finish = finish
        self.queue_full = queue_full
        self.delay_s = delay_s
        self.calls: list[tuple[list[int], Any, str]] = []
        self.closed: list[str] = []  # request ids whose iterator ended (finished or aborted)
        self.aborted: list[str] = []

    async def generate(self, prompt_ids: list[int], params: Any, request_id: str) -> AsyncIterator[TokenEvent]:
        if self.queue_full:
            error = QueueFullError("queue full")
            error.retry_after_s = 2.0
            raise error
        self.calls.append((list(prompt_ids), params, request_id))
        try:
            tokens = self.tokens[: params.max_tokens]
            for i, token in enumerate(tokens):
                reason = None
                if i == len(tokens) - 1:
                    reason = "length" if len(self.tokens) > params.max_tokens else self.finish
                yield TokenEvent(token_id=token, finish_reason=reason, prompt_tokens=len(prompt_ids),
                                 completion_tokens=i + 1)
                await asyncio.sleep(self.delay_s)
        finally:
            self.closed.append(request_id)

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def stop(self) -> None:
        pass


def fake_loaded(tokenizer: Any, *, max_model_len: int = 256, generation_defaults: dict | None = None):
    """What loader.load_model returns, minus the model (serving never touches it)."""
    return SimpleNamespace(
        tokenizer=tokenizer, eos_token_ids=[EOS], max_model_len=max_model_len,
        generation_defaults={"temperature": 0.6, "top_p": 0.95} if generation_defaults is None
        else generation_defaults,
        quantization="none", device="cpu",
    )


@pytest.fixture(scope="module")
def r1_tokenizer(r1_tokenizer_dir):
    return AutoTokenizer.from_pretrained(str(r1_tokenizer_dir))


def make(tokenizer, text: str = "", *, eos: bool = True, engine: ScriptedEngine | None = None,
         loaded_kw: dict | None = None, **config) -> tuple[Serving, ScriptedEngine]:
    tokens = tokenizer.encode(text, add_special_tokens=False) + ([EOS] if eos else [])
    engine = engine or ScriptedEngine(tokens)
    serving = Serving(fake_loaded(tokenizer, **(loaded_kw or {})), engine,
                      ServingConfig(model_name="r1", **config))
    return serving, engine


def chat_req(content: str = "What is 2+2?", **kw) -> ChatCompletionRequest:
    messages = kw.pop("messages", [{"role": "user", "content": content}])
    return ChatCompletionRequest.model_validate({"model": "r1", "messages": messages, **kw})


async def collect(serving: Serving, job) -> tuple[str, str, list]:
    deltas = [d async for d in serving.stream(job)]
    return "".join(d.content for d in deltas), "".join(d.reasoning for d in deltas), deltas


# ------------------------------------------------------------------ chat template and R1 rules
def test_think_prefix_is_forced_after_the_generation_prompt(r1_tokenizer):
    serving, _ = make(r1_tokenizer, think_prefix=True)
    text = serving.render_chat(chat_req().messages)
    assert text.endswith("<｜User｜>What is 2+2?<｜Assistant｜><think>\n")
    plain, _ = make(r1_tokenizer)
    assert plain.render_chat(chat_req().messages).endswith("<｜Assistant｜>")


def test_think_prefix_not_doubled_when_the_template_adds_it(r1_tokenizer):
    tok = AutoTokenizer.from_pretrained(r1_tokenizer.name_or_path)
    tok.chat_template = r1_tokenizer.chat_template.replace("{{'<｜Assistant｜>'}}", "{{'<｜Assistant｜><think>\\n'}}")
    serving, _ = make(tok, think_prefix=True)
    text = serving.render_chat(chat_req().messages)
    assert text.endswith("<｜Assistant｜><think>\n") and "<think>\n<think>" not in text


def test_system_message_folded_only_when_the_template_drops_it(r1_tokenizer):
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}]
    serving, _ = make(r1_tokenizer)
    assert serving.system_role_supported  # R1's template renders the system text after BOS
    assert "Be terse." in serving.render_chat(chat_req(messages=messages).messages)

    tok = AutoTokenizer.from_pretrained(r1_tokenizer.name_or_path)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}"
        "{% endif %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    )
    folding, _ = make(tok)
    assert not folding.system_role_supported
    assert folding.render_chat(chat_req(messages=messages).messages) == "<user>Be terse.\n\nHi<assistant>"
    assert fold_system_into_first_user(
        [{"role": "user", "content": "a"}, {"role": "system", "content": "s"}, {"role": "user", "content": "b"}]
    ) == [{"role": "user", "content": "s\n\na"}, {"role": "user", "content": "b"}]


def test_chat_without_user_message_is_400(r1_tokenizer):
    serving, _ = make(r1_tokenizer)
    with pytest.raises(ServingError) as err:
        serving.prepare_chat(chat_req(messages=[{"role": "system", "content": "x"}]))
    assert err.value.status == 400 and err.value.param == "messages"


# ------------------------------------------------------------------ sampling defaults and validation
def test_sampling_defaults_come_from_request_then_flag_then_generation_config(r1_tokenizer):
    serving, _ = make(r1_tokenizer)
    p = serving.prepare_chat(chat_req()).params
    assert (p.temperature, p.top_p) == (0.6, 0.95)
    flagged, _ = make(r1_tokenizer, default_temperature=0.7, default_top_p=0.9)
    p = flagged.prepare_chat(chat_req()).params
    assert (p.temperature, p.top_p) == (0.7, 0.9)
    p = flagged.prepare_chat(chat_req(temperature=0, top_p=0.5, seed=7)).params
    assert (p.temperature, p.top_p, p.seed) == (0.0, 0.5, 7)
    greedy, _ = make(r1_tokenizer, loaded_kw={"generation_defaults": {"do_sample": False}})
    p = greedy.prepare_chat(chat_req()).params
    assert (p.temperature, p.top_p) == (0.0, 1.0)


def test_max_tokens_defaults_to_the_room_left_in_the_context(r1_tokenizer):
    serving, _ = make(r1_tokenizer, loaded_kw={"max_model_len": 64})
    job = serving.prepare_chat(chat_req())
    assert job.params.max_tokens == 64 - len(job.prompt_ids)
    capped, _ = make(r1_tokenizer, default_max_tokens=5, loaded_kw={"max_model_len": 64})
    assert capped.prepare_chat(chat_req()).params.max_tokens == 5


@pytest.mark.parametrize(
    ("request_kw", "status", "param", "code"),
    [
        ({"model": "other"}, 404, "model", "model_not_found"),
        ({"content": "word " * 100}, 400, "messages", "context_length_exceeded"),
        ({"max_tokens": 60}, 400, "max_tokens", "context_length_exceeded"),
    ],
)
def test_request_errors(r1_tokenizer, request_kw, status, param, code):
    serving, _ = make(r1_tokenizer, loaded_kw={"max_model_len": 64})
    model = request_kw.pop("model", "r1")
    req = chat_req(**request_kw).model_copy(update={"model": model})
    with pytest.raises(ServingError) as err:
        serving.prepare_chat(req)
    assert (err.value.status, err.value.param, err.value.code) == (status, param, code)
    assert err.value.body()["error"]["message"]


def test_completion_prompt_token_ids_are_range_checked(r1_tokenizer):
    serving, _ = make(r1_tokenizer)
    ok = serving.prepare_completion(CompletionRequest(model="r1", prompt=[1, 2, 3]))
    assert ok.prompt_ids == [1, 2, 3]
    with pytest.raises(ServingError) as err:
        serving.prepare_completion(CompletionRequest(model="r1", prompt=[10**9]))
    assert err.value.param == "prompt"


# ------------------------------------------------------------------ generation
async def test_reasoning_content_split_with_forced_prefix(r1_tokenizer):
    serving, engine = make(r1_tokenizer, "Two plus two.\n</think>\n\nThe answer is 4.",
                           think_prefix=True, separate_reasoning=True)
    job = serving.prepare_chat(chat_req())
    content, reasoning, deltas = await collect(serving, job)
    assert reasoning == "Two plus two.\n"
    assert content == "\n\nThe answer is 4."
    assert deltas[-1].finish_reason == "stop"
    usage = deltas[-1].usage
    assert usage.prompt_tokens == len(job.prompt_ids) and usage.completion_tokens == len(engine.tokens)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    out = await serving.complete(serving.prepare_chat(chat_req()))
    assert (out.reasoning, out.content) == ("Two plus two.\n", "\n\nThe answer is 4.")


async def test_think_prefix_without_separation_is_returned_in_content(r1_tokenizer):
    serving, _ = make(r1_tokenizer, "hmm</think>4", think_prefix=True)
    out = await serving.complete(serving.prepare_chat(chat_req()))
    assert out.content == "<think>\nhmm</think>4" and out.reasoning is None


async def test_stop_string_cuts_output_and_aborts_the_engine_request(r1_tokenizer):
    serving, engine = make(r1_tokenizer, "Hello world. Goodbye world.", eos=False)
    job = serving.prepare_chat(chat_req(stop=[". G", "zzz"]))
    content, _, deltas = await collect(serving, job)
    assert content == "Hello world"
    assert deltas[-1].finish_reason == "stop"
    assert engine.closed == [job.request_id]  # the engine's iterator was closed early
    assert deltas[-1].usage.completion_tokens < len(engine.tokens)


async def test_max_tokens_gives_finish_reason_length(r1_tokenizer):
    serving, _ = make(r1_tokenizer, "one two three four five six", eos=False)
    out = await serving.complete(serving.prepare_chat(chat_req(max_tokens=3)))
    assert out.finish_reason == "length" and out.usage.completion_tokens == 3


async def test_full_queue_is_429_with_retry_after(r1_tokenizer):
    serving, _ = make(r1_tokenizer, engine=ScriptedEngine([], queue_full=True))
    with pytest.raises(ServingError) as err:
        await serving.complete(serving.prepare_chat(chat_req()))
    assert err.value.status == 429 and err.value.headers["Retry-After"] == "2"
    assert err.value.body()["error"]["code"] == "queue_full"


async def test_first_delta_comes_with_the_first_token_and_eos_is_not_text(r1_tokenizer):
    serving, _ = make(r1_tokenizer, "Hi")
    deltas = [d async for d in serving.stream(serving.prepare_completion(CompletionRequest(model="r1", prompt="x")))]
    assert "".join(d.content for d in deltas) == "Hi"
    assert "end▁of▁sentence" not in "".join(d.content for d in deltas)


async def test_v1_v2_text_job_applies_chat_template_on_request(r1_tokenizer):
    serving, engine = make(r1_tokenizer, "ok", think_prefix=True)
    raw = serving.prepare_text("hello", GenerationParameters())
    assert raw.prompt_ids == r1_tokenizer("hello")["input_ids"]
    chat = serving.prepare_text("hello", GenerationParameters(chat=True))
    assert r1_tokenizer.decode(chat.prompt_ids).endswith("<｜Assistant｜><think>\n")
    assert (await serving.complete(chat)).content == "<think>\nok"


# ------------------------------------------------------------------ text helpers
def test_incremental_detokenizer_matches_full_decode(r1_tokenizer):
    text = "Grüße, 世界! 🙂 naïve café — ok\n  indented"
    ids = r1_tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(r1_tokenizer, prompt_ids=r1_tokenizer.encode("Q:", add_special_tokens=False))
    pieces = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


@pytest.mark.parametrize("cut", range(1, 12))
def test_stop_matcher_finds_a_stop_split_across_chunks(cut):
    text = "abc STOP def"
    matcher = StopMatcher(["STOP"])
    first, hit = matcher.feed(text[:cut])
    rest = ""
    if not hit:  # after a match the caller stops feeding
        rest, hit = matcher.feed(text[cut:])
    assert first + rest == "abc " and hit


def test_stop_matcher_releases_held_text_at_the_end():
    matcher = StopMatcher(["STOP"])
    assert matcher.feed("abc ST") == ("abc ", False)
    assert matcher.feed("", final=True) == ("ST", False)


# ------------------------------------------------------------------ the HTTP layer over ASGI
# server.py's OpenAI routes on a bare FastAPI app, driven by the openai SDK and httpx in-process.
# The real ModelServer + engine + tiny model run in tests/integration/runtime/test_server.py.
import httpx  # noqa: E402
import openai  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402

from model_runtime.metrics import RuntimeMetrics  # noqa: E402
from model_runtime.server import DistilleryModel, RuntimeOptions, add_openai_routes  # noqa: E402


def make_app(tokenizer, text: str = "", *, engine: ScriptedEngine | None = None, ready: bool = True,
             **options) -> tuple[FastAPI, ScriptedEngine, CollectorRegistry]:
    registry = CollectorRegistry()
    model = DistilleryModel(RuntimeOptions(model_name="r1", model_dir="/nowhere", **options),
                            metrics=RuntimeMetrics("r1", registry))
    engine = engine or ScriptedEngine(tokenizer.encode(text, add_special_tokens=False) + [EOS])
    if ready:
        model.attach(fake_loaded(tokenizer), engine)
    app = FastAPI()
    add_openai_routes(app, model)
    return app, engine, registry


def http(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://runtime")


def sdk(app: FastAPI) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url="http://runtime/v1", api_key="none", http_client=http(app), max_retries=0)


async def test_openai_sdk_chat_plain_and_streaming_with_reasoning(r1_tokenizer):
    app, _, registry = make_app(r1_tokenizer, "Add them.</think>\n\n4", think_prefix=True, separate_reasoning=True)
    client = sdk(app)
    msgs = [{"role": "user", "content": "2+2?"}]
    reply = await client.chat.completions.create(model="r1", messages=msgs)
    assert reply.choices[0].message.content == "\n\n4"
    assert reply.choices[0].message.model_extra["reasoning_content"] == "Add them."
    assert reply.choices[0].finish_reason == "stop" and reply.usage.completion_tokens > 0

    stream = await client.chat.completions.create(
        model="r1", messages=msgs, stream=True, stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
                        for c in chunks if c.choices)
    assert (reasoning, content) == ("Add them.", "\n\n4")
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == reply.usage.total_tokens
    assert registry.get_sample_value("distillery_requests_total",
                                     {"model_name": "r1", "endpoint": "chat", "status": "200"}) == 2
    assert registry.get_sample_value("distillery_requests_in_flight", {"model_name": "r1"}) == 0


async def test_openai_sdk_completions_and_models(r1_tokenizer):
    app, _, _ = make_app(r1_tokenizer, " world")
    client = sdk(app)
    done = await client.completions.create(model="r1", prompt="Hello", max_tokens=5)
    assert done.choices[0].text == " world" and done.choices[0].finish_reason == "stop"
    pieces = [c.choices[0].text async for c in await client.completions.create(model="r1", prompt="Hello",
                                                                                stream=True)]
    assert "".join(pieces) == " world"
    models = await client.models.list()
    assert [m.id for m in models.data] == ["r1"]
    retrieve = openai.AsyncOpenAI(base_url="http://runtime/openai/v1", api_key="none", http_client=http(app))
    assert (await retrieve.models.retrieve("r1")).id == "r1"
    with pytest.raises(openai.NotFoundError):
        await retrieve.models.retrieve("other")
    async with http(app) as h:  # the same path still answers KServe V1's model list shape
        assert (await h.get("/v1/models")).json()["models"] == ["r1"]


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        (b'{"model": "r1", "messages": [{"role": "wizard", "content": "x"}]}', 400, "messages.0.role"),
        (b'{"model": "r1", "messages": []}', 400, "messages"),
        (b'{"model": "r1", "messages": [{"role": "user", "content": "x"}], "n": 0}', 400, "n"),
        # more choices than the server's batch + queue can ever hold: a 400, not an endless 429
        (b'{"model": "r1", "messages": [{"role": "user", "content": "x"}], "n": 100}', 400, "n"),
        (b'{"model": "r1", "messages": [{"role": "user", "content": "x"}], "functions": []}', 400, "functions"),
        (b'{"model": "r1", "messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}', 400,
         "max_tokens"),
        (b'{"model": "nope", "messages": [{"role": "user", "content": "x"}]}', 404, "model"),
        (b'{"messages": [{"role": "user", "content": "x"}]}', 400, "model"),
    ],
)
async def test_bad_requests_get_openai_error_bodies(r1_tokenizer, body, status, param):
    app, engine, _ = make_app(r1_tokenizer, "x")
    async with http(app) as h:
        for path in ("/v1/chat/completions", "/openai/v1/chat/completions"):
            resp = await h.post(path, content=body, headers={"content-type": "application/json"})
            assert resp.status_code == status, resp.text
            error = resp.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"]
            assert error["param"] == param
    assert engine.calls == []


async def test_queue_full_is_429_with_retry_after_also_when_streaming(r1_tokenizer):
    app, _, registry = make_app(r1_tokenizer, engine=ScriptedEngine([], queue_full=True))
    async with http(app) as h:
        for stream in (False, True):
            resp = await h.post("/v1/chat/completions", json={
                "model": "r1", "stream": stream, "messages": [{"role": "user", "content": "x"}]})
            assert resp.status_code == 429 and resp.headers["retry-after"] == "2"
            assert resp.json()["error"]["code"] == "queue_full"
    assert registry.get_sample_value("distillery_queue_rejected_total", {"model_name": "r1"}) == 2


async def test_oversized_body_is_413(r1_tokenizer):
    app, engine, _ = make_app(r1_tokenizer, "x")
    async with http(app) as h:
        resp = await h.post("/v1/completions", content=b" " * (16 * 2**20 + 1))
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "body_too_large"
    assert engine.calls == []


async def test_not_ready_is_503(r1_tokenizer):
    app, _, _ = make_app(r1_tokenizer, ready=False)
    async with http(app) as h:
        resp = await h.post("/v1/completions", json={"model": "r1", "prompt": "x"})
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "model_not_ready"


async def test_a_failing_request_gets_an_error_body_not_a_hang(r1_tokenizer):
    """finish_reason "error" from the engine: 500 with a body, or an SSE error event + [DONE] mid-stream."""
    tokens = r1_tokenizer.encode("partial output", add_special_tokens=False)
    app, _, _ = make_app(r1_tokenizer, engine=ScriptedEngine(tokens, finish="error"))
    async with http(app) as h:
        body = {"model": "r1", "messages": [{"role": "user", "content": "x"}]}
        resp = await h.post("/v1/chat/completions", json=body)
        assert resp.status_code == 500 and resp.json()["error"]["code"] == "generation_error"
        resp = await h.post("/v1/chat/completions", json={**body, "stream": True})
        assert resp.status_code == 200  # headers were sent with the first token
        events = [line[6:] for line in resp.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and '"generation_error"' in events[-2]
