"""Wire formats of the runtime's HTTP APIs, as pydantic models and nothing else.

OpenAI chat completions / completions / models (with SSE chunks, usage and log-probabilities), the
OpenAI error body, and KServe V1 (`instances` -> `predictions`) and V2 (BYTES tensors) for text in /
text out. vLLM's OpenAI server is the reference for names and semantics of the extensions (top_k,
min_p, repetition_penalty, stop_token_ids, min_tokens, ignore_eos, ...).
The OpenAI request models refuse a field they do not know (extra="forbid": a 400 naming it), so a
control the runtime does not implement is never silently dropped; harmless metadata real clients
send (user, metadata, service_tier, ...) is declared and accepted.
Validation that needs the model (context length, model name, vocabulary) lives in serving.py; this
module only checks the shape and the ranges of the fields.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)

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
    parts = list(first.get("loc", ()))
    if first.get("type") == "extra_forbidden":
        # the last part is the client's own field name (any spelling): keep it as it is
        loc = [str(part) for part in parts[:-1] if not _is_union_tag(part)] + [str(parts[-1])]
        msg = "unsupported field: this runtime does not implement it (refused rather than silently ignored)"
    else:
        loc = [str(part) for part in parts if not _is_union_tag(part)]
        msg = first.get("msg", "invalid value")
    param = ".".join(loc) or None
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
    # an unknown field (e.g. DeepSeek's `prefix`) would change the answer if it were implemented: refused
    model_config = ConfigDict(extra="forbid")
    role: ChatRole
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    # DeepSeek's API answers 400 when a client sends its reasoning back; so do we.
    reasoning_content: Any = None
    # what the openai SDK's message.model_dump() carries when a client appends an answer to the history:
    # accepted while empty (no tool calls, no audio)
    refusal: str | None = None
    annotations: list[Any] | None = None
    audio: Any = None
    function_call: Any = None
    tool_calls: Any = None

    @field_validator("reasoning_content")
    @classmethod
    def _no_reasoning_in_input(cls, value: Any) -> Any:
        if value is not None:
            raise ValueError(
                "reasoning_content must not be sent back in input messages; send only the content"
            )
        return value

    @field_validator("audio", "function_call", "tool_calls")
    @classmethod
    def _nothing_from_tools(cls, value: Any) -> Any:
        if value:
            raise ValueError("tool calls and audio are not supported by this runtime")
        return value

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool | None = False
    # vLLM's extension (guidellm sends it): every chunk carries the usage so far
    continuous_usage_stats: bool | None = False


StopField = str | list[str] | None
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts
LOGPROBS_MAX = 20  # vLLM's default max_logprobs (OpenAI's own limit is 5 for completions, 20 for chat)
MAX_CHOICES = 128  # n / best_of; the server also bounds n x prompts by what its queue can hold


class SamplingControls(BaseModel):
    """The sampling controls of every generation route (OpenAI's and vLLM's names and ranges)."""

    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = None  # -1: off
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    # token id (as a string, OpenAI's form; an int key is accepted too) -> bias added to its logit
    logit_bias: dict[str, float] | None = None
    stop_token_ids: list[StrictInt] | None = Field(default=None, max_length=256)
    min_tokens: int = Field(default=0, ge=0)
    ignore_eos: bool = False
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    stop: StopField = None

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, value: int | None) -> int | None:
        if value is not None and value != -1 and value < 1:
            raise ValueError("top_k must be -1 (off) or at least 1")
        return value

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _logit_bias(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, dict):
            raise ValueError("logit_bias must be an object of token id -> bias")
        if len(value) > 1024:
            raise ValueError("logit_bias holds at most 1024 token ids")
        out: dict[str, float] = {}
        for key, bias in value.items():
            token = str(key)
            if not token.isdigit():
                raise ValueError(f"logit_bias key {token[:32]!r} is not a token id (a non-negative integer)")
            if isinstance(bias, bool) or not isinstance(bias, int | float) or not -100 <= bias <= 100:
                raise ValueError(f"logit_bias[{token}] must be a number in [-100, 100]")
            out[str(int(token))] = float(bias)
        return out

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_ids(cls, value: list[int] | None) -> list[int] | None:
        if value and any(t < 0 for t in value):
            raise ValueError("stop_token_ids must be non-negative token ids")
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

    def logit_bias_ids(self) -> dict[int, float]:
        return {int(k): v for k, v in (self.logit_bias or {}).items()}


# Fields clients send (often vLLM's extensions) that are harmless at the value this runtime always uses;
# any other value would change the output in a way not implemented here, so it is refused.
_FIXED_VALUES: dict[str, tuple[Any, ...]] = {
    "skip_special_tokens": (True,),
    "spaces_between_special_tokens": (True,),
    "include_stop_str_in_output": (False,),
    "use_beam_search": (False,),
    "length_penalty": (1, 1.0),
    "truncate_prompt_tokens": (None,),
    "store": (False, None),
    "add_generation_prompt": (True,),
    "continue_final_message": (False,),
    "echo": (False,),  # chat: vLLM's echo of the last message
}


def _check_fixed(value: Any, info: ValidationInfo) -> Any:
    allowed = _FIXED_VALUES[info.field_name or ""]
    if not any(value is a if a is None or isinstance(a, bool) else (value == a and not isinstance(value, bool))
               for a in allowed):
        shown = " or ".join(json.dumps(a) for a in allowed)
        raise ValueError(f"only {shown} is supported by this runtime")
    return value


class _SamplingFields(SamplingControls):
    """Fields shared by chat and text completions."""

    model_config = ConfigDict(extra="forbid")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # accepted at their only supported value (see _FIXED_VALUES)
    skip_special_tokens: Any = True
    spaces_between_special_tokens: Any = True
    include_stop_str_in_output: Any = False
    use_beam_search: Any = False
    length_penalty: Any = 1.0
    truncate_prompt_tokens: Any = None

    @field_validator("skip_special_tokens", "spaces_between_special_tokens", "include_stop_str_in_output",
                     "use_beam_search", "length_penalty", "truncate_prompt_tokens")
    @classmethod
    def _fixed(cls, value: Any, info: ValidationInfo) -> Any:
        return _check_fixed(value, info)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage
                    and self.stream_options.continuous_usage_stats)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    # OpenAI's newer name for max_tokens; max_tokens wins when both are set.
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=LOGPROBS_MAX)
    # Features this runtime does not implement: a clear 400 beats silently ignoring them.
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None  # meaningless without tools: accepted
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None
    # metadata that changes nothing in the output
    metadata: dict[str, str] | None = None
    store: Any = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    add_generation_prompt: Any = True
    continue_final_message: Any = False
    echo: Any = False

    @field_validator("store", "add_generation_prompt", "continue_final_message", "echo")
    @classmethod
    def _fixed_chat(cls, value: Any, info: ValidationInfo) -> Any:
        return _check_fixed(value, info)

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, value: list[Any] | None) -> list[Any] | None:
        if value:
            raise ValueError("tool calling is not supported by this runtime")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _no_tool_choice(cls, value: Any) -> Any:
        if value not in (None, "none", "auto"):
            raise ValueError("tool calling is not supported by this runtime (tool_choice may only be none or auto)")
        return value

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value and value.get("type", "text") != "text":
            raise ValueError("only response_format type 'text' is supported by this runtime")
        return value

    @field_validator("modalities")
    @classmethod
    def _text_modality(cls, value: list[str] | None) -> list[str] | None:
        if value and value != ["text"]:
            raise ValueError("only the text modality is supported by this runtime")
        return value


PromptField = StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]


class CompletionRequest(_SamplingFields):
    # A string, a list of strings, a list of token ids, or a list of lists of token ids: each prompt
    # gets its own n choices (choice index = prompt index * n + i).
    prompt: PromptField
    max_tokens: int | None = Field(default=None, ge=0)  # 0: only with echo (the prompt's log-probabilities)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=LOGPROBS_MAX)
    best_of: int | None = Field(default=None, ge=1, le=MAX_CHOICES)
    suffix: str | None = None
    add_special_tokens: Any = True  # vLLM's: the BOS in front of a text prompt

    @field_validator("add_special_tokens")
    @classmethod
    def _bos(cls, value: Any) -> Any:
        if value is not True:
            raise ValueError("only true is supported by this runtime")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("suffix (insertion) is not supported by this runtime")
        return value

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value: PromptField) -> PromptField:
        if isinstance(value, list):
            if not value:
                raise ValueError("prompt must not be empty")
            if any(isinstance(p, list) and not p for p in value):
                raise ValueError("a token-id prompt must not be empty")
        return value

    def prompts(self) -> list[str | list[int]]:
        """Each prompt of the request: a text or a list of token ids."""
        p: Any = self.prompt
        if isinstance(p, str):
            return [p]
        if isinstance(p[0], int):
            return [list(p)]
        return list(p)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    """Chat's shape: one entry per generated token, each with its top alternatives."""

    content: list[TokenLogprob] | None = None


class CompletionLogprobs(BaseModel):
    """The completions API's shape: parallel lists over the tokens of the returned text (with echo, the
    prompt's first: its first token has no log-probability)."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatResponseMessage
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None


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
    logprobs: ChatLogprobs | None = None


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
    logprobs: CompletionLogprobs | None = None


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
class GenerationParameters(SamplingControls):
    """Sampling parameters a V1 instance or a V1/V2 request's `parameters` may carry (the same controls
    as the OpenAI routes). Other keys are KServe protocol parameters (e.g. binary_data_output): ignored."""

    model_config = ConfigDict(extra="ignore")
    max_tokens: int | None = Field(default=None, ge=1)
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
