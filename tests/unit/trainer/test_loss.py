"""The distillation loss against a hand computation on fixed logits: which positions count (padding out,
the causal shift), the T^2 scaling, and the two ends alpha = 0 (plain cross-entropy) and alpha = 1 (pure KD)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distillery_trainer.loss import IGNORE_INDEX, distillation_loss

# batch 2, sequence 3, vocabulary 3; the second row's last position is padding
STUDENT = torch.tensor([[[1.0, 0.0, -1.0], [0.5, 0.5, 0.0], [9.0, 9.0, 9.0]],
                        [[0.0, 2.0, 0.0], [-1.0, 0.0, 1.0], [7.0, -7.0, 3.0]]])
TEACHER = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [-9.0, 9.0, 0.0]],
                        [[0.0, 0.0, 3.0], [1.0, 1.0, -1.0], [5.0, 5.0, -5.0]]])
LABELS = torch.tensor([[0, 2, 1], [1, 0, IGNORE_INDEX]])


def softmax(xs: list[float], t: float) -> list[float]:
    e = [math.exp(x / t) for x in xs]
    return [v / sum(e) for v in e]


def by_hand(temperature: float, alpha: float) -> tuple[float, float, float]:
    """Plain Python: position t's logits predict label t + 1; a padded label takes no part."""
    kls, ces = [], []
    for b in range(2):
        for t in range(2):  # the last position predicts nothing
            target = int(LABELS[b, t + 1])
            if target == IGNORE_INDEX:
                continue
            s, q = STUDENT[b, t].tolist(), TEACHER[b, t].tolist()
            ces.append(-math.log(softmax(s, 1.0)[target]))
            p_t, p_s = softmax(q, temperature), softmax(s, temperature)
            kls.append(sum(p * math.log(p / r) for p, r in zip(p_t, p_s, strict=True)))
    kl, ce = sum(kls) / len(kls), sum(ces) / len(ces)
    return alpha * temperature**2 * kl + (1 - alpha) * ce, kl, ce


@pytest.mark.parametrize("temperature,alpha", [(2.0, 0.7), (1.0, 0.5), (4.0, 0.3), (0.5, 0.9)])
def test_the_loss_is_the_hand_computation(temperature: float, alpha: float):
    parts = distillation_loss(STUDENT, TEACHER, LABELS, temperature=temperature, alpha=alpha)
    loss, kl, ce = by_hand(temperature, alpha)
    assert parts.tokens == 3  # 2 + 1: the padded target is not counted
    assert parts.loss.item() == pytest.approx(loss, rel=1e-5)
    assert parts.kl.item() == pytest.approx(kl, rel=1e-5)
    assert parts.ce.item() == pytest.approx(ce, rel=1e-5)


def test_padding_takes_no_part():
    # whatever the logits at a padded target say, the loss does not move
    noisy_s, noisy_t = STUDENT.clone(), TEACHER.clone()
    noisy_s[1, 1] = torch.tensor([100.0, -100.0, 50.0])
    noisy_t[1, 1] = torch.tensor([-30.0, 80.0, 0.0])
    a = distillation_loss(STUDENT, TEACHER, LABELS, temperature=2.0, alpha=0.7)
    b = distillation_loss(noisy_s, noisy_t, LABELS, temperature=2.0, alpha=0.7)
    assert a.loss.item() == pytest.approx(b.loss.item(), rel=1e-6)


def test_temperature_squared_scales_the_kl_term():
    t = 3.0
    parts = distillation_loss(STUDENT, TEACHER, LABELS, temperature=t, alpha=1.0)
    assert parts.loss.item() == pytest.approx(t**2 * parts.kl.item(), rel=1e-6)
    _, kl, _ = by_hand(t, 1.0)
    assert parts.loss.item() == pytest.approx(9.0 * kl, rel=1e-5)


