"""Distillation divergences against hand-computed values (alignkit/losses/distill.py)."""

import math

import pytest
import torch

from alignkit.losses.distill import distillation_loss, generalized_jsd

# Two tokens: the student uniform (logits 0, 0: p_s = [1/2, 1/2]), the teacher [3/4, 1/4] (logits log 3, 0).
STUDENT = torch.tensor([[0.0, 0.0]])
TEACHER = torch.tensor([[math.log(3.0), 0.0]])
# KL(t || s) = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.3040988 - 0.1732868
FORWARD = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
# KL(s || t) = 1/2 ln(2/3) + 1/2 ln(2)
REVERSE = 0.5 * math.log(2 / 3) + 0.5 * math.log(2.0)
# beta 1/2: m = [5/8, 3/8]; KL(t || m) = 3/4 ln(6/5) + 1/4 ln(2/3), KL(s || m) = 1/2 ln(4/5) + 1/2 ln(4/3)
JSD = 0.5 * (0.75 * math.log(1.2) + 0.25 * math.log(2 / 3)) + 0.5 * (0.5 * math.log(0.8) + 0.5 * math.log(4 / 3))


def test_hand_values():
    assert FORWARD == pytest.approx(0.130812, abs=1e-6) and REVERSE == pytest.approx(0.143841, abs=1e-6)
    assert JSD == pytest.approx(0.033822, abs=1e-6)
    for beta, want in ((0.0, FORWARD), (1.0, REVERSE), (0.5, JSD)):
        torch.testing.assert_close(generalized_jsd(STUDENT, TEACHER, beta), torch.tensor([want]))


def test_jsd_tends_to_the_kls_scaled():
    # JSD(beta) ~ beta KL(t || s) as beta -> 0 and ~ (1 - beta) KL(s || t) as beta -> 1
    assert generalized_jsd(STUDENT, TEACHER, 1e-4).item() / 1e-4 == pytest.approx(FORWARD, rel=1e-2)
    assert generalized_jsd(STUDENT, TEACHER, 1 - 1e-4).item() / 1e-4 == pytest.approx(REVERSE, rel=1e-2)


def test_temperature_and_zero_at_equality():
    # temperature 2 halves the teacher's logits: p_t = softmax([ln 3 / 2, 0]) = [sqrt 3, 1] / (sqrt 3 + 1)
    pt = torch.tensor([math.sqrt(3), 1.0]) / (math.sqrt(3) + 1)
    want = float((pt * (pt.log() - math.log(0.5))).sum())
    torch.testing.assert_close(generalized_jsd(STUDENT, TEACHER, 0.0, temperature=2.0), torch.tensor([want]))
    assert generalized_jsd(TEACHER, TEACHER, 0.5).abs().item() < 1e-7


def test_gradient_flows_into_the_student_only():
    student = STUDENT.clone().requires_grad_(True)
    teacher = TEACHER.clone().requires_grad_(True)
    generalized_jsd(student, teacher, 0.0).sum().backward()
    # d KL(t || s) / d z_s = p_s - p_t = [1/2 - 3/4, 1/2 - 1/4]
    torch.testing.assert_close(student.grad, torch.tensor([[-0.25, 0.25]]))
    assert teacher.grad is None


def test_masked_sum_and_errors():
    s, t = torch.zeros(1, 3, 2), TEACHER.expand(1, 3, 2)
    total, n = distillation_loss(s, t, torch.tensor([[1, 0, 1]]), "forward_kl")
    assert n.item() == 2 and total.item() == pytest.approx(2 * FORWARD, abs=1e-6)
    with pytest.raises(ValueError, match="valid: forward_kl, reverse_kl, jsd"):
        distillation_loss(s, t, torch.ones(1, 3), "kl")
    with pytest.raises(ValueError, match="one vocabulary"):
        generalized_jsd(torch.zeros(1, 3), TEACHER)
