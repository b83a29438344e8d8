"""Teacher and student: the teacher frozen, a tokenizer mismatch refused with a clear error, LoRA adapters
the only trainable parameters."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distillery_contract.distillation import Lora
from distillery_trainer.models import (
    TokenizerMismatch,
    apply_lora,
    check_same_tokenizer,
    check_vocab_covers,
    load_causal_lm,
    load_teacher,
    load_tokenizer,
    merged,
    same_tokenizer_files,
    trainable_parameter_names,
)
from tests.trainer_fixtures import copy_with_other_tokenizer


def test_the_teacher_is_frozen_in_eval_mode(tiny_teacher_dir: Path):
    teacher = load_teacher(tiny_teacher_dir, torch.float32)
    assert not teacher.training
    assert all(not m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())


def test_the_same_tokenizer_passes(tiny_teacher_dir: Path, tiny_student_dir: Path):
    check_same_tokenizer(load_tokenizer(tiny_teacher_dir), load_tokenizer(tiny_student_dir))
    assert same_tokenizer_files(tiny_teacher_dir, tiny_student_dir)  # byte-identical: no second load needed


def test_a_tokenizer_mismatch_is_refused(tmp_path: Path, tiny_student_dir: Path):
    other = copy_with_other_tokenizer(tiny_student_dir, tmp_path / "other")
    assert not same_tokenizer_files(tiny_student_dir, other)
    with pytest.raises(TokenizerMismatch, match=r"do not share a tokenizer: 2 tokens have different ids"):
        check_same_tokenizer(load_tokenizer(tiny_student_dir), load_tokenizer(other))


def test_a_smaller_output_layer_than_the_data_needs_is_refused(tiny_teacher_dir: Path, tiny_student_dir: Path):
    teacher = load_causal_lm(tiny_teacher_dir, torch.float32)
    student = load_causal_lm(tiny_student_dir, torch.float32)
    check_vocab_covers(teacher, student, 152063)
    with pytest.raises(TokenizerMismatch, match="token id 152064 but the teacher's output layer has only 152064"):
        check_vocab_covers(teacher, student, 152064)


def test_lora_trains_only_the_adapters_and_merges_back(tiny_student_dir: Path):
    base = load_causal_lm(tiny_student_dir, torch.float32)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = apply_lora(base, Lora(rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    names = trainable_parameter_names(model)
    assert names and all("lora_A" in n or "lora_B" in n for n in names)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names} == {"q_proj", "v_proj"}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.01)  # B starts at zero (a no-op adapter): make it count
    plain = merged(model)
    assert type(plain).__name__ == "Qwen2ForCausalLM"
    after = plain.state_dict()
    assert set(after) == set(before)  # no adapter tensors left: a plain checkpoint
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all("q_proj.weight" in k or "v_proj.weight" in k for k in changed)


def test_lora_on_a_module_the_student_lacks_is_refused(tiny_student_dir: Path):
    with pytest.raises(ValueError, match=r"spec.lora.targetModules: the student has no module named \['qkv'\]"):
        apply_lora(load_causal_lm(tiny_student_dir, torch.float32), Lora(target_modules=["q_proj", "qkv"]))
