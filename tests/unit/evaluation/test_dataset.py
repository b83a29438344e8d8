"""The evaluation dataset: the shipped example loads; every malformed line is refused with the file and
line it is on, before anything is asked of a model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distillery_operator.evaluation.dataset import DatasetError, load_dataset
from distillery_operator.evaluation.scorers import score_boxed
from tests.reference import REPO_ROOT

SHIPPED = REPO_ROOT / "operator" / "distillery_operator" / "evaluation" / "examples" / "arith.jsonl"


def write(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "eval.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_the_shipped_dataset_loads_and_its_answers_score_as_boxed():
    examples = load_dataset(SHIPPED)
    assert len(examples) == 12
    assert all(e.messages[-1]["role"] == "user" for e in examples)
    for e in examples:  # every answer is reachable: boxed, it scores 1 against itself
        assert score_boxed(f"<think>hmm</think>\\boxed{{{e.answer}}}", e.answer) == 1.0, e


def test_prompt_messages_numbers_blank_lines_and_limit(tmp_path):
    path = write(tmp_path, json.dumps({"prompt": "1+1?", "answer": 2}), "",
                 json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "2+2?"}], "answer": "4"}),
                 json.dumps({"prompt": "3+3?", "answer": "6"}))
    examples = load_dataset(path)
    assert [(e.line, e.answer) for e in examples] == [(1, "2"), (3, "4"), (4, "6")]
    assert examples[0].messages == ({"role": "user", "content": "1+1?"},)
    assert len(examples[1].messages) == 2
    assert [e.line for e in load_dataset(path, limit=2)] == [1, 3]


@pytest.mark.parametrize("line,message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"answer": "1"}', "exactly one of 'prompt' or 'messages'"),
    ('{"prompt": "a", "messages": [], "answer": "1"}', "exactly one of 'prompt' or 'messages'"),
    ('{"prompt": "  ", "answer": "1"}', "'prompt' must be a non-empty string"),
    ('{"prompt": "q"}', "'answer' must be a non-empty string or a number"),
    ('{"prompt": "q", "answer": true}', "'answer' must be"),
    ('{"prompt": "q", "answer": ""}', "'answer' must be"),
    ('{"messages": "hi", "answer": "1"}', "'messages' must be a non-empty list"),
    ('{"messages": [{"role": "robot", "content": "x"}], "answer": "1"}', "messages[0] must be"),
    ('{"messages": [{"role": "user", "content": 3}], "answer": "1"}', "messages[0] must be"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "answer": "1"}',
     "the last message must be the user's question"),
])
def test_a_bad_line_is_named(tmp_path, line, message):
    path = write(tmp_path, json.dumps({"prompt": "fine", "answer": "1"}), line)
    with pytest.raises(DatasetError) as exc:
        load_dataset(path)
    assert f"{path}:2: " in str(exc.value)
    assert message in str(exc.value)


def test_missing_empty_and_unreadable_files(tmp_path):
    with pytest.raises(DatasetError, match="no such dataset file"):
        load_dataset(tmp_path / "absent.jsonl")
    with pytest.raises(DatasetError, match="has no examples"):
        load_dataset(write(tmp_path, "", "  "))
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(DatasetError, match="cannot read"):
        load_dataset(binary)
