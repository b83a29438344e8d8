"""Training data: a JSON Lines file (chat: {"messages": [...]}, text: {"text": ...}) -> token ids.

Chat examples are rendered with the tokenizer's chat template (the one the runtime serves with), so the
student learns the exact format it will be prompted in. Every example is cut at max_seq_length; the split
into training and validation examples depends only on the seed. Batches are padded on the right and the
padding's labels are IGNORE_INDEX, so neither loss term sees it.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from distillery_contract.distillation import DatasetFormat
from distillery_trainer.loss import IGNORE_INDEX


class DatasetError(ValueError):
    """The dataset file cannot be used (names the file and line)."""


def read_texts(path: Path, fmt: DatasetFormat, tokenizer: Any) -> list[str]:
    """One string per non-empty line: the chat rendered with the template, or the text as is."""
    texts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{where}: not JSON ({exc.msg})") from exc
            if not isinstance(record, dict):
                raise DatasetError(f"{where}: expected a JSON object")
            texts.append(_chat(record, where, tokenizer) if fmt == DatasetFormat.CHAT else _text(record, where))
    if not texts:
        raise DatasetError(f"{path}: no examples")
    return texts


def _text(record: dict[str, Any], where: str) -> str:
    text = record.get("text")
    if not isinstance(text, str) or not text:
        raise DatasetError(f'{where}: format text needs {{"text": "..."}} (a non-empty string)')
    return text


def _chat(record: dict[str, Any], where: str, tokenizer: Any) -> str:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DatasetError(f'{where}: format chat needs {{"messages": [{{"role": ..., "content": ...}}, ...]}}')
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise DatasetError(f"{where}: messages[{i}] needs a string role and content")
    if not getattr(tokenizer, "chat_template", None):
        raise DatasetError(f"{where}: format chat, but the tokenizer has no chat template (use format text)")
    return str(tokenizer.apply_chat_template(messages, tokenize=False))


def tokenize(texts: list[str], tokenizer: Any, max_seq_length: int, fmt: DatasetFormat) -> list[list[int]]:
    # the chat template writes the begin-of-sentence token itself; plain text gets the tokenizer's own
    add_special = fmt == DatasetFormat.TEXT
    encoded = tokenizer(texts, add_special_tokens=add_special, truncation=True, max_length=max_seq_length)
    return [list(ids) for ids in encoded["input_ids"] if len(ids) >= 2]  # one token predicts nothing


def split(examples: list[list[int]], validation_fraction: float, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """(train, validation): a seeded shuffle, then the first share held out (at least one when asked for,
    never all of them)."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = round(len(examples) * validation_fraction)
    if validation_fraction > 0 and len(examples) >= 2:
        n_val = min(max(n_val, 1), len(examples) - 1)
    held = [examples[i] for i in order[:n_val]]
    train = [examples[i] for i in order[n_val:]]
    return train, held


class TokenDataset(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __init__(self, examples: list[list[int]]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return {"input_ids": self.examples[i]}


@dataclass(frozen=True)
class PadCollator:
    """Right padding to the longest example of the batch; labels are the ids, IGNORE_INDEX on padding."""

    pad_token_id: int

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict[str, Tensor]:
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[row, :n] = torch.tensor(b["input_ids"], dtype=torch.long)
            mask[row, :n] = 1
        labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pad_token_id(tokenizer: Any) -> int:
    pid = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pid is None:
        raise DatasetError("the tokenizer has neither a pad nor an end-of-sentence token to pad with")
    return int(pid)
