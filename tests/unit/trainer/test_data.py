"""JSON Lines -> token ids: the chat template, the text format, errors naming the line, the seeded split,
and padding masked out of the labels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distillery_contract.distillation import DatasetFormat
from distillery_trainer.data import DatasetError, PadCollator, read_texts, split, tokenize
from distillery_trainer.loss import IGNORE_INDEX
from tests.trainer_fixtures import write_dataset


def test_chat_examples_are_rendered_with_the_chat_template(tmp_path: Path, r1_tokenizer):
    path = write_dataset(tmp_path / "d.jsonl", n=3)
    texts = read_texts(path, DatasetFormat.CHAT, r1_tokenizer)
    first = json.loads(path.read_text().splitlines()[0])["messages"]
    assert texts[0] == r1_tokenizer.apply_chat_template(first, tokenize=False)
    assert "<｜User｜>" in texts[0] and "<｜Assistant｜>" in texts[0]
    ids = tokenize(texts, r1_tokenizer, 512, DatasetFormat.CHAT)
    assert ids[0][0] == r1_tokenizer.bos_token_id
    assert ids[0].count(r1_tokenizer.bos_token_id) == 1  # the template's, not a second one


def test_text_examples_and_truncation(tmp_path: Path, r1_tokenizer):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"text": "word " * 100}) + "\n\n" + json.dumps({"text": "short one"}) + "\n")
    texts = read_texts(path, DatasetFormat.TEXT, r1_tokenizer)
    assert texts == ["word " * 100, "short one"]  # the blank line is skipped
    ids = tokenize(texts, r1_tokenizer, 16, DatasetFormat.TEXT)
    assert len(ids[0]) == 16 and len(ids[1]) < 16


@pytest.mark.parametrize("line,fmt,message", [
    ("not json", DatasetFormat.CHAT, "d.jsonl:2: not JSON"),
    ("[1, 2]", DatasetFormat.CHAT, "d.jsonl:2: expected a JSON object"),
    ('{"text": "x"}', DatasetFormat.CHAT, 'd.jsonl:2: format chat needs {"messages"'),
    ('{"messages": [{"role": "user"}]}', DatasetFormat.CHAT, "d.jsonl:2: messages[0] needs a string role and content"),
    ('{"messages": []}', DatasetFormat.TEXT, 'd.jsonl:2: format text needs {"text": "..."}'),
])
def test_a_bad_line_is_named(tmp_path: Path, r1_tokenizer, line: str, fmt: DatasetFormat, message: str):
    path = tmp_path / "d.jsonl"
    good = '{"messages": [{"role": "user", "content": "hi"}]}' if fmt == DatasetFormat.CHAT else '{"text": "hi"}'
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(DatasetError, match=message.replace("[", r"\[").replace("{", r"\{")):
        read_texts(path, fmt, r1_tokenizer)


def test_an_empty_file_is_refused(tmp_path: Path, r1_tokenizer):
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(DatasetError, match="no examples"):
        read_texts(tmp_path / "e.jsonl", DatasetFormat.TEXT, r1_tokenizer)


def test_the_split_depends_only_on_the_seed():
    examples = [[i, i + 1] for i in range(20)]
    train, val = split(examples, 0.25, seed=3)
    assert len(val) == 5 and len(train) == 15
    assert sorted(map(tuple, train + val)) == sorted(map(tuple, examples))
    assert split(examples, 0.25, seed=3) == (train, val)
    assert split(examples, 0.25, seed=4) != (train, val)
    assert split(examples, 0.0, seed=3)[1] == []
    assert len(split(examples[:2], 0.01, seed=3)[1]) == 1  # asked for: at least one
    assert len(split(examples[:2], 0.5, seed=3)[0]) == 1  # never all of them


def test_padding_is_masked_out_of_the_labels():
    batch = PadCollator(pad_token_id=0)([{"input_ids": [5, 6, 7]}, {"input_ids": [8, 0]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    # a real token equal to the pad id keeps its label; only the padding is ignored
    assert batch["labels"].tolist() == [[5, 6, 7], [8, 0, IGNORE_INDEX]]
