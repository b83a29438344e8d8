"""The OpenAI routes' fan-out and log-probabilities against a scripted engine (the real R1 tokenizer, no
model): prompt forms x n / best_of with choice indices and summed usage, echo (with max_tokens 0), the
completions and chat logprobs shapes (also streamed), every sampling control reaching SamplingParams,
generation_config defaults, and /openapi.json. The live server's tests (tests/integration/runtime/
test_openai_parity.py) check the same against the real engine and transformers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from transformers import AutoTokenizer

from model_runtime.engine import TokenEvent
from tests.unit.runtime.test_serving import EOS, http, make_app

TOKENS = [21, 22, 23]  # what the scripted engine generates (then EOS)


class LogprobEngine:
    """Replays TOKENS + EOS with made-up log-probabilities that depend on the seed (so best_of has
    something to rank): token i of a request seeded s has logprob -(s % 5 + 1) / 10 - i / 100."""

    def __init__(self, tokens: list[int] | None = None) -> None:
        self.tokens = (tokens if tokens is not None else TOKENS) + [EOS]
        self.calls: list[tuple[list[int], Any, str]] = []

    @staticmethod
    def logprob(seed: int | None, i: int) -> float:
        return -((seed or 0) % 5 + 1) / 10 - i / 100

    async def generate(self, prompt_ids: list[int], params: Any, request_id: str) -> AsyncIterator[TokenEvent]:
        self.calls.append((list(prompt_ids), params, request_id))
        prompt_lps = None
        if params.prompt_logprobs is not None:
            prompt_lps = [(None if j == 0 else -0.5, [] if j == 0 else [(t, -0.5), (t + 1, -1.5)][:params.prompt_logprobs])
                          for j, t in enumerate(prompt_ids)]
        if params.max_tokens == 0:
            yield TokenEvent(None, "length", len(prompt_ids), 0, prompt_logprobs=prompt_lps)
            return
        tokens = self.tokens[:params.max_tokens]
        for i, token in enumerate(tokens):
            last = i == len(tokens) - 1
            reason = ("length" if len(self.tokens) > params.max_tokens else "stop") if last else None
            lp = self.logprob(params.seed, i) if params.logprobs is not None else None
            top = [(token, lp), (token + 100, lp - 1), (token + 200, lp - 2)][:params.logprobs] \
                if params.logprobs is not None and lp is not None else None
            yield TokenEvent(token, reason, len(prompt_ids), i + 1, logprob=lp, top_logprobs=top,
                             prompt_logprobs=prompt_lps if i == 0 else None)
            await asyncio.sleep(0)

    def abort(self, request_id: str) -> None:
        pass

    def stop(self) -> None:
        pass


@pytest.fixture(scope="module")
def tok(r1_tokenizer_dir):
    return AutoTokenizer.from_pretrained(str(r1_tokenizer_dir))


def app_with(tok, engine: LogprobEngine | None = None, **options):
    engine = engine or LogprobEngine()
    app, _, _ = make_app(tok, engine=engine, **options)  # type: ignore[arg-type]
    return app, engine


async def post(app, path: str, body: dict) -> Any:
    async with http(app) as h:
        return await h.post(path, json={"model": "r1", **body})


async def sse(app, path: str, body: dict) -> list[dict]:
    async with http(app) as h:
        resp = await h.post(path, json={"model": "r1", "stream": True, **body})
        assert resp.status_code == 200, resp.text
        lines = [line[6:] for line in resp.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


# --------------------------------------------------------------------------- completions
async def test_lm_eval_loglikelihood_request_token_prompts_echo_logprobs(tok):
    """lm-evaluation-harness's local-completions loglikelihood request, as it sends it."""
    app, engine = app_with(tok)
    prompts = [[100, 101, 102, 103], [200, 201]]
    resp = await post(app, "/v1/completions", {"prompt": prompts, "echo": True, "logprobs": 1, "max_tokens": 1,
                                               "temperature": 0, "seed": 1234})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    for prompt, choice in zip(prompts, body["choices"], strict=True):
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(prompt) + 1
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert lp["token_logprobs"][1:-1] == [-0.5] * (len(prompt) - 1)
        assert lp["token_logprobs"][-1] == pytest.approx(LogprobEngine.logprob(1234, 0))
        for top, token, value in zip(lp["top_logprobs"][1:], lp["tokens"][1:], lp["token_logprobs"][1:], strict=True):
            assert top[token] == value and len(top) <= 2  # the top-1 and the token itself
        assert lp["tokens"][:len(prompt)] == [tok.decode([t]) for t in prompt]
        assert choice["text"].startswith(tok.decode(prompt)) and choice["finish_reason"] == "length"
        assert lp["text_offset"][0] == 0
        assert all(b - a == len(t) for a, b, t in zip(lp["text_offset"], lp["text_offset"][1:], lp["tokens"],
                                                      strict=False))
    assert body["usage"] == {"prompt_tokens": 6, "completion_tokens": 2, "total_tokens": 8}
    assert [call[0] for call in engine.calls] == prompts  # token ids as sent: no BOS added
    assert all(call[1].prompt_logprobs == 1 and call[1].logprobs == 1 for call in engine.calls)


