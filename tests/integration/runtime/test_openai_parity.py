"""The OpenAI routes' parity features on the real runtime (`python -m model_runtime`, tiny Qwen2 with the R1
tokenizer): log-probabilities and echo in the completions and chat shapes (also streamed), token-id and
list prompts, n with a seed, usage sums, sampling controls reaching the engine, unknown fields refused,
and /openapi.json. lm-evaluation-harness itself runs in test_lm_eval_client.py.

The checks are consistency checks across paths of the real engine, so they fail when a path is wrong:
a prompt token's log-probability (prefill) equals the same token's when it was generated (decode); a
prompt's prefix scores its tokens as the whole prompt does; choice i of n=3 with seed s is the single
choice of seed s + i; a stream carries exactly the non-streamed answer's tokens and log-probabilities.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from distillery_contract import flags
from tests.live_runtime import live_runtime

pytestmark = pytest.mark.integration

MODEL = "tiny-r1"
TOL = 1e-4  # float32; the batched and single paths add in different orders


@pytest.fixture(scope="module")
def base(tiny_qwen2_dir, tmp_path_factory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("parity") / "server.log"
    extra = [f"{flags.FLAG_MAX_MODEL_LEN}=256", f"{flags.FLAG_MAX_BATCH_SIZE}=4", f"{flags.FLAG_MAX_QUEUE}=8"]
    with live_runtime(tiny_qwen2_dir, MODEL, log, extra=extra) as url:
        yield url


@pytest.fixture(scope="module")
def tok(tiny_qwen2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_qwen2_dir))


def post(base: str, path: str, **body: Any) -> dict[str, Any]:
    resp = httpx.post(f"{base}/v1/{path}", json={"model": MODEL, **body}, timeout=60)
    assert resp.status_code == 200, resp.text
    data: dict[str, Any] = resp.json()
    return data


def stream(base: str, path: str, **body: Any) -> list[dict[str, Any]]:
    with httpx.stream("POST", f"{base}/v1/{path}", json={"model": MODEL, "stream": True, **body}, timeout=60) as r:
        assert r.status_code == 200, r.read()
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


PROMPT_IDS = [151646, 3838, 374, 220, 17, 10, 17, 30]  # BOS "What is 2+2?"


def test_echo_logprobs_token_prompts_lm_eval_shape(base):
    """lm-eval's loglikelihood request: several token-id prompts, echo, logprobs 1, max_tokens 1."""
    prompts = [PROMPT_IDS, PROMPT_IDS[:5]]
    body = post(base, "completions", prompt=prompts, echo=True, logprobs=1, max_tokens=1, temperature=0, seed=1234)
    assert [c["index"] for c in body["choices"]] == [0, 1]
    whole, prefix = (c["logprobs"] for c in body["choices"])
    for lp, prompt in ((whole, PROMPT_IDS), (prefix, PROMPT_IDS[:5])):
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(prompt) + 1
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        for token, value, top in zip(lp["tokens"][1:], lp["token_logprobs"][1:], lp["top_logprobs"][1:], strict=True):
            assert value <= 0 and top[token] == value and max(top.values()) >= value
        # greedy: the generated token is the most likely one
        assert lp["token_logprobs"][-1] == pytest.approx(max(lp["top_logprobs"][-1].values()))
    # causal: the prefix's tokens score the same in the longer prompt
    assert prefix["token_logprobs"][1:5] == pytest.approx(whole["token_logprobs"][1:5], abs=TOL)
    assert body["usage"]["prompt_tokens"] == len(PROMPT_IDS) + 5 and body["usage"]["completion_tokens"] == 2


