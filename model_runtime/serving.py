"""Turn an API request into a generation job for the engine, and the engine's tokens into text.

Everything between the wire format (protocol.py) and the engine (engine.py) lives here:
- validation that needs the model: model name (404), context length, max_tokens (400);
- the chat template, with DeepSeek-R1's usage recommendations (the R1 model card):
  a system message is folded into the first user turn when the template drops system messages;
  "<think>\\n" is forced after the generation prompt when configured and the template did not add
  it; the thinking is returned as `reasoning_content` when configured;
- sampling defaults: request > runtime flag > the model's generation_config > OpenAI's 1.0;
- incremental detokenization, stop strings (cut from the output; a match aborts the engine
  request), finish_reason and usage.
The HTTP layer (server.py) only parses, calls prepare_*() and stream()/complete(), and writes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
import uuid
import weakref
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

from distillery_contract.distillation import LINEAGE_FILE
from model_runtime.engine import (
    GenerationError,
    QueueFullError,
    RequestTimeoutError,
    SamplingParams,
)
from model_runtime.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    GenerationParameters,
    Usage,
)
from model_runtime.reasoning import THINK_END, THINK_START, ReasoningSplitter

log = logging.getLogger("model_runtime.serving")

THINK_PREFIX = THINK_START + "\n"
_SYSTEM_PROBE = "\x00distillery-system-probe\x00"


class ServingError(Exception):
    """An error with an HTTP status and an OpenAI-style body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",  # noqa: A002 - OpenAI's field name
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> ServingError:
    return ServingError(400, message, param=param, code=code)


@dataclass
class ServingConfig:
    model_name: str
    default_temperature: float | None = None  # None: from generation_config.json
    default_top_p: float | None = None
    default_max_tokens: int | None = None  # None: up to the end of the context
    think_prefix: bool = False
    separate_reasoning: bool = False
    log_prompts: bool = False  # prompt text in logs: for debugging only
    max_prompt_bytes: int | None = None  # None: 32 bytes per token of context, at least 64 KiB
    # Trusted clients only: control tokens typed in message text (e.g. "<｜Assistant｜>") count as such.
    allow_special_tokens_in_content: bool = False


