"""Builders for the trainer tests (both trainer conftests import this plain module): a tiny teacher and a
tinier student (Qwen2, random, seeded) that share the real R1 tokenizer, a small chat dataset, and a job.

Nothing downloads. The vocabulary is the real one (152064 rows), so the models stay tiny in every other
dimension and the sequences short.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from tests.runtime_fixtures import build_tiny_qwen2_dir

TEACHER = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
STUDENT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
           "num_key_value_heads": 1, "initializer_range": 0.02}

SUBJECTS = ["my order", "the invoice", "a refund", "the password", "my account", "the delivery", "the app",
            "a discount", "the subscription", "the warranty", "my address", "the receipt"]
VERBS = ["is late", "looks wrong", "does not work", "was charged twice", "needs a change", "is missing"]


def build_teacher(path: Path, tokenizer_dir: Path) -> Path:
    return build_tiny_qwen2_dir(path, tokenizer_dir, seed=1, **TEACHER)


def build_student(path: Path, tokenizer_dir: Path, **overrides: Any) -> Path:
    return build_tiny_qwen2_dir(path, tokenizer_dir, seed=2, **{**STUDENT, **overrides})


def chat_examples(n: int) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        s, v = SUBJECTS[i % len(SUBJECTS)], VERBS[(i * 5) % len(VERBS)]
        out.append({"messages": [{"role": "user", "content": f"Hello, {s} {v}. What can I do?"},
                                 {"role": "assistant", "content": f"Sorry that {s} {v}. Open settings, then help."}]})
    return out


def write_dataset(path: Path, n: int = 24) -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in chat_examples(n)))
    return path


def job_spec(**overrides: Any) -> dict[str, Any]:
    """A valid DistillationJob spec (wire format) for the tiny pair; the tests pass local paths as overrides."""
    spec: dict[str, Any] = {
        "teacher": {"uri": "pvc://models/teacher"},
        "student": {"uri": "pvc://models/student"},
        "dataset": {"uri": "pvc://data/support.jsonl", "format": "chat", "validationFraction": 0.25},
        "loss": {"temperature": 2.0, "alpha": 0.7},
        "training": {"maxSteps": 6, "learningRate": 5e-3, "batchSize": 4, "maxSeqLength": 48,
                     "warmupRatio": 0.0, "saveSteps": 3, "loggingSteps": 1, "seed": 7},
        "resources": {"gpusPerNode": 0, "hardwareProfile": "cpu"},
        "output": {"uri": "pvc://models/out"},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        elif value is None:
            spec.pop(key, None)
        else:
            spec[key] = value
    return spec


def write_job(path: Path, spec: dict[str, Any]) -> Path:
    doc = {"apiVersion": "distillery.dev/v1alpha1", "kind": "DistillationJob", "metadata": {"name": "t"},
           "spec": spec}
    path.write_text(yaml.safe_dump(doc))
    return path


def copy_with_other_tokenizer(src: Path, dst: Path) -> Path:
    """The model in `src` with a tokenizer that maps two tokens the other way round (same size, other ids)."""
    import shutil

    shutil.copytree(src, dst)
    tok = json.loads((dst / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    vocab["hello"], vocab["world"] = vocab["world"], vocab["hello"]
    (dst / "tokenizer.json").write_text(json.dumps(tok))
    return dst
