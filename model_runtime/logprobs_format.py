"""Log-probabilities in the OpenAI API's shapes.

The engine reports, per token, its log-probability under the model's raw distribution and the top-k
alternatives (LogprobEntry); LogprobFormatter turns them into the completions API's parallel lists
(tokens, token_logprobs, top_logprobs, text_offset) or chat's per-token objects, with vLLM's conventions
(the chosen token is always in a completion's top_logprobs; -inf and NaN read as -9999.0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from model_runtime.protocol import ChatLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob

LOGPROB_FLOOR = -9999.0  # vLLM's stand-in for -inf (JSON has no infinities)


@dataclass
class LogprobEntry:
    """One token of an answer with its log-probability (None: a prompt's first token) and top-k alternatives."""

    token_id: int
    logprob: float | None
    top: list[tuple[int, float]] = field(default_factory=list)


class LogprobFormatter:
    """The API shapes of one tokenizer's log-probabilities (token texts cached: at most the vocabulary)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._token_texts: dict[int, str] = {}  # token_text's cache: at most the vocabulary
        self._special_ids = {int(t) for t in getattr(tokenizer, "all_special_ids", [])}

    def token_text(self, token_id: int) -> str:
        """A token as text (special tokens included; a piece of a multi-byte character reads as U+FFFD)."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = str(self.tokenizer.decode([token_id], skip_special_tokens=False,
                                             clean_up_tokenization_spaces=False))
            self._token_texts[token_id] = text
        return text

    def completion_logprobs(self, entries: Sequence[LogprobEntry], top_k: int, text_offset: int = 0
                            ) -> tuple[CompletionLogprobs, int]:
        """The completions API's parallel lists, and the text offset after them. Each top_logprobs dict holds
        the top-k and the chosen token (vLLM's). text_offset counts characters from the start of the choice's
        text, a special token (not in the text) counting none."""
        out = CompletionLogprobs()
        offset = text_offset
        for e in entries:
            token = self.token_text(e.token_id)
            out.tokens.append(token)
            out.text_offset.append(offset)
            offset += 0 if e.token_id in self._special_ids else len(token)
            if e.logprob is None:
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                continue
            out.token_logprobs.append(_finite(e.logprob))
            top = {self.token_text(t): _finite(lp) for t, lp in e.top[:top_k]}
            top.setdefault(token, _finite(e.logprob))
            out.top_logprobs.append(top)
        return out, offset

    def chat_logprobs(self, entries: Sequence[LogprobEntry], top_k: int) -> ChatLogprobs:
        content = []
        for e in entries:
            token = self.token_text(e.token_id)
            top = [TopLogprob(token=self.token_text(t), logprob=_finite(lp), bytes=_utf8_bytes(self.token_text(t)))
                   for t, lp in e.top[:top_k]]
            content.append(TokenLogprob(token=token, logprob=_finite(e.logprob if e.logprob is not None else 0.0),
                                        bytes=_utf8_bytes(token), top_logprobs=top))
        return ChatLogprobs(content=content)


def _finite(value: float) -> float:
    return LOGPROB_FLOOR if math.isnan(value) or value < LOGPROB_FLOOR else float(value)


def _utf8_bytes(text: str) -> list[int]:
    return list(text.encode("utf-8", "replace"))
