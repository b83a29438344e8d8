"""Split DeepSeek-R1 output into `reasoning_content` and `content` (vLLM's deepseek_r1 semantics).

Everything before '</think>' is reasoning, even when no opening '<think>' was generated (the
opening tag is usually part of the prompt: the chat template or the runtime forces "<think>\\n").
A leading '<think>' in the output is dropped. Output with no '</think>' at all is all reasoning.
The streaming splitter holds back a possible partial tag at the end of a delta, so a tag split
over two deltas is never leaked into either field.
"""

from __future__ import annotations

THINK_START = "<think>"
THINK_END = "</think>"


def split_reasoning(text: str) -> tuple[str | None, str | None]:
    """(reasoning_content, content) of a complete output; an empty part is None."""
    if text.startswith(THINK_START):
        text = text[len(THINK_START) :]
    if THINK_END not in text:
        return (text or None), None
    reasoning, _, content = text.partition(THINK_END)
    return (reasoning or None), (content or None)


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0


class ReasoningSplitter:
    """Incremental version of split_reasoning: feed text deltas, get (reasoning, content) deltas."""

    def __init__(self) -> None:
        self._pending = ""
        self._at_start = True  # a leading '<think>' may still arrive
        self._in_reasoning = True

    def feed(self, delta: str) -> tuple[str, str]:
        self._pending += delta
        reasoning, content = "", ""
        if self._at_start:
            if THINK_START.startswith(self._pending) and len(self._pending) < len(THINK_START):
                return "", ""  # could still become '<think>'
            self._at_start = False
            if self._pending.startswith(THINK_START):
                self._pending = self._pending[len(THINK_START) :]
        if self._in_reasoning:
            if THINK_END in self._pending:
                reasoning, _, rest = self._pending.partition(THINK_END)
                self._in_reasoning = False
                self._pending = ""
                return reasoning, rest
            keep = _partial_suffix(self._pending, THINK_END)
            reasoning = self._pending[: len(self._pending) - keep]
            self._pending = self._pending[len(self._pending) - keep :]
            return reasoning, ""
        content, self._pending = self._pending, ""
        return reasoning, content

    def flush(self) -> tuple[str, str]:
        """Whatever is held back at the end of the output."""
        rest, self._pending = self._pending, ""
        if self._at_start and rest.startswith(THINK_START):
            rest = rest[len(THINK_START) :]
        self._at_start = False
        return (rest, "") if self._in_reasoning else ("", rest)
