"""Wire formats of the runtime's HTTP APIs, as pydantic models and nothing else.

OpenAI chat completions / completions / models (with SSE chunks and usage), the OpenAI error body,
and KServe V1 (`instances` -> `predictions`) and V2 (BYTES tensors) for text in / text out.
Validation that needs the model (context length, model name) lives in serving.py; this module only
checks the shape and the ranges of the fields.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator

# Roles a chat message may carry. "developer" is OpenAI's newer name for "system".
ChatRole = Literal["system", "developer", "user", "assistant"]


# --------------------------------------------------------------------------- errors
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def validation_error_param(exc: ValidationError) -> tuple[str, str | None]:
    """(message, param) for the first error of a pydantic ValidationError, OpenAI style.

    param is the dotted path of the offending field ("messages.0.role"), so a client sees where
    its request was wrong.
    """
    errors = exc.errors(include_url=False)
    if not errors:
        return str(exc), None
    # For a union (str | object) pydantic reports every branch; the deepest location is the branch
    # the client meant ("instances.0.prompt: Field required", not "instances.0: not a string").
    first = max(errors, key=lambda e: len(e.get("loc", ())))
    loc = [str(part) for part in first.get("loc", ()) if not _is_union_tag(part)]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid value")
    return (f"{param}: {msg}" if param else msg), param


def _is_union_tag(part: Any) -> bool:
    # pydantic puts the union member's type name into loc ("str", "list[...]"): not a field name.
    # (and a model's class name for a union of models); our field names are all lower case.
    return isinstance(part, str) and (part in {"str", "int", "float", "bool"} or "[" in part or part[:1].isupper())


# --------------------------------------------------------------------------- chat
class TextContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: ChatRole
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    # DeepSeek's API answers 400 when a client sends its reasoning back; so do we.
    reasoning_content: Any = None

    @field_validator("reasoning_content")
    @classmethod
    def _no_reasoning_in_input(cls, value: Any) -> Any:
        if value is not None:
            raise ValueError(
                "reasoning_content must not be sent back in input messages; send only the content"
            )
        return value

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


StopField = str | list[str] | None
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts


class _SamplingFields(BaseModel):
    """Fields shared by chat and text completions."""

    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopField = None
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    user: str | None = None

    @field_validator("n")
    @classmethod
    def _only_one_choice(cls, value: int) -> int:
        if value != 1:
            raise ValueError("only n=1 is supported")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: StopField) -> StopField:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 16:
            raise ValueError("at most 16 stop sequences")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return value

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    # OpenAI's newer name for max_tokens; max_tokens wins when both are set.
    max_completion_tokens: int | None = Field(default=None, ge=1)
    # Features this runtime does not implement: a clear 400 beats silently ignoring them.
    logprobs: bool | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("logprobs are not supported by this runtime")
        return value

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, value: list[Any] | None) -> list[Any] | None:
        if value:
            raise ValueError("tool calling is not supported by this runtime")
        return value

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value and value.get("type", "text") != "text":
            raise ValueError("only response_format type 'text' is supported by this runtime")
        return value


class CompletionRequest(_SamplingFields):
    # A string, a one-element list of strings, or a list of token ids.
    prompt: str | list[str] | list[int]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: int | None) -> int | None:
        if value:
            raise ValueError("logprobs are not supported by this runtime")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("suffix (insertion) is not supported by this runtime")
        return value

    @field_validator("prompt")
    @classmethod
    def _single_prompt(cls, value: str | list[str] | list[int]) -> str | list[str] | list[int]:
        if isinstance(value, list):
            if not value:
                raise ValueError("prompt must not be empty")
            if isinstance(value[0], str) and len(value) != 1:
                raise ValueError("only one prompt per request is supported")
        return value


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatResponseMessage
    finish_reason: str | None
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "distillery"
    max_model_len: int | None = None
    # where a distilled model came from: its artifact's lineage.json (teacher, data, losses, weight hashes)
    lineage: dict[str, Any] | None = None
    # how the runtime runs it: device, dtypes, quantization, kernel backends (model_runtime.plan.KernelPlan)
    kernel_plan: dict[str, Any] | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
    # KServe V1 answers GET /v1/models with {"models": [names]}; the OpenAI route shares that path,
    # so the body carries both shapes and neither kind of client breaks.
    models: list[str] = Field(default_factory=list)


def dump(model: BaseModel) -> dict[str, Any]:
    """JSON-ready dict; drops `reasoning_content` and `usage` when unset, keeps other nulls.

    OpenAI clients expect `content: null` and `finish_reason: null` to be present, while
    `reasoning_content` only exists when reasoning is separated.
    """
    data = model.model_dump(mode="json")
    _drop_none(data, {"reasoning_content", "usage", "max_model_len", "role", "lineage", "kernel_plan"})
    return data


def _drop_none(node: Any, keys: set[str]) -> None:
    if isinstance(node, dict):
        for key in [k for k in node if k in keys and node[k] is None]:
            del node[key]
        for value in node.values():
            _drop_none(value, keys)
    elif isinstance(node, list):
        for item in node:
            _drop_none(item, keys)


# --------------------------------------------------------------------------- KServe V1 / V2
class GenerationParameters(BaseModel):
    """Sampling parameters a V1 instance or a V1/V2 request's `parameters` may carry."""

    model_config = ConfigDict(extra="ignore")
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: StopField = None
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    # chat=True applies the chat template to the text (as one user message); default raw prompt.
    chat: bool = False


class V1Instance(GenerationParameters):
    prompt: str = Field(validation_alias=AliasChoices("prompt", "text"))


class V1Request(BaseModel):
    """`{"instances": ["text", {"prompt": "text", "max_tokens": 8}], "parameters": {...}}`"""

    model_config = ConfigDict(extra="ignore")
    instances: list[str | V1Instance] = Field(min_length=1, max_length=64)
    parameters: GenerationParameters = Field(default_factory=GenerationParameters)


class V1Response(BaseModel):
    predictions: list[str]


class V2Tensor(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    shape: list[int]
    datatype: Literal["BYTES"]
    data: list[str]
    parameters: dict[str, Any] | None = None


class V2Request(BaseModel):
    """Open Inference Protocol request with one BYTES input tensor of prompts."""

    model_config = ConfigDict(extra="ignore")
    id: str | None = None
    inputs: list[V2Tensor] = Field(min_length=1, max_length=1)
    parameters: GenerationParameters = Field(default_factory=GenerationParameters)


class V2Response(BaseModel):
    model_name: str
    id: str
    outputs: list[V2Tensor]
