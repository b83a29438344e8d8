"""The objective is a mean over the target tokens of the whole optimizer step: accumulating micro-batches of
unequal token counts takes the same step as one batch of them all (each token weighs the same, a short
micro-batch no more than a long one). Plain SGD, so the step is the gradient itself, scale included."""

from __future__ import annotations

from pathlib import Path

import torch

from distillery_contract.distillation import DistillationJobSpec
from distillery_trainer import data
from distillery_trainer.models import load_causal_lm, load_teacher
from distillery_trainer.trainer import DistillationTrainer, training_arguments
from tests.trainer_fixtures import job_spec

# one short and three long examples: per-micro-batch means would weigh the short one's 2 targets like 20
LENGTHS = [3, 21, 12, 17]


def examples() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [[151646, *torch.randint(100, 5000, (n - 1,), generator=g).tolist()] for n in LENGTHS]


def one_step(student_dir: Path, teacher_dir: Path, out: Path, *, batch_size: int, accumulation: int) -> dict:
    spec = DistillationJobSpec.model_validate(job_spec(training={
        "maxSteps": 1, "batchSize": batch_size, "gradientAccumulationSteps": accumulation, "warmupRatio": 0.0,
        "learningRate": 1.0, "weightDecay": 0.0, "saveSteps": 100}))
    args = training_arguments(spec, out, precision="fp32", cuda=False, progress_bar=False)
    student = load_causal_lm(student_dir, torch.float32)
    sgd = torch.optim.SGD(student.parameters(), lr=1.0)
    trainer = DistillationTrainer(model=student, args=args, train_dataset=data.TokenDataset(examples()),
                                  data_collator=data.PadCollator(151643), teacher=load_teacher(teacher_dir,
                                  torch.float32), loss=spec.loss, optimizers=(sgd, None))
    trainer.train()
    assert trainer.state.global_step == 1 and trainer.tokens_trained == sum(n - 1 for n in LENGTHS)
    return {k: v.detach().clone() for k, v in student.state_dict().items()}


def test_accumulating_unequal_micro_batches_equals_one_batch(tiny_student_dir, tiny_teacher_dir, tmp_path: Path):
    start = load_causal_lm(tiny_student_dir, torch.float32).state_dict()
    whole = one_step(tiny_student_dir, tiny_teacher_dir, tmp_path / "whole", batch_size=4, accumulation=1)
    split = one_step(tiny_student_dir, tiny_teacher_dir, tmp_path / "split", batch_size=1, accumulation=4)
    moved = [k for k in start if not torch.equal(whole[k], start[k])]
    assert moved  # the step did train
    for k in moved:  # compare the steps (the gradients), not the weights they were added to
        torch.testing.assert_close(split[k] - start[k], whole[k] - start[k], rtol=1e-3, atol=1e-6, msg=k)
