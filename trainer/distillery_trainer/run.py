"""One distillation job, start to finish: resolve the locations, load and check the models and the data,
measure, train, measure again, write the artifact and its lineage, publish it.

Every process of a torchrun group runs this; only the main one writes the artifact. A job that finds
checkpoints in its output directory resumes from the latest (a restarted pod loses nothing but the
steps since then).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from torch.utils.data import DataLoader

from distillery_contract.distillation import DistillationJobSpec, Lora, Method
from distillery_trainer import artifact, data, models, storage
from distillery_trainer.progress import PROGRESS_FILE, ProgressReporter
from distillery_trainer.result import train_result, write_result
from distillery_trainer.trainer import (
    DistillationTrainer,
    NoFinalCheckpoint,
    evaluate_distillation,
    pick_precision,
    training_arguments,
)

log = logging.getLogger("distillery_trainer")

CHECKPOINTS = "checkpoints"


@dataclass(frozen=True)
class Overrides:
    """Local paths that replace the spec's URIs (distillery-train --teacher/--student/--dataset/--output)."""

    teacher: Path | None = None
    student: Path | None = None
    dataset: Path | None = None
    output: Path | None = None
    max_steps: int | None = None


@dataclass
class Result:
    output: Path
    lineage: dict[str, Any] | None  # None: stopped before the last step (checkpoints kept) or not the main process
    before: dict[str, float] | None = None
    after: dict[str, float] | None = None
    steps: int = 0


def _source(uri: str, revision: str | None, override: Path | None) -> tuple[Path, str]:
    """(local path, what the lineage records as its origin)."""
    if override is not None:
        return Path(override), str(Path(override).resolve())
    return storage.fetch(uri, revision=revision), uri


def run_job(spec: DistillationJobSpec, overrides: Overrides = Overrides(), *, callbacks: list[Any] | None = None,
            progress_bar: bool = True) -> Result:
    teacher_dir, teacher_origin = _source(spec.teacher.uri, spec.teacher.revision, overrides.teacher)
    student_dir, student_origin = _source(spec.student.uri, spec.student.revision, overrides.student)
    dataset_file, dataset_origin = _source(spec.dataset.uri, None, overrides.dataset)
    target = (storage.OutputTarget(Path(overrides.output)) if overrides.output is not None
              else storage.output_target(spec.output.uri))
    out = target.local
    output_origin = str(out.resolve()) if overrides.output is not None else spec.output.uri

    # decided once: device, precision, dtypes
    cuda = torch.cuda.is_available()
    precision = pick_precision(spec.training.precision, cuda)
    teacher_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)

    tokenizer = models.load_tokenizer(student_dir)
    if not models.same_tokenizer_files(teacher_dir, student_dir):
        models.check_same_tokenizer(models.load_tokenizer(teacher_dir), tokenizer)
    texts = data.read_texts(dataset_file, spec.dataset.format, tokenizer)
    examples = data.tokenize(texts, tokenizer, spec.training.max_seq_length, spec.dataset.format)
    train_examples, val_examples = data.split(examples, spec.dataset.validation_fraction, spec.training.seed)
    if not train_examples:
        raise data.DatasetError(f"{dataset_file}: no training examples left after the validation split")
    collator = data.PadCollator(data.pad_token_id(tokenizer))

    args = training_arguments(spec, out / CHECKPOINTS, precision=precision, cuda=cuda,
                              max_steps=overrides.max_steps, progress_bar=progress_bar)
    teacher = models.load_teacher(teacher_dir, teacher_dtype)
    student = models.load_causal_lm(student_dir, torch.float32)  # fp32 master weights; AMP casts per op
    models.check_vocab_covers(teacher, student, max(max(e) for e in examples))
    if spec.method == Method.LORA:
        from transformers import set_seed

        set_seed(spec.training.seed)  # the adapters' initialisation
        student = models.apply_lora(student, spec.lora or Lora())

    reporter = ProgressReporter(out / PROGRESS_FILE)
    trainer = DistillationTrainer(model=student, args=args, train_dataset=data.TokenDataset(train_examples),
                                  data_collator=collator, teacher=teacher, loss=spec.loss,
                                  callbacks=[reporter, NoFinalCheckpoint(), *(callbacks or [])])

    def validation() -> dict[str, float] | None:
        if not val_examples:
            return None
        batches = DataLoader(data.TokenDataset(val_examples), batch_size=spec.training.batch_size,
                             collate_fn=collator)
        student_now = cast(nn.Module, trainer.model)
        return evaluate_distillation(student_now, trainer.teacher, batches, spec.loss, trainer.args.device)

    before = validation()
    if before and trainer.is_world_process_zero():
        log.info("validation before: KL %.4f, loss (CE) %.4f", before["kl"], before["ce"])
    from transformers.trainer_utils import get_last_checkpoint

    last: str | None = None
    if (out / CHECKPOINTS).is_dir():
        last = get_last_checkpoint(str(out / CHECKPOINTS))  # type: ignore[no-untyped-call]
    if last and trainer.is_world_process_zero():
        log.info("resuming from %s", last)
    output = trainer.train(resume_from_checkpoint=last)
    state = trainer.state
    if state.global_step < state.max_steps:  # stopped early (a callback): the checkpoints are the result
        return Result(out, None, before, None, state.global_step)
    after = validation()
    if not trainer.is_world_process_zero():
        return Result(out, None, before, after, state.global_step)
    if after:
        log.info("validation after: KL %.4f, loss (CE) %.4f", after["kl"], after["ce"])

    final = models.merged(trainer.accelerator.unwrap_model(trainer.model))
    artifact.save_model(final, tokenizer, out, dtype=artifact.source_dtype(student_dir), student_dir=student_dir)
    if spec.quantization is not None:
        artifact.save_quantized(out, spec.quantization)
    losses = [h["loss"] for h in state.log_history if "loss" in h]
    lineage = {
        "teacher": {"uri": teacher_origin, "revision": spec.teacher.revision},
        "student": {"uri": student_origin, "revision": spec.student.revision},
        "dataset": {"uri": dataset_origin, "format": str(spec.dataset.format),
                    "sha256": artifact.sha256_file(dataset_file),
                    "examples": {"train": len(train_examples), "validation": len(val_examples)}},
        "output": {"uri": output_origin},
        "method": str(spec.method),
        "lora": spec.lora.model_dump(by_alias=True) if spec.method == Method.LORA and spec.lora else None,
        "loss": spec.loss.model_dump(by_alias=True),
        "training": {**spec.training.model_dump(by_alias=True), "maxSteps": state.max_steps,
                     "precision": precision, "worldSize": args.world_size},
        "steps": state.global_step,
        "epochs": round(float(state.epoch or 0.0), 4),
        "metrics": {
            "train": {"loss": losses[-1] if losses else None, "meanLoss": output.training_loss,
                      # this process's tokens (of worldSize) and the loop's wall time, resumed steps only
                      "tokens": trainer.tokens_trained, "seconds": round(output.metrics["train_runtime"], 3)},
            "validation": {"before": before, "after": after},
        },
        "codeVersion": artifact.code_version(),
    }
    if spec.quantization is not None:
        lineage["quantized"] = spec.quantization.model_dump(by_alias=True)
    lineage = artifact.write_lineage(out, lineage)
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)  # the artifact is whole: nothing left to resume
    if target.publish is not None:
        log.info("uploading %s to %s", out, spec.output.uri)
        target.publish()
    written = write_result(train_result(spec.output.uri if overrides.output is None else output_origin, out,
                                        lineage))
    if written:
        log.info("result for the operator in %s", written)
    return Result(out, lineage, before, after, state.global_step)
