"""Loads the tiny lm-eval tasks' documents from the JSON-lines files beside this module.

The tasks' YAML points `custom_dataset` here, so lm-eval (`--include_path tests/lm_eval_tasks`) reads local
files whatever the working directory, and nothing is downloaded or written to a datasets cache.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets

HERE = Path(__file__).resolve().parent


def load(file: str, **_: Any) -> datasets.DatasetDict:
    """The documents of `file` (beside this module) as the task's `test` split; lm-eval also passes the
    task's metadata as keyword arguments, which this ignores."""
    rows = [json.loads(line) for line in (HERE / file).read_text().splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
