"""The distillation loss: alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE, over non-padding tokens.

Causal LM: the logits at position t predict the token at t + 1, so logits[:, :-1] meet labels[:, 1:].
A position takes part when its target label is not IGNORE_INDEX (padding, and whatever the data masks).
Both terms are means over exactly those positions; T^2 keeps the KL's gradient scale independent of T
(Hinton et al., 2015).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100  # transformers' and torch's cross-entropy convention


@dataclass(frozen=True)
class LossParts:
    loss: Tensor  # what is optimized
    kl: Tensor  # KL(teacher_T || student_T), mean per token (without T^2)
    ce: Tensor  # cross-entropy of the student on the labels, mean per token
    tokens: int  # positions counted


def shared_vocab(student_logits: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
    """Both logits over the same vocabulary: checkpoints of one tokenizer may pad their embedding
    differently (e.g. 151936 vs 152064 rows); the padding rows are no token, so they are cut off."""
    v = min(student_logits.shape[-1], teacher_logits.shape[-1])
    return student_logits[..., :v], teacher_logits[..., :v]


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, *, temperature: float,
                      alpha: float) -> LossParts:
    """student/teacher logits [B, S, V], labels [B, S] (IGNORE_INDEX where no target)."""
    student_logits, teacher_logits = shared_vocab(student_logits, teacher_logits)
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    tokens = int(mask.sum())
    s = student_logits[:, :-1][mask].float()  # [N, V]: only the counted positions
    t = teacher_logits[:, :-1][mask].float()
    if tokens == 0:  # a batch of padding only: nothing to learn, but keep the graph
        zero = student_logits.sum() * 0.0
        return LossParts(zero, zero.detach(), zero.detach(), 0)
    ce = F.cross_entropy(s, targets[mask])
    log_p_teacher = F.log_softmax(t / temperature, dim=-1)
    log_q_student = F.log_softmax(s / temperature, dim=-1)
    kl = F.kl_div(log_q_student, log_p_teacher, log_target=True, reduction="sum") / tokens
    loss = alpha * temperature**2 * kl + (1.0 - alpha) * ce
    return LossParts(loss, kl.detach(), ce.detach(), tokens)
