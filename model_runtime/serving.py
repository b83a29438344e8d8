"""Turn an API request into a generation job for the engine, and the engine's tokens into text.

Serving is the path between the wire format (protocol.py) and the engine (engine.py):
- validation that needs the model: model name (404), context length, max_tokens (400);
- the chat template (helpers in chat_template.py), with DeepSeek-R1's usage recommendations (the R1
  model card): a system message is folded into the first user turn when the template drops system
  messages; "<think>\\n" is forced after the generation prompt when configured and the template did not
  add it; the thinking is returned as `reasoning_content` when configured;
- sampling defaults: request > runtime flag > the model's generation_config > neutral (temperature and
  top_p 1.0, top_k off, repetition_penalty 1.0); every control reaches SamplingParams or is refused;
- fan-out (fanout.py): each prompt of a request times n (or best_of) is one engine request (a JobGroup,
  jobs.py); choice index = prompt index * n + i (vLLM's); best_of keeps the n with the highest cumulative
  log-probability; usage counts each prompt once and every generated token;
- log-probabilities (the engine's, of the model's raw distribution) into OpenAI's completions and chat
  shapes (logprobs_format.py); echo puts the prompt (and its log-probabilities) in front of the completion;
- incremental detokenization and stop strings (detokenize.py: cut from the output; a match aborts the
  engine request), finish_reason and usage.
Errors are ServingError (errors.py). The HTTP layer (openai_routes.py, kserve_routes.py) only parses, calls
plan_*() and stream_group()/complete_group(), and writes. The helpers' names are re-exported here for the
callers that import them from this module.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distillery_contract.distillation import LINEAGE_FILE
from model_runtime.chat_template import (
    THINK_PREFIX,
    fallback_chat_template,
    renders_system_role,
    without_thinking,
)
from model_runtime.chat_template import fold_system_into_first_user as fold_system_into_first_user
from model_runtime.chat_template import plain_text_tokenizer as plain_text_tokenizer
from model_runtime.detokenize import IncrementalDetokenizer as IncrementalDetokenizer
from model_runtime.detokenize import StopMatcher as StopMatcher
from model_runtime.engine import GenerationError, QueueFullError, RequestTimeoutError
from model_runtime.errors import ServingError as ServingError
from model_runtime.errors import invalid as invalid
from model_runtime.fanout import choice_params, merge, sub_id
from model_runtime.fanout import gather_or_cancel as gather_or_cancel
from model_runtime.jobs import Delta as Delta
from model_runtime.jobs import Job as Job
from model_runtime.jobs import JobGroup as JobGroup
from model_runtime.jobs import Output as Output
from model_runtime.logprobs_format import LogprobEntry as LogprobEntry
from model_runtime.logprobs_format import LogprobFormatter
from model_runtime.protocol import (
    ChatCompletionRequest,
    ChatLogprobs,
    ChatMessage,
    CompletionLogprobs,
    CompletionRequest,
    GenerationParameters,
    SamplingControls,
    Usage,
)
from model_runtime.reasoning import THINK_START, ReasoningSplitter
from model_runtime.sampling import SamplingParams

log = logging.getLogger("model_runtime.serving")


@dataclass
class ServingConfig:
    model_name: str
    default_temperature: float | None = None  # None: from generation_config.json
    default_top_p: float | None = None
    default_top_k: int | None = None  # None: from generation_config.json, else off
    default_repetition_penalty: float | None = None  # None: from generation_config.json, else 1.0
    default_max_tokens: int | None = None  # None: up to the end of the context
    think_prefix: bool = False
    separate_reasoning: bool = False
    log_prompts: bool = False  # prompt text in logs: for debugging only
    max_prompt_bytes: int | None = None  # None: 32 bytes per token of context, at least 64 KiB
    # Trusted clients only: control tokens typed in message text (e.g. "<｜Assistant｜>") count as such.
    allow_special_tokens_in_content: bool = False


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
        self.system_role_supported = renders_system_role(self.tokenizer)
        # ids the model has rows for: the tokenizer may know more (R1-Distill-1.5B: 152064 vs 151936)
        self.vocab_size = _model_vocab(loaded, len(self.tokenizer))
        limit = config.max_prompt_bytes
        self.max_prompt_bytes = limit if limit is not None else max(64 * 2**10, 32 * self.max_model_len)
        self._plain: Any = None if config.allow_special_tokens_in_content else plain_text_tokenizer(self.tokenizer)
        self.lineage = read_lineage(getattr(loaded, "source_path", None))
        self.logprob_format = LogprobFormatter(self.tokenizer)

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
        for attempt in (msgs, [without_thinking(m) for m in msgs]):
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
        self, prompt_len: int, max_tokens: int | None, c: SamplingControls, prompt_param: str, *,
        logprobs: int | None = None, prompt_logprobs: int | None = None,
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
        if c.min_tokens > max_tokens:
            raise invalid(f"min_tokens={c.min_tokens} is more than max_tokens={max_tokens}", param="min_tokens")
        for name, ids in (("logit_bias", list(c.logit_bias_ids())), ("stop_token_ids", c.stop_token_ids or [])):
            bad = [t for t in ids if t >= self.vocab_size]
            if bad:
                raise invalid(f"{name}: token id {bad[0]} is not in the model's vocabulary [0, {self.vocab_size})",
                              param=name)
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self._default("temperature", c.temperature, self.config.default_temperature),
            top_p=self._default("top_p", c.top_p, self.config.default_top_p),
            seed=c.seed,
            top_k=self._default_top_k(c.top_k),
            min_p=c.min_p or 0.0,
            presence_penalty=c.presence_penalty or 0.0,
            frequency_penalty=c.frequency_penalty or 0.0,
            repetition_penalty=self._default("repetition_penalty", c.repetition_penalty,
                                             self.config.default_repetition_penalty),
            logit_bias=c.logit_bias_ids(),
            stop_token_ids=list(c.stop_token_ids or []),
            min_tokens=c.min_tokens,
            ignore_eos=c.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
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

    def _default_top_k(self, requested: int | None) -> int:
        for value in (requested, self.config.default_top_k, self.generation_defaults.get("top_k")):
            if value is not None:
                return int(value) if int(value) > 0 else -1  # transformers' top_k=0 is "off" too
        return -1

    def _job(self, prefix: str, prompt_text: str | None, prompt_ids: list[int], params: SamplingParams,
             stop: list[str], *, chat: bool, separate: bool, request_id: str | None = None, index: int = 0,
             echo: str = "", logprobs: bool = False) -> Job:
        # reasoning_content exists only in chat completions; elsewhere the thinking stays in the text,
        # with the "<think>\n" the prompt opened put back in front so the output is well-formed.
        opens_thinking = prompt_text is not None and prompt_text.endswith(THINK_PREFIX)
        job = Job(
            request_id=request_id or f"{prefix}-{uuid.uuid4().hex}",
            prompt_ids=prompt_ids,
            params=params,
            stop=stop,
            separate_reasoning=separate,
            content_prefix=echo or (THINK_PREFIX if chat and opens_thinking and not separate else ""),
            index=index,
            logprobs=logprobs,
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
        """The one engine request of a single-choice chat request."""
        return self.plan_chat(req).single()

    def prepare_completion(self, req: CompletionRequest) -> Job:
        """The one engine request of a single-prompt, single-choice completion request."""
        return self.plan_completion(req).single()

    def plan_chat(self, req: ChatCompletionRequest) -> JobGroup:
        self.check_model(req.model)
        if req.top_logprobs is not None and not req.logprobs:
            raise invalid("top_logprobs needs logprobs set to true", param="top_logprobs")
        text, ids = self.chat_prompt(req.messages)
        max_tokens = req.max_tokens if req.max_tokens is not None else req.max_completion_tokens
        k = (req.top_logprobs or 0) if req.logprobs else None
        params = self._sampling(len(ids), max_tokens, req, "messages", logprobs=k)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        jobs = [self._job("chatcmpl", text, ids, choice_params(params, req.seed, i), req.stop_list(), chat=True,
                          separate=self.config.separate_reasoning, request_id=sub_id(rid, i, req.n), index=i,
                          logprobs=k is not None)
                for i in range(req.n)]
        return JobGroup(rid, jobs, n=req.n, best_of=req.n, prompt_tokens=len(ids), top_logprobs=k)

    def plan_completion(self, req: CompletionRequest) -> JobGroup:
        self.check_model(req.model)
        n = req.n
        best_of = req.best_of if req.best_of is not None else n
        if best_of < n:
            raise invalid(f"best_of={best_of} must be at least n={n}", param="best_of")
        if req.stream and best_of > n:
            raise invalid("best_of is not supported with stream: the best choices are only known at the end",
                          param="best_of")
        if req.max_tokens == 0 and not req.echo:
            raise invalid("max_tokens=0 is only allowed with echo (the prompt's log-probabilities)",
                          param="max_tokens")
        k = req.logprobs
        # best_of ranks by the generated tokens' log-probabilities: ask the engine for them
        engine_k = k if k is not None else (0 if best_of > n else None)
        prompts = req.prompts()
        self.check_prompt_bytes(sum(_utf8_len(p) for p in prompts if isinstance(p, str)), "prompt")
        rid = f"cmpl-{uuid.uuid4().hex}"
        jobs: list[Job] = []
        prompt_tokens = 0
        for p_index, prompt in enumerate(prompts):
            text, ids = self._completion_prompt(prompt)
            prompt_tokens += len(ids)
            prompt_k = k if req.echo and k is not None else None
            params = self._sampling(len(ids), req.max_tokens, req, "prompt", logprobs=engine_k,
                                    prompt_logprobs=prompt_k)
            echo = ""
            if req.echo:
                echo = text if text is not None else self.tokenizer.decode(
                    ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            for i in range(best_of):
                index = p_index * best_of + i
                jobs.append(self._job("cmpl", text, ids, choice_params(params, req.seed, i), req.stop_list(),
                                      chat=False, separate=False, request_id=sub_id(rid, index, len(prompts) * best_of),
                                      index=index, echo=echo, logprobs=engine_k is not None))
        return JobGroup(rid, jobs, n=n, best_of=best_of, prompt_tokens=prompt_tokens, top_logprobs=k)

    def _completion_prompt(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, list):
            vocab = self.vocab_size
            if any(t < 0 or t >= vocab for t in prompt):
                raise invalid(f"prompt token ids must be in [0, {vocab})", param="prompt")
            return None, list(prompt)
        return prompt, self._encode(prompt, add_special_tokens=True)

    def prepare_text(self, prompt: str, p: GenerationParameters) -> Job:
        """KServe V1/V2: raw text in (or one user turn through the chat template when p.chat)."""
        if p.chat:
            text, ids = self.chat_prompt([ChatMessage(role="user", content=prompt)])
        else:
            text = prompt
            self.check_prompt_bytes(_utf8_len(prompt), "prompt")
            ids = self._encode(prompt, add_special_tokens=True)
        params = self._sampling(len(ids), p.max_tokens, p, "prompt")
        return self._job("gen", text, ids, params, p.stop_list(), chat=p.chat, separate=False)  # V1/V2: one text

    # ---- generation
    async def stream(self, job: Job) -> AsyncGenerator[Delta, None]:
        """Deltas of the job's output; the first one as soon as the engine accepted the request.

        Raises ServingError (429 queue full, 504 timeout, 500 generation failure). Closing this
        generator (client gone) closes the engine's, which aborts the request in the engine.
        """
        if job.params.max_tokens == 0 and job.params.prompt_logprobs is None:
            # echo of the prompt alone: nothing for the engine to compute
            yield Delta(content=job.content_prefix, finish_reason="length",
                        usage=Usage(prompt_tokens=len(job.prompt_ids), completion_tokens=0,
                                    total_tokens=len(job.prompt_ids)))
            return
        detok = IncrementalDetokenizer(self.tokenizer, job.prompt_ids)
        stopper = StopMatcher(job.stop)
        splitter = ReasoningSplitter() if job.separate_reasoning else None
        prefix = job.content_prefix
        generated = 0
        first_sent = False
        finish: str | None = None
        pending: list[LogprobEntry] = []  # log-probabilities not yet sent with a delta
        events = None
        try:
            events = self.engine.generate(job.prompt_ids, job.params, job.request_id)
            async for event in events:
                piece = ""
                prompt_lps = getattr(event, "prompt_logprobs", None)
                if prompt_lps is not None and job.logprobs:
                    pending += [LogprobEntry(t, lp, list(top)) for t, (lp, top) in zip(job.prompt_ids, prompt_lps,
                                                                                         strict=False)]
                if event.token_id is not None:
                    if generated == 0 and self.metrics is not None:
                        self.metrics.first_token(time.monotonic() - job.arrival)
                    generated += 1
                    if job.logprobs:
                        pending.append(LogprobEntry(event.token_id, getattr(event, "logprob", None),
                                                    list(getattr(event, "top_logprobs", None) or [])))
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
                if prefix and (delta.content or delta.reasoning or finish or pending):
                    delta.content, prefix = prefix + delta.content, ""
                delta.completion_tokens = generated
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
                    delta.logprobs, pending = pending, []
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
        entries: list[LogprobEntry] = []
        last = Delta()
        async for delta in self.stream(job):
            content.append(delta.content)
            reasoning.append(delta.reasoning)
            entries += delta.logprobs
            last = delta
        assert last.finish_reason is not None and last.usage is not None
        text = "".join(content)
        thinking = "".join(reasoning)
        n_prompt = len(job.prompt_ids) if job.params.prompt_logprobs is not None else 0
        cumulative = sum(e.logprob or 0.0 for e in entries[n_prompt:])
        logprobs = entries if job.logprobs else None
        if job.separate_reasoning:
            return Output(text or None, thinking or None, last.finish_reason, last.usage, job.index, logprobs,
                          cumulative)
        return Output(text, None, last.finish_reason, last.usage, job.index, logprobs, cumulative)

    async def complete_group(self, group: JobGroup) -> tuple[list[Output], Usage]:
        """Every job of the group at once; the n best of each prompt's best_of (by cumulative log-probability),
        with their final choice indices, and the request's usage."""
        outputs = await gather_or_cancel([self.complete(job) for job in group.jobs])
        chosen: list[Output] = []
        for p_index in range(0, len(outputs), group.best_of):
            candidates = outputs[p_index:p_index + group.best_of]
            if group.best_of > group.n:
                candidates = sorted(candidates, key=lambda o: o.cumulative_logprob, reverse=True)[:group.n]
            for i, out in enumerate(candidates):
                out.index = p_index // group.best_of * group.n + i
                chosen.append(out)
        completion = sum(o.usage.completion_tokens for o in outputs)  # all generated, as OpenAI counts best_of
        return chosen, Usage(prompt_tokens=group.prompt_tokens, completion_tokens=completion,
                             total_tokens=group.prompt_tokens + completion)

    async def stream_group(self, group: JobGroup) -> AsyncGenerator[tuple[int, Delta], None]:
        """(choice index, delta) of every job, interleaved as they come (only without best_of > n).

        Nothing is yielded until every job's engine request was accepted, so a full queue is still one
        error (the HTTP 429) before the response starts. Closing this generator aborts every job."""
        assert group.best_of == group.n, "best_of > n cannot stream"
        if len(group.jobs) == 1:
            job = group.jobs[0]
            async for delta in self.stream(job):
                yield job.index, delta
            return
        async for item in merge([(job.index, self.stream(job)) for job in group.jobs]):
            yield item

    # ---- log-probabilities in the API's shapes (logprobs_format.py)
    def token_text(self, token_id: int) -> str:
        """A token as text (special tokens included; a piece of a multi-byte character reads as U+FFFD)."""
        return self.logprob_format.token_text(token_id)

    def completion_logprobs(self, entries: Sequence[LogprobEntry], top_k: int, text_offset: int = 0
                            ) -> tuple[CompletionLogprobs, int]:
        """The completions API's parallel lists, and the text offset after them."""
        return self.logprob_format.completion_logprobs(entries, top_k, text_offset)

    def chat_logprobs(self, entries: Sequence[LogprobEntry], top_k: int) -> ChatLogprobs:
        return self.logprob_format.chat_logprobs(entries, top_k)


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