async def test_echo_with_max_tokens_zero(tok):
    app, engine = app_with(tok)
    resp = await post(app, "/v1/completions", {"prompt": "Hello world", "echo": True, "logprobs": 0,
                                               "max_tokens": 0})
    choice = resp.json()["choices"][0]
    ids = tok("Hello world")["input_ids"]
    assert choice["text"] == "Hello world" and choice["finish_reason"] == "length"
    assert len(choice["logprobs"]["tokens"]) == len(ids) and choice["logprobs"]["token_logprobs"][0] is None
    assert resp.json()["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    # echo alone (no logprobs) needs no engine at all
    engine.calls.clear()
    resp = await post(app, "/v1/completions", {"prompt": [[5, 6]], "echo": True, "max_tokens": 0})
    assert resp.json()["choices"][0]["text"] == tok.decode([5, 6]) and engine.calls == []
    # without echo, max_tokens 0 is refused
    resp = await post(app, "/v1/completions", {"prompt": "x", "max_tokens": 0})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "max_tokens"


async def test_list_prompts_times_n_index_and_usage(tok):
    app, engine = app_with(tok)
    resp = await post(app, "/v1/completions", {"prompt": ["one", "two three"], "n": 2, "seed": 10, "max_tokens": 2})
    body = resp.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in body["choices"]] == [tok.decode(TOKENS[:2])] * 4
    lens = [len(tok(p)["input_ids"]) for p in ("one", "two three")]
    assert body["usage"] == {"prompt_tokens": sum(lens), "completion_tokens": 8, "total_tokens": sum(lens) + 8}
    assert [call[1].seed for call in engine.calls] == [10, 11, 10, 11]  # seed + i per choice
    assert all(c["logprobs"] is None for c in body["choices"])


async def test_best_of_keeps_the_most_likely_and_counts_all_tokens(tok):
    app, engine = app_with(tok)
    resp = await post(app, "/v1/completions", {"prompt": "x", "n": 1, "best_of": 3, "seed": 2, "max_tokens": 3})
    body = resp.json()
    # seeds 2, 3, 4: the logprob is -(s % 5 + 1) / 10, highest for seed 2
    assert len(body["choices"]) == 1 and body["choices"][0]["index"] == 0
    assert body["choices"][0]["logprobs"] is None  # not asked for, though the engine computed them
    assert body["usage"]["completion_tokens"] == 9
    assert [call[1].logprobs for call in engine.calls] == [0, 0, 0]
    resp = await post(app, "/v1/completions", {"prompt": "x", "n": 2, "best_of": 3, "seed": 3, "logprobs": 0,
                                               "max_tokens": 2})
    sums = [sum(c["logprobs"]["token_logprobs"]) for c in resp.json()["choices"]]
    # seeds 3, 4, 5 sum to -0.81, -1.01, -0.21: the best two, best first
    assert sums == pytest.approx([-0.21, -0.81])
    for bad, param in (({"best_of": 1, "n": 2}, "best_of"), ({"best_of": 2, "stream": True}, "best_of")):
        resp = await post(app, "/v1/completions", {"prompt": "x", **bad})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == param


