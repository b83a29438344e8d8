"""The <think> splitter: vLLM deepseek_r1 semantics, and streaming equals non-streaming."""

from __future__ import annotations

import itertools

import pytest

from model_runtime.reasoning import ReasoningSplitter, split_reasoning


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>\nplan</think>\n\nanswer", ("\nplan", "\n\nanswer")),
        ("plan</think>answer", ("plan", "answer")),  # no opening tag: it was in the prompt
        ("still thinking", ("still thinking", None)),  # no closing tag: all reasoning
        ("</think>answer", (None, "answer")),
        ("plan</think>", ("plan", None)),
        ("", (None, None)),
        ("a</think>b</think>c", ("a", "b</think>c")),  # only the first closing tag splits
    ],
)
def test_split_reasoning(text, expected):
    assert split_reasoning(text) == expected


def _stream(pieces: list[str]) -> tuple[str, str]:
    splitter = ReasoningSplitter()
    reasoning, content = "", ""
    for piece in pieces:
        r, c = splitter.feed(piece)
        reasoning, content = reasoning + r, content + c
    r, c = splitter.flush()
    return reasoning + r, content + c


@pytest.mark.parametrize(
    "text", ["<think>\nplan</think>\n\nanswer", "plan</think>answer", "<thin", "x</thi", "<think>only"]
)
def test_streaming_equals_whole_text_for_every_split(text):
    whole = tuple(part or "" for part in split_reasoning(text))
    for i, j in itertools.combinations(range(len(text) + 1), 2):
        assert _stream([text[:i], text[i:j], text[j:]]) == whole, (i, j)


def test_streaming_never_leaks_a_partial_tag():
    splitter = ReasoningSplitter()
    assert splitter.feed("abc</th") == ("abc", "")
    assert splitter.feed("ink>def") == ("", "def")
    assert splitter.feed("</think>") == ("", "</think>")  # after the split everything is content
