"""Every OpenAI request field the runtime knows: accepted in range, refused out of range with the field as
`param`; a field it does not know is refused (never silently dropped); harmless metadata real clients
send (lm-evaluation-harness, guidellm, the openai SDK) is accepted."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from model_runtime.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerationParameters,
    validation_error_param,
)

MESSAGES = [{"role": "user", "content": "hi"}]


def chat(**fields):
    return ChatCompletionRequest.model_validate({"model": "m", "messages": MESSAGES, **fields})


def completion(**fields):
    return CompletionRequest.model_validate({"model": "m", "prompt": "hi", **fields})


def refused(build, **fields) -> tuple[str, str | None]:
    with pytest.raises(ValidationError) as err:
        build(**fields)
    return validation_error_param(err.value)


SAMPLING_OK = [
    {"presence_penalty": -2}, {"presence_penalty": 2}, {"frequency_penalty": 1.5}, {"repetition_penalty": 1.3},
    {"repetition_penalty": 0.5}, {"top_k": -1}, {"top_k": 1}, {"top_k": 50}, {"min_p": 0}, {"min_p": 1},
    {"logit_bias": {"42": 100, "7": -100}}, {"logit_bias": {}}, {"stop_token_ids": [1, 2]}, {"min_tokens": 3},
    {"ignore_eos": True}, {"seed": 7}, {"temperature": 0}, {"top_p": 1},
]
SAMPLING_BAD = [
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"presence_penalty": -2.1}, "presence_penalty"),
    ({"frequency_penalty": 3}, "frequency_penalty"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"repetition_penalty": -1}, "repetition_penalty"), ({"top_k": 0}, "top_k"), ({"top_k": -2}, "top_k"),
    ({"min_p": 1.5}, "min_p"), ({"min_p": -0.1}, "min_p"), ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"), ({"logit_bias": {"-5": 1}}, "logit_bias"),
    ({"logit_bias": {"5": True}}, "logit_bias"), ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"stop_token_ids": ["a"]}, "stop_token_ids.0"), ({"min_tokens": -1}, "min_tokens"),
]


@pytest.mark.parametrize("fields", SAMPLING_OK, ids=str)
@pytest.mark.parametrize("build", [chat, completion], ids=["chat", "completions"])
def test_sampling_controls_accepted_on_both_routes(build, fields):
    req = build(**fields)
    for name, value in fields.items():
        got = getattr(req, name)
        assert got == ({k: float(v) for k, v in value.items()} if name == "logit_bias" else value)


@pytest.mark.parametrize(("fields", "param"), SAMPLING_BAD, ids=str)
@pytest.mark.parametrize("build", [chat, completion], ids=["chat", "completions"])
def test_sampling_controls_out_of_range_name_the_field(build, fields, param):
    assert refused(build, **fields)[1] == param


def test_logit_bias_token_ids_as_ints():
    assert chat(logit_bias={"42": 5}).logit_bias_ids() == {42: 5.0}


@pytest.mark.parametrize(("fields", "param"), [
    ({"logprobs": 21}, "logprobs"), ({"logprobs": -1}, "logprobs"), ({"n": 0}, "n"), ({"best_of": 0}, "best_of"),
    ({"max_tokens": -1}, "max_tokens"), ({"suffix": "x"}, "suffix"), ({"add_special_tokens": False},
                                                                       "add_special_tokens"),
    ({"prompt": []}, "prompt"), ({"prompt": [[]]}, "prompt"), ({"prompt": [1, "a"]}, "prompt.0"),
])
def test_completion_fields_out_of_range(fields, param):
    assert refused(completion, **fields)[1] == param


def test_completion_fields_in_range():
    req = completion(prompt=[[1, 2], [3, 4]], echo=True, logprobs=20, max_tokens=0, n=2, best_of=3)
    assert req.prompts() == [[1, 2], [3, 4]] and req.logprobs == 20 and req.max_tokens == 0
    assert completion(logprobs=0).logprobs == 0


@pytest.mark.parametrize(("fields", "param"), [
    ({"top_logprobs": 21}, "top_logprobs"), ({"top_logprobs": -1}, "top_logprobs"), ({"max_tokens": 0}, "max_tokens"),
    ({"tools": [{"type": "function"}]}, "tools"), ({"tool_choice": "required"}, "tool_choice"),
    ({"response_format": {"type": "json_schema"}}, "response_format"), ({"modalities": ["audio"]}, "modalities"),
    ({"store": True}, "store"), ({"echo": True}, "echo"), ({"continue_final_message": True}, "continue_final_message"),
    ({"stream_options": {"include_usage": True, "other": 1}}, "stream_options.other"),
])
def test_chat_fields_out_of_range(fields, param):
    assert refused(chat, **fields)[1] == param


@pytest.mark.parametrize("name", ["functions", "reasoning_effort", "prediction", "audio", "guided_json",
                                  "prompt_logprobs", "Temperature"])
@pytest.mark.parametrize("build", [chat, completion], ids=["chat", "completions"])
def test_unknown_fields_are_refused_naming_them(build, name):
    message, param = refused(build, **{name: 1})
    assert param == name and "not implement" in message


def test_metadata_real_clients_send_is_accepted():
    # the openai SDK / langchain / guidellm / lm-evaluation-harness's local-chat-completions
    req = chat(user="u", metadata={"k": "v"}, store=False, service_tier="auto", parallel_tool_calls=False,
               tool_choice="none", tools=[], prompt_cache_key="k", safety_identifier="s", modalities=["text"],
               response_format={"type": "text"}, stop=None, ignore_eos=True, max_completion_tokens=4,
               stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True},
               skip_special_tokens=True, logprobs=True, top_logprobs=3, seed=1234, n=2)
    assert req.continuous_usage() and req.include_usage()
    # lm-evaluation-harness's local-completions, loglikelihood and generation requests
    ll = completion(prompt=[[1, 2, 3], [4, 5]], temperature=0, max_tokens=1, logprobs=1, seed=1234, echo=True)
    assert ll.prompts() == [[1, 2, 3], [4, 5]]
    gen = completion(prompt=["a", "b"], max_tokens=8, temperature=0, stop=["\n\n"], seed=1234, top_p=1)
    assert gen.prompts() == ["a", "b"]


def test_kserve_parameters_carry_the_same_controls():
    p = GenerationParameters.model_validate({"top_k": 5, "repetition_penalty": 1.2, "logit_bias": {"3": 1},
                                             "min_tokens": 2, "binary_data_output": True})
    assert (p.top_k, p.repetition_penalty, p.logit_bias_ids(), p.min_tokens) == (5, 1.2, {3: 1.0}, 2)
    with pytest.raises(ValidationError):
        GenerationParameters.model_validate({"top_k": 0})


def test_messages_refuse_what_they_cannot_honour():
    sdk_dump = {"role": "assistant", "content": "4", "refusal": None, "annotations": [], "audio": None,
                "function_call": None, "tool_calls": None}
    req = chat(messages=[{"role": "user", "content": "2+2?"}, sdk_dump, {"role": "user", "content": "and 3+3?"}])
    assert req.messages[1].text() == "4"
    for extra, param in (({"prefix": True}, "messages.0.prefix"),
                         ({"tool_calls": [{"id": "x"}]}, "messages.0.tool_calls")):
        assert refused(chat, messages=[{"role": "assistant", "content": "x", **extra}])[1] == param