def test_alpha_zero_is_plain_cross_entropy():
    parts = distillation_loss(STUDENT, TEACHER, LABELS, temperature=2.0, alpha=0.0)
    expected = F.cross_entropy(STUDENT[:, :-1].reshape(-1, 3), LABELS[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    assert parts.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # and the teacher does not matter at all
    other = distillation_loss(STUDENT, -TEACHER, LABELS, temperature=2.0, alpha=0.0)
    assert other.loss.item() == pytest.approx(parts.loss.item(), rel=1e-7)


def test_alpha_one_is_pure_distillation():
    parts = distillation_loss(STUDENT, TEACHER, LABELS, temperature=2.0, alpha=1.0)
    # the labels' values do not matter (only which positions count)
    relabeled = torch.where(LABELS == IGNORE_INDEX, LABELS, (LABELS + 1) % 3)
    other = distillation_loss(STUDENT, TEACHER, relabeled, temperature=2.0, alpha=1.0)
    assert other.loss.item() == pytest.approx(parts.loss.item(), rel=1e-7)
    assert parts.loss.item() == pytest.approx(4.0 * by_hand(2.0, 1.0)[1], rel=1e-5)


def test_a_student_equal_to_its_teacher_has_zero_kl():
    parts = distillation_loss(TEACHER, TEACHER, LABELS, temperature=2.0, alpha=1.0)
    assert parts.kl.item() == pytest.approx(0.0, abs=1e-7)


def test_different_vocabulary_padding_is_cut_off():
    # a teacher with two extra (padding) rows in its output layer: the shared rows decide
    padded = torch.cat([TEACHER, torch.full((2, 3, 2), 50.0)], dim=-1)
    a = distillation_loss(STUDENT, TEACHER, LABELS, temperature=2.0, alpha=0.7)
    b = distillation_loss(STUDENT, padded, LABELS, temperature=2.0, alpha=0.7)
    assert b.loss.item() == pytest.approx(a.loss.item(), rel=1e-6)


def test_the_gradient_reaches_the_student_only():
    s = STUDENT.clone().requires_grad_(True)
    t = TEACHER.clone().requires_grad_(True)
    distillation_loss(s, t.detach(), LABELS, temperature=2.0, alpha=0.7).loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert s.grad[1, 2].abs().sum() == 0  # the last position predicts nothing


def test_a_batch_of_padding_only_is_zero():
    labels = torch.full_like(LABELS, IGNORE_INDEX)
    parts = distillation_loss(STUDENT, TEACHER, labels, temperature=2.0, alpha=0.7)
    assert parts.tokens == 0 and parts.loss.item() == 0.0


def test_alpha_zero_equals_the_models_own_language_modelling_loss(tiny_student_dir, tiny_teacher_dir):
    # the same shift and the same ignored positions as transformers' causal LM loss
    from distillery_trainer.data import PadCollator
    from distillery_trainer.models import load_causal_lm

    student = load_causal_lm(tiny_student_dir, torch.float32).eval()
    teacher = load_causal_lm(tiny_teacher_dir, torch.float32).eval()
    batch = PadCollator(pad_token_id=151643)([{"input_ids": [151646, 9707, 1879, 11, 1246]},
                                             {"input_ids": [151646, 9707, 30]}])
    with torch.no_grad():
        out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    parts = distillation_loss(out.logits, t, batch["labels"], temperature=2.0, alpha=0.0)
    assert parts.tokens == 4 + 2
    assert parts.loss.item() == pytest.approx(out.loss.item(), rel=1e-5)


def test_the_sum_reduction_is_the_mean_times_the_tokens():
    mean = distillation_loss(STUDENT, TEACHER, LABELS, temperature=2.0, alpha=0.7)
    total = distillation_loss(STUDENT, TEACHER, LABELS, temperature=2.0, alpha=0.7, reduction="sum")
    assert total.loss.item() == pytest.approx(3 * by_hand(2.0, 0.7)[0], rel=1e-5)
    assert total.kl.item() == pytest.approx(mean.kl.item()) and total.ce.item() == pytest.approx(mean.ce.item())


@pytest.mark.parametrize("chunk", [1, 2, 4])
def test_chunks_give_the_same_loss_and_gradient(chunk: int):
    # rows of 6 positions over a vocabulary of 50, padding at the end of two rows: chunks cut across rows
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(3, 6, 50, generator=g), torch.randn(3, 6, 50, generator=g) * 3
    labels = torch.randint(0, 50, (3, 6), generator=g)
    labels[0, 4:] = IGNORE_INDEX
    labels[2, 2:] = IGNORE_INDEX
    grads = []
    for size in (chunk, 10_000):
        s = student.clone().requires_grad_(True)
        parts = distillation_loss(s, teacher, labels, temperature=2.0, alpha=0.6, chunk_tokens=size)
        parts.loss.backward()
        grads.append((parts.loss.detach(), s.grad))
    (loss_c, grad_c), (loss_1, grad_1) = grads
    torch.testing.assert_close(loss_c, loss_1)
    torch.testing.assert_close(grad_c, grad_1)
    # and the unchunked reference is plain autograd over all counted positions at once
    s = student.clone().requires_grad_(True)
    targets, mask = labels[:, 1:], labels[:, 1:] != IGNORE_INDEX
    ls, lt = s[:, :-1][mask], teacher[:, :-1][mask]
    kl = F.kl_div(F.log_softmax(ls / 2.0, -1), F.log_softmax(lt / 2.0, -1), log_target=True, reduction="sum")
    ref = 0.6 * 4.0 * kl / mask.sum() + 0.4 * F.cross_entropy(ls, targets[mask])
    ref.backward()
    torch.testing.assert_close(loss_1, ref.detach())
    torch.testing.assert_close(grad_1, s.grad)