async def test_completion_stream_carries_logprobs_per_choice_and_usage(tok):
    app, _ = app_with(tok)
    body = {"prompt": [[7, 8, 9]], "n": 2, "logprobs": 2, "echo": True, "max_tokens": 3, "seed": 1,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    chunks = await sse(app, "/v1/completions", body)
    whole = (await post(app, "/v1/completions", {**body, "stream": False, "stream_options": None})).json()
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == index]
        assert "".join(c["text"] for c in mine) == whole["choices"][index]["text"]
        for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            assert sum((c["logprobs"][key] for c in mine), []) == whole["choices"][index]["logprobs"][key]
        assert mine[-1]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    assert all("usage" in c for c in chunks)  # continuous_usage_stats: every chunk


# --------------------------------------------------------------------------- chat
async def test_chat_logprobs_shape_and_n(tok):
    app, engine = app_with(tok)
    resp = await post(app, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 3,
                                                    "logprobs": True, "top_logprobs": 2, "seed": 5})
    body = resp.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    content = body["choices"][1]["logprobs"]["content"]
    assert [e["token"] for e in content] == [tok.decode([t]) for t in TOKENS + [EOS]]
    first = content[0]
    assert first["logprob"] == pytest.approx(LogprobEngine.logprob(6, 0))
    assert first["bytes"] == list(first["token"].encode())
    assert [t["logprob"] for t in first["top_logprobs"]] == pytest.approx([first["logprob"], first["logprob"] - 1])
    assert set(first["top_logprobs"][0]) == {"token", "logprob", "bytes"}
    prompt_tokens = len(engine.calls[0][0])
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 12, "total_tokens": prompt_tokens + 12}
    # logprobs without top_logprobs: the chosen token only; top_logprobs without logprobs: refused
    resp = await post(app, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True})
    assert resp.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"] == []
    resp = await post(app, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "top_logprobs"
    resp = await post(app, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
    assert resp.json()["choices"][0]["logprobs"] is None


async def test_chat_stream_n_with_logprobs(tok):
    app, _ = app_with(tok)
    chunks = await sse(app, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 2,
                                                     "logprobs": True, "stream_options": {"include_usage": True}})
    roles = [c["choices"][0]["index"] for c in chunks if c["choices"] and c["choices"][0]["delta"].get("role")]
    assert roles == [0, 1]
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == index]
        tokens = [e["token"] for c in mine if c["logprobs"] for e in c["logprobs"]["content"]]
        assert tokens == [tok.decode([t]) for t in TOKENS + [EOS]]
        assert mine[-1]["finish_reason"] == "stop"
    assert chunks[-1]["usage"]["completion_tokens"] == 8


# --------------------------------------------------------------------------- sampling controls
CONTROLS = {"top_k": 7, "min_p": 0.1, "presence_penalty": 0.5, "frequency_penalty": -0.5, "repetition_penalty": 1.2,
            "logit_bias": {"42": -100}, "stop_token_ids": [5], "min_tokens": 2, "ignore_eos": True, "seed": 3}


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
async def test_every_control_reaches_the_engine(tok, path):
    app, engine = app_with(tok)
    body = {"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"}
    resp = await post(app, path, {**body, **CONTROLS, "max_tokens": 4})
    assert resp.status_code == 200, resp.text
    params = engine.calls[0][1]
    expected = {**CONTROLS, "logit_bias": {42: -100.0}}
    assert {k: getattr(params, k) for k in expected} == expected


async def test_kserve_v1_parameters_reach_the_engine(tok):
    app, engine = app_with(tok)
    async with http(app) as h:
        resp = await h.post("/v1/models/r1:predict", json={"instances": ["hi"], "parameters": {
            "top_k": 3, "repetition_penalty": 1.1, "min_tokens": 1, "max_tokens": 3}})
    assert resp.status_code == 200, resp.text
    params = engine.calls[0][1]
    assert (params.top_k, params.repetition_penalty, params.min_tokens) == (3, 1.1, 1)


