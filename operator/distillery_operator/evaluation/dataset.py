"""The evaluation dataset: JSON Lines, one example a line, {"prompt": str} or {"messages": [...]} plus
{"answer": str | number}. Blank lines are skipped; anything else that is not such an object is refused
with the file and line it is on, before a single request is sent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant")


class DatasetError(ValueError):
    """The dataset cannot be used; the message names the file and, where it applies, the line."""


@dataclass(frozen=True)
class Example:
    """One question: the conversation to send (ending in a user turn) and the expected answer."""

    line: int
    messages: tuple[dict[str, str], ...]
    answer: str


def _messages(value: Any, where: str) -> tuple[dict[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise DatasetError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    out = []
    for i, message in enumerate(value):
        if (not isinstance(message, dict) or message.get("role") not in ROLES
                or not isinstance(message.get("content"), str)):
            raise DatasetError(f"{where}: messages[{i}] must be {{\"role\": one of {list(ROLES)}, "
                               f"\"content\": string}}, got {json.dumps(message)[:120]}")
        out.append({"role": message["role"], "content": message["content"]})
    if out[-1]["role"] != "user":
        raise DatasetError(f"{where}: the last message must be the user's question, not {out[-1]['role']!r}")
    return tuple(out)


def parse_example(obj: Any, where: str, line: int) -> Example:
    if not isinstance(obj, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    has_prompt, has_messages = "prompt" in obj, "messages" in obj
    if has_prompt == has_messages:
        raise DatasetError(f"{where}: needs exactly one of 'prompt' or 'messages' (keys: {sorted(obj)})")
    if has_prompt:
        if not isinstance(obj["prompt"], str) or not obj["prompt"].strip():
            raise DatasetError(f"{where}: 'prompt' must be a non-empty string")
        messages: tuple[dict[str, str], ...] = ({"role": "user", "content": obj["prompt"]},)
    else:
        messages = _messages(obj["messages"], where)
    answer = obj.get("answer")
    if isinstance(answer, bool) or not isinstance(answer, str | int | float) or not str(answer).strip():
        raise DatasetError(f"{where}: 'answer' must be a non-empty string or a number, "
                           f"got {json.dumps(answer)}")
    return Example(line=line, messages=messages, answer=str(answer))


def load_dataset(path: str | Path, limit: int | None = None) -> list[Example]:
    """The first `limit` examples of a JSONL file (all of them when limit is None)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such dataset file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read the dataset: {exc}") from None
    examples: list[Example] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if limit is not None and len(examples) >= limit:
            break
        if not raw.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        examples.append(parse_example(obj, where, number))
    if not examples:
        raise DatasetError(f"{path}: the dataset has no examples")
    return examples