def test_generated_token_scores_as_it_does_in_a_prompt(base, tok):
    """decode's log-probability of a greedy token == prefill's of the same token at the end of the prompt."""
    gen = post(base, "completions", prompt=PROMPT_IDS, max_tokens=3, temperature=0, logprobs=3)
    lp = gen["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == 3 and all(len(top) >= 3 for top in lp["top_logprobs"])
    ids = PROMPT_IDS + [tok.convert_tokens_to_ids(tok.convert_ids_to_tokens(i)) for i in
                        tok(gen["choices"][0]["text"], add_special_tokens=False)["input_ids"]][:3]
    echo = post(base, "completions", prompt=ids, echo=True, logprobs=0, max_tokens=0)
    choice = echo["choices"][0]
    assert choice["finish_reason"] == "length" and echo["usage"]["completion_tokens"] == 0
    assert choice["text"] == tok.decode(ids, skip_special_tokens=True)
    if len(ids) == len(PROMPT_IDS) + 3:  # the text re-tokenizes to the same ids (not guaranteed in general)
        assert choice["logprobs"]["token_logprobs"][-3:] == pytest.approx(lp["token_logprobs"], abs=TOL)
    else:  # the first token alone
        assert choice["logprobs"]["token_logprobs"][len(PROMPT_IDS)] == pytest.approx(lp["token_logprobs"][0], abs=TOL)


def test_n_with_seed_is_reproducible_and_is_seed_plus_i(base):
    body = dict(prompt="Once upon a time", n=3, seed=7, max_tokens=6, temperature=1.0, top_p=1.0)
    first = post(base, "completions", **body)
    again = post(base, "completions", **body)
    texts = [c["text"] for c in first["choices"]]
    assert [c["index"] for c in first["choices"]] == [0, 1, 2]
    assert texts == [c["text"] for c in again["choices"]]
    assert len(set(texts)) > 1  # three samples of a near-uniform random model
    singles = [post(base, "completions", **{**body, "n": 1, "seed": 7 + i})["choices"][0]["text"] for i in range(3)]
    assert singles == texts
    assert first["usage"]["completion_tokens"] == 18


def test_list_prompts_usage_counts_each_prompt_once(base):
    prompts = ["Hello", "The capital of France is"]
    both = post(base, "completions", prompt=prompts, n=2, max_tokens=4, temperature=0, ignore_eos=True)
    single = [post(base, "completions", prompt=p, max_tokens=4, temperature=0, ignore_eos=True) for p in prompts]
    assert [c["text"] for c in both["choices"]] == [s["choices"][0]["text"] for s in single for _ in range(2)]
    assert both["usage"]["prompt_tokens"] == sum(s["usage"]["prompt_tokens"] for s in single)
    assert both["usage"]["completion_tokens"] == 16  # ignore_eos: every choice runs to max_tokens


def test_streamed_logprobs_equal_the_whole_answer(base):
    body = dict(prompt=[PROMPT_IDS], max_tokens=5, temperature=0, logprobs=2, echo=True, n=2)
    whole = post(base, "completions", **body)
    chunks = stream(base, "completions", **body, stream_options={"include_usage": True})
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == index]
        assert "".join(c["text"] for c in mine) == whole["choices"][index]["text"]
        for key in ("tokens", "token_logprobs", "text_offset"):
            assert sum((c["logprobs"][key] for c in mine), []) == whole["choices"][index]["logprobs"][key]
    assert chunks[-1]["usage"] == whole["usage"]

    msgs = [{"role": "user", "content": "Hi"}]
    chat = post(base, "chat/completions", messages=msgs, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    content = chat["choices"][0]["logprobs"]["content"]
    assert len(content) == chat["usage"]["completion_tokens"]
    assert all(len(e["top_logprobs"]) == 2 and e["logprob"] == pytest.approx(e["top_logprobs"][0]["logprob"])
               for e in content)  # greedy: the chosen token is the most likely
    chunks = stream(base, "chat/completions", messages=msgs, max_tokens=5, temperature=0, logprobs=True,
                    top_logprobs=2)
    streamed = [e for c in chunks if c["choices"] and c["choices"][0].get("logprobs")
                for e in c["choices"][0]["logprobs"]["content"]]
    assert [e["token"] for e in streamed] == [e["token"] for e in content]
    assert [e["logprob"] for e in streamed] == pytest.approx([e["logprob"] for e in content], abs=TOL)


def test_controls_reach_the_engine(base):
    """logit_bias +100 on one token makes it the greedy choice every step; min_tokens/ignore_eos run on."""
    target = 3838
    body = post(base, "completions", prompt="Hello", max_tokens=4, temperature=0, logit_bias={str(target): 100},
                logprobs=0)
    assert set(body["choices"][0]["logprobs"]["tokens"]) == {body["choices"][0]["logprobs"]["tokens"][0]}
    stopped = post(base, "completions", prompt="Hello", max_tokens=4, temperature=0, logit_bias={str(target): 100},
                   stop_token_ids=[target])
    assert stopped["choices"][0]["finish_reason"] == "stop" and stopped["usage"]["completion_tokens"] == 1


def test_unknown_field_refused_and_openapi_lists_the_fields(base):
    resp = httpx.post(f"{base}/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                                          "reasoning_effort": "high"}, timeout=10)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "reasoning_effort"
    doc = httpx.get(f"{base}/openapi.json", timeout=10).json()
    request = doc["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    fields = doc["components"]["schemas"][request["$ref"].rsplit("/", 1)[1]]["properties"]
    assert {"prompt", "echo", "logprobs", "n", "best_of", "top_k", "logit_bias", "min_tokens"} <= set(fields)
