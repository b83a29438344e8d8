"""Distillation on the CPU for the demo's pair (the real Qwen2.5-0.5B teacher, its first 4 layers as the
student, trainer/examples/support.jsonl): training tokens/s, and KL(teacher || student) and the validation
loss on the held-out chats before and after. The job is trainer/examples/distillationjob-demo.yaml, run by
the same code as `distillery-train` (distillery_trainer.run.run_job) in the bench's own process.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from bench.procs import REPO_ROOT

JOB = REPO_ROOT / "trainer" / "examples" / "distillationjob-demo.yaml"
DATASET = REPO_ROOT / "trainer" / "examples" / "support.jsonl"


def run_distill_bench(teacher_dir: str, student_dir: str, layers: int = 4,
                      max_steps: int | None = None) -> dict[str, Any]:
    from bench.models import first_layers_student
    from distillery_trainer.cli import load_job
    from distillery_trainer.run import Overrides, run_job

    student = first_layers_student(Path(teacher_dir), Path(student_dir), layers)
    spec = load_job(JOB)
    with tempfile.TemporaryDirectory(prefix="distill-bench-") as out:
        t0 = time.perf_counter()
        result = run_job(spec, Overrides(teacher=Path(teacher_dir), student=Path(student_dir), dataset=DATASET,
                                         output=Path(out) / "student", max_steps=max_steps), progress_bar=False)
        total_s = time.perf_counter() - t0
    assert result.lineage is not None
    lineage = result.lineage
    train = lineage["metrics"]["train"]
    before, after = lineage["metrics"]["validation"]["before"], lineage["metrics"]["validation"]["after"]
    return {
        "job": str(JOB.relative_to(REPO_ROOT)),
        "teacher": teacher_dir,
        "student_layers": layers,
        "student_params": student.get("params"),
        "steps": lineage["steps"],
        "batch_size": spec.training.batch_size,
        "max_seq_length": spec.training.max_seq_length,
        "train_tokens": train["tokens"],
        "train_seconds": train["seconds"],
        "train_tokens_per_s": round(train["tokens"] / train["seconds"], 1) if train["seconds"] else None,
        "job_seconds": round(total_s, 1),  # loading, evaluation twice, saving and quantizing included
        "kl_before": round(before["kl"], 4),
        "kl_after": round(after["kl"], 4),
        "val_loss_before": round(before["ce"], 4),
        "val_loss_after": round(after["ce"], 4),
        "val_tokens": before["tokens"],
        "temperature": lineage["loss"]["temperature"],
        "alpha": lineage["loss"]["alpha"],
    }
