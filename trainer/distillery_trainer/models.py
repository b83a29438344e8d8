"""Teacher and student: loading (Hugging Face layout), the shared-tokenizer rule, and LoRA via peft.

The teacher is frozen: eval mode (no dropout) and requires_grad False on every parameter, so it neither
trains nor keeps activations for a backward pass. Distillation compares the two models' distributions
token by token, which only means something when both read and write the same token ids: a teacher and
a student with different tokenizers are refused up front, naming what differs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from distillery_contract.distillation import Lora


class TokenizerMismatch(ValueError):
    """Teacher and student do not share a tokenizer."""


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "special_tokens_map.json", "added_tokens.json")


def same_tokenizer_files(a: Path, b: Path) -> bool:
    """Both directories hold byte-identical tokenizer files (the usual case: one family's checkpoints), so
    loading the second tokenizer to compare it (seconds for a 150k vocabulary) can be skipped."""
    present = [name for name in TOKENIZER_FILES if (a / name).is_file() or (b / name).is_file()]
    return bool(present) and all((a / n).is_file() and (b / n).is_file()
                                 and (a / n).read_bytes() == (b / n).read_bytes() for n in present)


def check_same_tokenizer(teacher: Any, student: Any, teacher_name: str = "teacher",
                         student_name: str = "student") -> None:
    """Raise TokenizerMismatch unless both map every token to the same id (and agree on special tokens)."""
    tv, sv = teacher.get_vocab(), student.get_vocab()
    problems = []
    if len(tv) != len(sv):
        problems.append(f"vocabulary sizes differ ({teacher_name} {len(tv)}, {student_name} {len(sv)})")
    differing = sorted(t for t in tv.keys() & sv.keys() if tv[t] != sv[t])
    only = sorted(tv.keys() ^ sv.keys())
    if differing:
        problems.append(f"{len(differing)} tokens have different ids, e.g. {differing[:3]}")
    if only:
        problems.append(f"{len(only)} tokens are in one vocabulary only, e.g. {only[:3]}")
    for attr in ("bos_token_id", "eos_token_id"):
        if getattr(teacher, attr, None) != getattr(student, attr, None):
            problems.append(f"{attr} differs ({getattr(teacher, attr, None)} vs {getattr(student, attr, None)})")
    if problems:
        raise TokenizerMismatch(f"the {teacher_name} and the {student_name} do not share a tokenizer: "
                                + "; ".join(problems) + ". Distillation compares their outputs token by "
                                "token: pick a student of the teacher's family (same tokenizer)")


def load_causal_lm(path: Path, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)


def load_teacher(path: Path, dtype: torch.dtype, device: torch.device | str = "cpu") -> nn.Module:
    teacher = load_causal_lm(path, dtype).to(device)
    freeze(teacher)
    return teacher


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


def check_vocab_covers(teacher: nn.Module, student: nn.Module, max_token_id: int) -> None:
    """Both output layers cover every token id in the data (rows beyond the smaller one are padding,
    cut off in the loss; checkpoints of one tokenizer often pad their embedding differently)."""
    for name, model in (("teacher", teacher), ("student", student)):
        rows = cast(Any, model).get_output_embeddings().weight.shape[0]
        if max_token_id >= rows:
            raise TokenizerMismatch(f"the data has token id {max_token_id} but the {name}'s output layer has "
                                    f"only {rows} rows: it was not trained with this tokenizer")


def apply_lora(student: nn.Module, lora: Lora) -> nn.Module:
    """Wrap the student with peft LoRA adapters: only the adapters train, the base weights are frozen."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.target_modules), task_type="CAUSAL_LM", bias="none")
    names = {n.rsplit(".", 1)[-1] for n, _ in student.named_modules()}
    missing = [m for m in lora.target_modules if m not in names]
    if missing:
        linears = sorted({n.rsplit(".", 1)[-1] for n, m in student.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"spec.lora.targetModules: the student has no module named {missing} "
                         f"(its linear layers: {linears})")
    return get_peft_model(student, config)


def merged(student: nn.Module) -> nn.Module:
    """The plain transformers model to save: LoRA adapters folded into the base weights."""
    from peft import PeftModel

    if isinstance(student, PeftModel):
        return cast(nn.Module, student.merge_and_unload())
    return student


def trainable_parameter_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]
