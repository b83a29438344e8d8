"""Wire-format models: shapes and ranges are checked here, with the offending field as `param`."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from model_runtime.protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatResponseMessage,
    CompletionRequest,
    Usage,
    V1Request,
    V2Request,
    dump,
    validation_error_param,
)


def chat(**overrides):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **overrides}
    return ChatCompletionRequest.model_validate(body)


def param_of(fn, **kwargs) -> str | None:
    with pytest.raises(ValidationError) as err:
        fn(**kwargs)
    return validation_error_param(err.value)[1]


def test_chat_request_accepts_text_parts_and_stop_forms():
    req = chat(
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        ],
        stop="END",
        stream=True,
        stream_options={"include_usage": True},
        user="someone",
    )
    assert req.messages[1].text() == "ab"
    assert req.stop_list() == ["END"]
    assert chat(stop=["x", "y"]).stop_list() == ["x", "y"]
    assert chat().stop_list() == []
    assert req.stream_options is not None and req.stream_options.include_usage


@pytest.mark.parametrize(
    ("overrides", "param"),
    [
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"messages": []}, "messages"),
        ({"n": 0}, "n"),
        ({"n": 129}, "n"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"messages": [{"role": "assistant", "content": "x", "reasoning_content": "thought"}]},
         "messages.0.reasoning_content"),
        ({"top_logprobs": 21}, "top_logprobs"),
        ({"unknown_field": "x"}, "unknown_field"),
        ({"seed": 2**64}, "seed"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
         "messages.0.content.0.type"),
    ],
)
def test_chat_request_rejections_name_the_field(overrides, param):
    got = param_of(chat, **overrides)
    assert got == param


def test_completion_prompt_forms():
    assert CompletionRequest.model_validate({"model": "m", "prompt": "hi"}).prompt == "hi"
    assert CompletionRequest.model_validate({"model": "m", "prompt": ["hi"]}).prompt == ["hi"]
    assert CompletionRequest.model_validate({"model": "m", "prompt": [1, 2, 3]}).prompt == [1, 2, 3]
    assert CompletionRequest.model_validate({"model": "m", "prompt": ["a", "b"]}).prompts() == ["a", "b"]
    assert CompletionRequest.model_validate({"model": "m", "prompt": [[1, 2], [3]]}).prompts() == [[1, 2], [3]]
    assert CompletionRequest.model_validate({"model": "m", "prompt": [1, 2]}).prompts() == [[1, 2]]
    for bad in ([], [[]], [1, "a"], [True], [1.5]):
        with pytest.raises(ValidationError):
            CompletionRequest.model_validate({"model": "m", "prompt": bad})
    for field, value in (("logprobs", 21), ("logprobs", -1), ("suffix", "end"), ("best_of", 0)):
        with pytest.raises(ValidationError):
            CompletionRequest.model_validate({"model": "m", "prompt": "x", field: value})
    assert CompletionRequest.model_validate({"model": "m", "prompt": "x", "logprobs": None}).logprobs is None


def test_dump_keeps_null_content_but_drops_unset_reasoning():
    body = ChatCompletionResponse(
        id="x", model="m", usage=Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3),
        choices=[ChatChoice(message=ChatResponseMessage(content=None), finish_reason="stop")],
    )
    data = dump(body)
    message = data["choices"][0]["message"]
    assert message == {"role": "assistant", "content": None}
    assert data["usage"]["total_tokens"] == 3
    with_reasoning = body.model_copy(deep=True)
    with_reasoning.choices[0].message.reasoning_content = "thought"
    assert dump(with_reasoning)["choices"][0]["message"]["reasoning_content"] == "thought"


def test_kserve_v1_and_v2_shapes():
    v1 = V1Request.model_validate(
        {"instances": ["a", {"prompt": "b", "max_tokens": 3}, {"text": "c"}], "parameters": {"temperature": 0}}
    )
    assert v1.instances[0] == "a"
    assert v1.instances[1].prompt == "b" and v1.instances[1].max_tokens == 3
    assert v1.instances[2].prompt == "c"
    assert v1.parameters.temperature == 0
    with pytest.raises(ValidationError):
        V1Request.model_validate({"instances": []})
    v2 = V2Request.model_validate(
        {"inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES", "data": ["hi"]}],
         "parameters": {"max_tokens": 4}}
    )
    assert v2.inputs[0].data == ["hi"] and v2.parameters.max_tokens == 4
    with pytest.raises(ValidationError):
        V2Request.model_validate({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]})