@dataclass
class Job:
    """One generation request, validated and tokenized."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    stop: list[str] = field(default_factory=list)
    separate_reasoning: bool = False
    content_prefix: str = ""  # "<think>\n" when the prompt opened the thinking and it is not separated
    arrival: float = field(default_factory=time.monotonic)


@dataclass
class Delta:
    """A piece of output. The first delta of a job comes once the engine accepted it."""

    content: str = ""
    reasoning: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None


@dataclass
class Output:
    content: str | None
    reasoning: str | None
    finish_reason: str
    usage: Usage


# --------------------------------------------------------------------------- text helpers
class IncrementalDetokenizer:
    """Token ids in, text deltas out, never splitting a multi-byte character or a word's space.

    Decodes a sliding window (prefix_offset..end) and emits only what grew past the previously read
    part (the same scheme as vLLM/TGI); a trailing U+FFFD means an incomplete UTF-8 sequence, so the
    text waits for the next token.
    """

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids[-4:])  # context for the first token's leading space
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        text: str = self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return text

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""


class StopMatcher:
    """Finds stop strings in streamed text; holds back a tail that may still become a stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._buffer = ""

    def feed(self, text: str, final: bool = False) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string matched). After a match, stop feeding."""
        self._buffer += text
        if not self.stops:
            out, self._buffer = self._buffer, ""
            return out, False
        hits = [i for i in (self._buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self._buffer = self._buffer[: min(hits)], ""
            return out, True
        if final:
            out, self._buffer = self._buffer, ""
            return out, False
        keep = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(self._buffer)), keep, -1):
                if self._buffer.endswith(stop[:size]):
                    keep = size
                    break
        cut = len(self._buffer) - keep
        out, self._buffer = self._buffer[:cut], self._buffer[cut:]
        return out, False


def read_lineage(model_path: str | None) -> dict[str, Any] | None:
    """The lineage.json a distillation wrote beside the weights (None for any other model, or an unreadable
    one: provenance is reported, never required)."""
    if not model_path:
        return None
    path = Path(model_path) / LINEAGE_FILE
    try:
        lineage = json.loads(path.read_text())
    except (OSError, ValueError):
        if path.exists():
            log.warning("ignoring unreadable %s", path)
        return None
    return lineage if isinstance(lineage, dict) else None


# --------------------------------------------------------------------------- serving
class Serving:
    """The request -> job -> text path for one loaded model and its engine."""

    def __init__(self, loaded: Any, engine: Any, config: ServingConfig, metrics: Any | None = None) -> None:
        self.tokenizer = loaded.tokenizer
        self.eos_ids = set(loaded.eos_token_ids or [])
        self.max_model_len = int(loaded.max_model_len)
        self.generation_defaults = dict(loaded.generation_defaults or {})
        self.engine = engine
        self.config = config
        self.metrics = metrics
        self.system_role_supported = self._probe_system_role()
        # ids the model has rows for: the tokenizer may know more (R1-Distill-1.5B: 152064 vs 151936)
        self.vocab_size = _model_vocab(loaded, len(self.tokenizer))
        limit = config.max_prompt_bytes
        self.max_prompt_bytes = limit if limit is not None else max(64 * 2**10, 32 * self.max_model_len)
        self._plain: Any = None if config.allow_special_tokens_in_content else plain_text_tokenizer(self.tokenizer)
        self.lineage = read_lineage(getattr(loaded, "source_path", None))

    @property
    def model_name(self) -> str:
        return self.config.model_name

    # ---- validation / preparation
    def check_model(self, name: str) -> None:
        if name != self.config.model_name:
            raise ServingError(
                404,
                f"The model '{name}' does not exist; this server serves '{self.config.model_name}'",
                param="model",
                code="model_not_found",
            )

    def _probe_system_role(self) -> bool:
        """Does the chat template render a system message? (R1's does; Gemma-style ones raise.)"""
        if getattr(self.tokenizer, "chat_template", None) is None:
            return True  # the fallback template renders it
        try:
            text = self.tokenizer.apply_chat_template(
                [{"role": "system", "content": _SYSTEM_PROBE}, {"role": "user", "content": "hi"}],
                tokenize=False,
                add_generation_prompt=True,
            )
        except Exception:
            return False
        return _SYSTEM_PROBE in text

    def render_chat(self, messages: list[ChatMessage]) -> str:
        """The prompt text for a conversation, with the generation prompt (and "<think>\\n")."""
        return self._template(self._chat_dicts(messages))

    def chat_prompt(self, messages: list[ChatMessage]) -> tuple[str, list[int]]:
        """The prompt text and its token ids. Only the template's own text may become control tokens:
        each message's content is tokenized as plain text (unless allow_special_tokens_in_content)."""
        msgs = self._chat_dicts(messages)
        text = self._template(msgs)
        if self._plain is None:
            return text, self._encode(text, add_special_tokens=False)  # the template already has the BOS
        # Render once more with a unique mark in place of each content: the marks split the template's
        # text from the contents. R1's template drops earlier turns' thinking; the second try does too.
        for attempt in (msgs, [_without_thinking(m) for m in msgs]):
            nonce = uuid.uuid4().hex
            skeleton = self._template([{**m, "content": f"\ue000{nonce}:{i}\ue001"} for i, m in enumerate(attempt)])
            parts = re.split(f"\ue000{nonce}:(\\d+)\ue001", skeleton)
            pieces = [(attempt[int(part)]["content"] if k % 2 else part, bool(k % 2)) for k, part in enumerate(parts)]
            if "".join(piece for piece, _ in pieces) == text:
                ids: list[int] = []
                for piece, content in pieces:
                    if piece:
                        ids += self._plain.encode(piece, add_special_tokens=False).ids if content else \
                            self._encode(piece, add_special_tokens=False)
                return text, ids
        raise invalid("messages could not be tokenized safely with the model's chat template", param="messages")

    def _chat_dicts(self, messages: list[ChatMessage]) -> list[dict[str, str]]:
        msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
        if not any(m["role"] == "user" for m in msgs):
            raise invalid("messages must contain at least one user message", param="messages")
        self.check_prompt_bytes(sum(_utf8_len(m["content"]) for m in msgs), "messages")
        if not self.system_role_supported:
            msgs = fold_system_into_first_user(msgs)
        return msgs

    def _template(self, msgs: list[dict[str, str]]) -> str:
        if getattr(self.tokenizer, "chat_template", None) is None:
            text = fallback_chat_template(msgs)
        else:
            try:
                text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            except Exception as exc:  # jinja raise_exception(): e.g. roles must alternate
                raise invalid(f"messages do not fit the model's chat template: {exc}", param="messages") from exc
        if self.config.think_prefix and not text.endswith(THINK_PREFIX):
            text = text + ("\n" if text.endswith(THINK_START) else THINK_PREFIX)
        return text

    def check_prompt_bytes(self, size: int, param: str) -> None:
        """Refuse a prompt far beyond the context before spending CPU on tokenizing it."""
        if size > self.max_prompt_bytes:
            raise invalid(f"the prompt is {size} bytes; this server tokenizes at most {self.max_prompt_bytes} "
                          f"bytes per request (its context is {self.max_model_len} tokens)", param=param,
                          code="context_length_exceeded")

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def _sampling(
        self, prompt_len: int, max_tokens: int | None, temperature: float | None,
        top_p: float | None, seed: int | None, prompt_param: str,
    ) -> SamplingParams:
        if prompt_len == 0:
            raise invalid("the prompt is empty", param=prompt_param)
        room = self.max_model_len - prompt_len
        if room <= 0:
            raise invalid(
                f"This model's maximum context length is {self.max_model_len} tokens; the prompt has "
                f"{prompt_len} tokens. Shorten the prompt.",
                param=prompt_param,
                code="context_length_exceeded",
            )
        if max_tokens is not None and max_tokens > room:
            raise invalid(
                f"max_tokens={max_tokens} plus the prompt's {prompt_len} tokens exceeds this model's "
                f"maximum context length of {self.max_model_len} tokens; use max_tokens <= {room}.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        if max_tokens is None:
            default = self.config.default_max_tokens
            max_tokens = room if default is None else min(default, room)
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self._default("temperature", temperature, self.config.default_temperature),
            top_p=self._default("top_p", top_p, self.config.default_top_p),
            seed=seed,
        )

    def _default(self, name: str, requested: float | None, flag: float | None) -> float:
        if requested is not None:
            return float(requested)
        if flag is not None:
            return float(flag)
        if name == "temperature" and self.generation_defaults.get("do_sample") is False:
            return 0.0  # generation_config says greedy
        value = self.generation_defaults.get(name)
        return 1.0 if value is None else float(value)

    def _job(self, prefix: str, prompt_text: str | None, prompt_ids: list[int], params: SamplingParams,
             stop: list[str], *, chat: bool, separate: bool) -> Job:
        # reasoning_content exists only in chat completions; elsewhere the thinking stays in the text,
        # with the "<think>\n" the prompt opened put back in front so the output is well-formed.
        opens_thinking = prompt_text is not None and prompt_text.endswith(THINK_PREFIX)
        job = Job(
            request_id=f"{prefix}-{uuid.uuid4().hex}",
            prompt_ids=prompt_ids,
            params=params,
            stop=stop,
            separate_reasoning=separate,
            content_prefix=THINK_PREFIX if chat and opens_thinking and not separate else "",
        )
        extra = {"prompt": prompt_text} if self.config.log_prompts and prompt_text is not None else {}
        log.info(
            "request accepted",
            extra={
                "request_id": job.request_id, "prompt_tokens": len(prompt_ids), "max_tokens": params.max_tokens,
                "temperature": params.temperature, "top_p": params.top_p, **extra,
            },
        )
        return job

    def prepare_chat(self, req: ChatCompletionRequest) -> Job:
        self.check_model(req.model)
        text, ids = self.chat_prompt(req.messages)
        max_tokens = req.max_tokens if req.max_tokens is not None else req.max_completion_tokens
        params = self._sampling(len(ids), max_tokens, req.temperature, req.top_p, req.seed, "messages")
        return self._job("chatcmpl", text, ids, params, req.stop_list(), chat=True,
                         separate=self.config.separate_reasoning)

    def prepare_completion(self, req: CompletionRequest) -> Job:
        self.check_model(req.model)
        prompt = req.prompt
        text: str | None
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            ids = [int(t) for t in prompt]
            vocab = self.vocab_size
            if any(t < 0 or t >= vocab for t in ids):
                raise invalid(f"prompt token ids must be in [0, {vocab})", param="prompt")
            text = None
        else:
            # a list whose first item is not an int is a list[str] (the model validates the type)
            text = cast(str, prompt[0]) if isinstance(prompt, list) else prompt
            self.check_prompt_bytes(_utf8_len(str(text)), "prompt")
            ids = self._encode(str(text), add_special_tokens=True)
        params = self._sampling(len(ids), req.max_tokens, req.temperature, req.top_p, req.seed, "prompt")
        return self._job("cmpl", text, ids, params, req.stop_list(), chat=False, separate=False)

    def prepare_text(self, prompt: str, p: GenerationParameters) -> Job:
        """KServe V1/V2: raw text in (or one user turn through the chat template when p.chat)."""
        if p.chat:
            text, ids = self.chat_prompt([ChatMessage(role="user", content=prompt)])
        else:
            text = prompt
            self.check_prompt_bytes(_utf8_len(prompt), "prompt")
            ids = self._encode(prompt, add_special_tokens=True)
        params = self._sampling(len(ids), p.max_tokens, p.temperature, p.top_p, p.seed, "prompt")
        stop = [p.stop] if isinstance(p.stop, str) else list(p.stop or [])
        return self._job("gen", text, ids, params, stop, chat=p.chat, separate=False)  # V1/V2: one text

    # ---- generation
    async def stream(self, job: Job) -> AsyncGenerator[Delta, None]:
        """Deltas of the job's output; the first one as soon as the engine accepted the request.

        Raises ServingError (429 queue full, 504 timeout, 500 generation failure). Closing this
        generator (client gone) closes the engine's, which aborts the request in the engine.
        """
        detok = IncrementalDetokenizer(self.tokenizer, job.prompt_ids)
        stopper = StopMatcher(job.stop)
        splitter = ReasoningSplitter() if job.separate_reasoning else None
        prefix = job.content_prefix
        generated = 0
        first_sent = False
        finish: str | None = None
        events = None
        try:
            events = self.engine.generate(job.prompt_ids, job.params, job.request_id)
            async for event in events:
                piece = ""
                if event.token_id is not None:
                    if generated == 0 and self.metrics is not None:
                        self.metrics.first_token(time.monotonic() - job.arrival)
                    generated += 1
                    if event.token_id not in self.eos_ids:
                        piece = detok.add(event.token_id)
                final = event.finish_reason is not None
                if final:
                    piece += detok.flush()
                    generated = max(generated, event.completion_tokens or 0)
                text, hit = stopper.feed(piece, final)
                if hit:
                    finish = "stop"
                elif final:
                    finish = _finish_reason(event.finish_reason, job.request_id)
                delta = self._split(text, splitter, finish is not None)
                if prefix and (delta.content or delta.reasoning or finish):
                    delta.content, prefix = prefix + delta.content, ""
                if finish is not None:
                    delta.finish_reason = finish
                    delta.usage = Usage(
                        prompt_tokens=len(job.prompt_ids), completion_tokens=generated,
                        total_tokens=len(job.prompt_ids) + generated,
                    )
                    if self.metrics is not None:
                        self.metrics.tokens(len(job.prompt_ids), generated)
                if not first_sent or delta.content or delta.reasoning or finish is not None:
                    first_sent = True
                    yield delta
                if finish is not None:
                    return
            if finish is None:
                raise ServingError(500, "the engine ended the request without a finish reason",
                                   type="server_error", code="generation_error")
        except QueueFullError as exc:
            # (queue_rejected_total counts rejected HTTP requests: the HTTP layer records it once per request)
            retry = max(1, round(float(getattr(exc, "retry_after_s", 1.0) or 1.0)))
            raise ServingError(
                429, "The server is busy: the request queue is full. Retry later.",
                type="rate_limit_error", code="queue_full", headers={"Retry-After": str(retry)},
            ) from exc
        except RequestTimeoutError as exc:
            raise ServingError(504, "The request timed out in the engine.", type="timeout", code="timeout") from exc
        except GenerationError as exc:
            log.error("generation failed", extra={"request_id": job.request_id, "error": str(exc)})
            raise ServingError(500, "Generation failed for this request.", type="server_error",
                               code="generation_error") from exc
        finally:
            if events is not None and hasattr(events, "aclose"):
                await events.aclose()  # aborts the engine request if it is still running

    @staticmethod
    def _split(text: str, splitter: ReasoningSplitter | None, final: bool) -> Delta:
        if splitter is None:
            return Delta(content=text)
        reasoning, content = splitter.feed(text)
        if final:
            r_rest, c_rest = splitter.flush()
            reasoning, content = reasoning + r_rest, content + c_rest
        return Delta(content=content, reasoning=reasoning)

    async def complete(self, job: Job) -> Output:
        content: list[str] = []
        reasoning: list[str] = []
        last = Delta()
        async for delta in self.stream(job):
            content.append(delta.content)
            reasoning.append(delta.reasoning)
            last = delta
        assert last.finish_reason is not None and last.usage is not None
        text = "".join(content)
        thinking = "".join(reasoning)
        if job.separate_reasoning:
            return Output(text or None, thinking or None, last.finish_reason, last.usage)
        return Output(text, None, last.finish_reason, last.usage)


def _finish_reason(engine_reason: str | None, request_id: str) -> str:
    if engine_reason in ("stop", "length"):
        return engine_reason
    if engine_reason == "timeout":
        raise RequestTimeoutError(request_id)
    if engine_reason == "abort":
        raise ServingError(503, "The request was aborted (the server is shutting down?).",
                           type="server_error", code="aborted")
    raise GenerationError(f"request {request_id} ended with {engine_reason}")


def _model_vocab(loaded: Any, tokenizer_len: int) -> int:
    model_vocab = getattr(getattr(loaded, "config", None), "vocab_size", None)
    return min(tokenizer_len, int(model_vocab)) if model_vocab else tokenizer_len


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _without_thinking(msg: dict[str, str]) -> dict[str, str]:
    if msg["role"] == "assistant" and THINK_END in msg["content"]:
        return {**msg, "content": msg["content"].split(THINK_END)[-1]}
    return msg


_plain_tokenizers: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def plain_text_tokenizer(tokenizer: Any) -> Any:
    """A copy of the HF tokenizer's Rust tokenizer that reads every added token (control tokens,
    `<think>`) as plain text: all marked special, special tokens not extracted. Without a Rust
    tokenizer, `split_special_tokens` (which covers only the special ones). Built once per tokenizer
    (the copy goes through the tokenizer's JSON: seconds for R1's)."""
    try:
        return _plain_tokenizers[tokenizer]
    except (KeyError, TypeError):
        pass
    plain = _build_plain_tokenizer(tokenizer)
    with contextlib.suppress(TypeError):
        _plain_tokenizers[tokenizer] = plain
    return plain


def _build_plain_tokenizer(tokenizer: Any) -> Any:
    import json

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return _SplitSpecial(tokenizer)
    from tokenizers import Tokenizer

    spec = json.loads(backend.to_str())
    for added in spec.get("added_tokens", []):
        added["special"] = True
    plain = Tokenizer.from_str(json.dumps(spec))
    plain.encode_special_tokens = True
    return plain


class _SplitSpecial:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def encode(self, text: str, add_special_tokens: bool = False) -> Any:
        ids = self.tokenizer(text, add_special_tokens=add_special_tokens, split_special_tokens=True)["input_ids"]
        return SimpleNamespace(ids=list(ids))


def fold_system_into_first_user(msgs: list[dict[str, str]]) -> list[dict[str, str]]:
    """Move system messages' text to the front of the first user turn (R1: no system prompt)."""
    system = "\n\n".join(m["content"] for m in msgs if m["role"] == "system" and m["content"])
    rest = [dict(m) for m in msgs if m["role"] != "system"]
    if system:
        for m in rest:
            if m["role"] == "user":
                m["content"] = f"{system}\n\n{m['content']}" if m["content"] else system
                break
    return rest


def fallback_chat_template(msgs: list[dict[str, str]]) -> str:
    """For tokenizers without a chat template: a plain transcript ending with the assistant cue."""
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in msgs]
    return "\n".join(lines) + "\nAssistant:"
