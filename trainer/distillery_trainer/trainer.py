"""The training loop: transformers' Trainer with the distillation loss in `compute_loss`.

Everything else is the Trainer's own: DDP under torchrun (gloo on CPU, NCCL on GPU), mixed precision,
gradient accumulation, the cosine schedule with warmup, checkpoints every save_steps and resume. The
teacher runs under torch.no_grad on the same device as the student. `training_arguments` turns the job's
spec into TrainingArguments once, up front.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from distillery_contract.distillation import DistillationJobSpec, Loss
from distillery_trainer.loss import distillation_loss


class PrecisionError(ValueError):
    pass


def pick_precision(requested: str, cuda: bool) -> str:
    """auto: bf16 on a GPU that has it, fp16 on an older GPU, fp32 on the CPU."""
    if requested == "auto":
        if not cuda:
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if requested == "fp16" and not cuda:
        raise PrecisionError("spec.training.precision: fp16 needs a GPU (use bf16, fp32 or auto on the CPU)")
    return requested


def training_arguments(spec: DistillationJobSpec, checkpoint_dir: Path, *, precision: str, cuda: bool,
                       max_steps: int | None = None, progress_bar: bool = True) -> TrainingArguments:
    t = spec.training
    steps = max_steps or t.max_steps
    return TrainingArguments(
        output_dir=str(checkpoint_dir),
        num_train_epochs=t.epochs,
        max_steps=steps if steps else -1,
        learning_rate=t.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=t.warmup_ratio,  # a float below 1: the share of the total steps
        weight_decay=t.weight_decay,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not cuda,
        # one process: no process group at all; under torchrun on CPU: gloo (NCCL is GPU only)
        ddp_backend="gloo" if not cuda and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=2,  # the latest and the one before (a crash while saving leaves one whole)
        logging_steps=t.logging_steps,
        logging_first_step=True,
        eval_strategy="no",  # the validation loss and KL are measured by evaluate_distillation, before and after
        seed=t.seed,
        data_seed=t.seed,
        report_to="none",
        remove_unused_columns=False,  # our collator's columns are the model's inputs already
        dataloader_num_workers=0,
        disable_tqdm=not progress_bar,
        ddp_find_unused_parameters=False,
        average_tokens_across_devices=True,  # the loss divides by the token count of all ranks (compute_loss)
    )


class NoFinalCheckpoint(TrainerCallback):
    """The Trainer also checkpoints after the last step; the artifact is written right then instead, so that
    checkpoint would only be written to be deleted (seconds to minutes of a big model's weights and optimizer)."""

    def on_step_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> Any:
        if state.global_step >= state.max_steps and state.global_step % args.save_steps != 0:
            control.should_save = False
        return control


class DistillationTrainer(Trainer):
    """A Trainer whose loss is alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE.

    The objective is the mean over the target tokens of the whole optimizer step: every micro-batch of the
    accumulation on every rank. The Trainer counts those tokens up front (`num_items_in_batch`: labels[..., 1:]
    other than -100, summed over the accumulated micro-batches and gathered over the ranks, as
    average_tokens_across_devices is on by default), so each micro-batch's loss is its token SUM over that
    count. Summing micro-batches (accumulation) and averaging ranks (DDP, hence the world size factor) then
    gives the global token mean; a mean per micro-batch would weigh a short micro-batch's tokens more.
    """

    def __init__(self, *args: Any, teacher: nn.Module, loss: Loss, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.teacher = teacher.to(self.args.device)
        self.loss_settings = loss
        # the Trainer counts num_items_in_batch only for models that take loss kwargs, and then counts the
        # shifted labels only when it recognises a causal LM loss: both are ours whatever the student (LoRA)
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True
        self._parts: dict[str, float] = {"kl": 0.0, "ce": 0.0, "n": 0.0}
        self.tokens_trained = 0  # target tokens this process trained on (the throughput's numerator)

    def compute_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        labels = inputs["labels"]
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=inputs["input_ids"],
                                          attention_mask=inputs["attention_mask"]).logits
        settings = self.loss_settings
        if num_items_in_batch is None:  # not counted (no labels seen up front): this micro-batch's own mean
            parts = distillation_loss(outputs.logits, teacher_logits, labels, temperature=settings.temperature,
                                      alpha=settings.alpha)
            loss = parts.loss
        else:
            parts = distillation_loss(outputs.logits, teacher_logits, labels, temperature=settings.temperature,
                                      alpha=settings.alpha, reduction="sum")
            loss = parts.loss / torch.as_tensor(num_items_in_batch, device=parts.loss.device).clamp(min=1)
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes  # DDP averages the ranks' gradients
        if model.training:  # token-weighted means of KL and CE for the log
            self._parts["kl"] += float(parts.kl) * parts.tokens
            self._parts["ce"] += float(parts.ce) * parts.tokens
            self._parts["n"] += parts.tokens
            self.tokens_trained += parts.tokens
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self._parts["n"]:  # the mean KL and CE since the last log, beside the loss
            logs["kl"] = round(self._parts["kl"] / self._parts["n"], 6)
            logs["ce"] = round(self._parts["ce"] / self._parts["n"], 6)
            self._parts = {"kl": 0.0, "ce": 0.0, "n": 0.0}
        super().log(logs, *args, **kwargs)


@torch.no_grad()
def evaluate_distillation(student: nn.Module, teacher: nn.Module, batches: Iterable[dict[str, torch.Tensor]],
                          loss: Loss, device: torch.device | str) -> dict[str, float]:
    """Token-weighted means over `batches`: KL(teacher_T || student_T), the student's cross-entropy (the
    validation loss) and the distillation loss, as the training objective counts them."""
    was_training = student.training
    student.eval()
    sums = {"kl": 0.0, "ce": 0.0, "loss": 0.0}
    tokens = 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        parts = distillation_loss(s, t, batch["labels"], temperature=loss.temperature, alpha=loss.alpha)
        for k in sums:
            sums[k] += float(getattr(parts, k)) * parts.tokens
        tokens += parts.tokens
    student.train(was_training)
    if not tokens:
        return {"kl": math.nan, "ce": math.nan, "loss": math.nan, "tokens": 0}
    return {**{k: v / tokens for k, v in sums.items()}, "tokens": tokens}
