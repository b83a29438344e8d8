"""Fixtures for the trainer's end-to-end tests: a tiny teacher and student with the real R1 tokenizer laid
out on a fake PVC mount, one full distillation run through the CLI (as a pod runs it), shared by the tests
that inspect its artifact."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.trainer_fixtures import build_student, build_teacher, job_spec, write_dataset, write_job


@dataclass(frozen=True)
class Pvc:
    root: Path
    teacher: Path
    student: Path
    dataset: Path


@pytest.fixture(scope="session")
def pvc(tmp_path_factory, r1_tokenizer_dir) -> Pvc:
    """root/models/{teacher,student} and root/data/support.jsonl: what job_spec's pvc:// URIs name."""
    root = tmp_path_factory.mktemp("pvc")
    (root / "data").mkdir()
    return Pvc(root, build_teacher(root / "models" / "teacher", r1_tokenizer_dir),
               build_student(root / "models" / "student", r1_tokenizer_dir),
               write_dataset(root / "data" / "support.jsonl", n=24))


# the spec every full-method run here shares (the resume test reruns it in pieces)
KD_SPEC: dict[str, Any] = job_spec(training={"maxSteps": 6, "saveSteps": 3, "learningRate": 1e-2})


@dataclass(frozen=True)
class Distilled:
    output: Path
    lineage: dict[str, Any]
    result: dict[str, Any]  # the termination message for the operator


@pytest.fixture(scope="session")
def distilled(pvc: Pvc, tmp_path_factory) -> Distilled:
    """`distillery-train -f job.yaml` on pvc:// URIs, with an int8 pre-quantized copy."""
    from distillery_trainer.cli import main
    from distillery_trainer.result import RESULT_FILE_ENV
    from distillery_trainer.storage import PVC_ROOT_ENV

    work = tmp_path_factory.mktemp("distilled")
    job = write_job(work / "job.yaml", {**KD_SPEC, "quantization": {"method": "int8"}})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(PVC_ROOT_ENV, str(pvc.root))
        mp.setenv(RESULT_FILE_ENV, str(work / "termination-log"))
        assert main(["-f", str(job), "--no-progress"]) == 0
    out = pvc.root / "models" / "out"
    return Distilled(out, json.loads((out / "lineage.json").read_text()),
                     json.loads((work / "termination-log").read_text()))