async def test_defaults_request_then_flag_then_generation_config(tok):
    from model_runtime.protocol import CompletionRequest
    from model_runtime.serving import Serving, ServingConfig
    from tests.unit.runtime.test_serving import fake_loaded

    engine = LogprobEngine()
    loaded = fake_loaded(tok, generation_defaults={"temperature": 0.6, "top_p": 0.95, "top_k": 20,
                                                   "repetition_penalty": 1.05})
    serving = Serving(loaded, engine, ServingConfig(model_name="r1"))
    req = CompletionRequest.model_validate({"model": "r1", "prompt": "x"})
    p = serving.prepare_completion(req).params
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty) == (0.6, 0.95, 20, 1.05)
    flagged = Serving(loaded, engine, ServingConfig(model_name="r1", default_top_k=5, default_repetition_penalty=1.1))
    p = flagged.prepare_completion(req).params
    assert (p.top_k, p.repetition_penalty) == (5, 1.1)
    req = CompletionRequest.model_validate({"model": "r1", "prompt": "x", "top_k": -1, "repetition_penalty": 1.0})
    p = flagged.prepare_completion(req).params
    assert (p.top_k, p.repetition_penalty) == (-1, 1.0)
    neutral = Serving(fake_loaded(tok, generation_defaults={}), engine, ServingConfig(model_name="r1"))
    p = neutral.prepare_completion(CompletionRequest.model_validate({"model": "r1", "prompt": "x"})).params
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty, p.min_p) == (1.0, 1.0, -1, 1.0, 0.0)


@pytest.mark.parametrize(("fields", "param"), [
    ({"logit_bias": {"999999": 1}}, "logit_bias"), ({"stop_token_ids": [999999]}, "stop_token_ids"),
    ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"), ({"prompt": [[1, 999999]]}, "prompt"),
])
async def test_model_dependent_checks(tok, fields, param):
    app, engine = app_with(tok)
    resp = await post(app, "/v1/completions", {"prompt": "x", **fields})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == param, resp.text
    assert engine.calls == []


async def test_unknown_field_is_a_400_naming_it(tok):
    app, engine = app_with(tok)
    resp = await post(app, "/v1/completions", {"prompt": "x", "guided_regex": "a+"})
    error = resp.json()["error"]
    assert resp.status_code == 400 and error["param"] == "guided_regex" and "not implement" in error["message"]
    assert engine.calls == []


# --------------------------------------------------------------------------- OpenAPI
async def test_openapi_documents_the_openai_request_fields(tok):
    app, _ = app_with(tok)
    async with http(app) as h:
        doc = (await h.get("/openapi.json")).json()
    schemas = doc["components"]["schemas"]
    for path, name, fields in (
        ("/v1/completions", "CompletionRequest", {"prompt", "echo", "logprobs", "best_of", "n", "top_k", "min_p",
                                                  "logit_bias", "repetition_penalty", "stop_token_ids"}),
        ("/openai/v1/chat/completions", "ChatCompletionRequest", {"messages", "logprobs", "top_logprobs", "n",
                                                                  "presence_penalty", "frequency_penalty",
                                                                  "min_tokens", "ignore_eos", "seed"}),
    ):
        body = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{name}"}
        assert fields <= set(schemas[name]["properties"])
        assert schemas[name]["additionalProperties"] is False
    refs = json.dumps(doc)
    for ref in {part.split('"')[0] for part in refs.split("#/components/schemas/")[1:]}:
        assert ref in schemas, ref  # every reference resolves


async def test_runtime_flag_defaults_reach_the_engine(tok):
    app, engine = app_with(tok, default_top_k=5, default_repetition_penalty=1.1)
    resp = await post(app, "/v1/completions", {"prompt": "x", "max_tokens": 2})
    assert resp.status_code == 200, resp.text
    assert (engine.calls[0][1].top_k, engine.calls[0][1].repetition_penalty) == (5, 1.1)


async def test_the_openai_sdk_reads_the_logprobs(tok):
    from tests.unit.runtime.test_serving import sdk

    app, _ = app_with(tok)
    client = sdk(app)
    done = await client.completions.create(model="r1", prompt=[[7, 8]], echo=True, logprobs=2, max_tokens=2, n=2)
    assert [c.index for c in done.choices] == [0, 1]
    lp = done.choices[1].logprobs
    assert lp is not None and lp.token_logprobs is not None and lp.token_logprobs[0] is None
    assert lp.tokens is not None and len(lp.tokens) == 4 and lp.top_logprobs is not None
    chat = await client.chat.completions.create(model="r1", messages=[{"role": "user", "content": "hi"}],
                                                logprobs=True, top_logprobs=1)
    content = chat.choices[0].logprobs.content
    assert content is not None and content[0].top_logprobs[0].logprob == content[0].logprob
