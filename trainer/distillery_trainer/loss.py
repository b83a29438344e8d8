"""The distillation loss: alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE, over non-padding tokens.

Causal LM: the logits at position t predict the token at t + 1, so logits[:, :-1] meet labels[:, 1:].
A position takes part when its target label is not IGNORE_INDEX (padding, and whatever the data masks).
Both terms count exactly those positions, each token once: `reduction="mean"` divides their sum by the
batch's count, `reduction="sum"` leaves the division to the caller (the Trainer divides by the count of the
whole accumulated, all-rank batch, so that every token weighs the same whatever micro-batch it is in).
T^2 keeps the KL's gradient scale independent of T (Hinton et al., 2015).

The terms are computed CHUNK_TOKENS positions at a time, each chunk recomputed in the backward pass
(activation checkpointing): with a 152k vocabulary the fp32 softmaxes of every position at once would be
several [N, V] tensors; this way the extra memory is a few [CHUNK_TOKENS, V].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100  # transformers' and torch's cross-entropy convention
CHUNK_TOKENS = 1024


@dataclass(frozen=True)
class LossParts:
    loss: Tensor  # what is optimized (a per-token mean, or a sum over tokens with reduction="sum")
    kl: Tensor  # KL(teacher_T || student_T), mean per token (without T^2)
    ce: Tensor  # cross-entropy of the student on the labels, mean per token
    tokens: int  # positions counted


def shared_vocab(student_logits: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
    """Both logits over the same vocabulary: checkpoints of one tokenizer may pad their embedding
    differently (e.g. 151936 vs 152064 rows); the padding rows are no token, so they are cut off."""
    v = min(student_logits.shape[-1], teacher_logits.shape[-1])
    return student_logits[..., :v], teacher_logits[..., :v]


def _chunk_sums(s: Tensor, t: Tensor, targets: Tensor, temperature: float) -> Tensor:
    """[KL sum, CE sum] over the rows of one chunk (logits [n, V], targets [n]) whose target is not
    IGNORE_INDEX, in fp32."""
    s, t = s.float(), t.float()
    ce = F.cross_entropy(s, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    log_p_teacher = F.log_softmax(t / temperature, dim=-1)
    log_q_student = F.log_softmax(s / temperature, dim=-1)
    kl_rows = F.kl_div(log_q_student, log_p_teacher, log_target=True, reduction="none").sum(-1)
    kl = (kl_rows * (targets != IGNORE_INDEX)).sum()
    return torch.stack([kl, ce])


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, *, temperature: float,
                      alpha: float, reduction: Literal["mean", "sum"] = "mean",
                      chunk_tokens: int = CHUNK_TOKENS) -> LossParts:
    """student/teacher logits [B, S, V], labels [B, S] (IGNORE_INDEX where no target)."""
    student_logits, teacher_logits = shared_vocab(student_logits, teacher_logits)
    b, s_len, v = student_logits.shape
    tokens = int((labels[:, 1:] != IGNORE_INDEX).sum())
    if tokens == 0:  # a batch of padding only: nothing to learn, but keep the graph
        zero = student_logits.sum() * 0.0
        return LossParts(zero, zero.detach(), zero.detach(), 0)
    # position t predicts label t + 1; the last position of each row predicts nothing. Contiguous row chunks
    # of the [B * S, V] logits (split: the backward pass assembles the logits' gradient once, not per chunk)
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(b * s_len)
    recompute = torch.is_grad_enabled() and student_logits.requires_grad
    sums = torch.zeros(2, device=student_logits.device)
    for s, t, y in zip(torch.split(student_logits.reshape(b * s_len, v), chunk_tokens),
                       torch.split(teacher_logits.reshape(b * s_len, v), chunk_tokens),
                       torch.split(targets, chunk_tokens), strict=True):
        if not bool((y != IGNORE_INDEX).any()):
            continue  # only padding: no part in the loss nor its gradient
        if recompute:
            sums = sums + checkpoint(_chunk_sums, s, t, y, temperature, use_reentrant=False)
        else:
            sums = sums + _chunk_sums(s, t, y, temperature)
    kl_sum, ce_sum = sums[0], sums[1]
    loss = alpha * temperature**2 * kl_sum + (1.0 - alpha) * ce_sum
    if reduction == "mean":
        loss = loss / tokens
    return LossParts(loss, kl_sum.detach() / tokens, ce_sum.detach() / tokens, tokens)
