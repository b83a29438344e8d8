"""Chat templating helpers: what the prompt of a conversation looks like and how it is tokenized safely.

- whether a template renders a system message (R1's does; Gemma-style ones raise), and folding system
  messages into the first user turn when it does not (R1's model card: no system prompt);
- a plain transcript for tokenizers without a chat template;
- a copy of the tokenizer that reads every added token as plain text, so text inside messages never
  becomes a control token (only the template's own text may);
- an earlier assistant turn without its thinking (R1's template drops it).
Serving.chat_prompt() puts these together.
"""

from __future__ import annotations

import contextlib
import json
import weakref
from types import SimpleNamespace
from typing import Any

from model_runtime.reasoning import THINK_END, THINK_START

THINK_PREFIX = THINK_START + "\n"
_SYSTEM_PROBE = "\x00distillery-system-probe\x00"


def renders_system_role(tokenizer: Any) -> bool:
    """Does the chat template render a system message? (R1's does; Gemma-style ones raise.)"""
    if getattr(tokenizer, "chat_template", None) is None:
        return True  # the fallback template renders it
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "system", "content": _SYSTEM_PROBE}, {"role": "user", "content": "hi"}],
            tokenize=False,
            add_generation_prompt=True,
        )
    except Exception:
        return False
    return _SYSTEM_PROBE in text


def without_thinking(msg: dict[str, str]) -> dict[str, str]:
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
