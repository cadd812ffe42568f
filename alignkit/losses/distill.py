"""Token-level divergences between a student's and a teacher's next-token distributions (distillation).

With s = log p_student(. | x_<t) and t = log p_teacher(. | x_<t) over the vocabulary at each position,

    forward KL   KL(teacher || student) = sum_v p_t (t - s)           (mode-covering; classic KD)
    reverse KL   KL(student || teacher) = sum_v p_s (s - t)           (mode-seeking; MiniLLM)
    JSD(beta)    beta KL(teacher || m) + (1 - beta) KL(student || m), m = beta p_t + (1 - beta) p_s

the generalised Jensen-Shannon divergence of GKD (Agarwal et al. 2024), as TRL's GKD computes it:
beta -> 0 tends to forward KL / beta and beta -> 1 to reverse KL / (1 - beta) (both vanish at the
ends; `generalized_jsd` takes beta = 0 and 1 to mean forward and reverse KL themselves, as TRL).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def generalized_jsd(student_logits: Tensor, teacher_logits: Tensor, beta: float = 0.5,
                    temperature: float = 1.0) -> Tensor:
    """Per-position divergence [..., V] x [..., V] -> [...], in nats (formulas in the module docstring):
    beta = 0: KL(teacher || student); beta = 1: KL(student || teacher); else JSD(beta). Both logits are
    divided by `temperature` first. Gradient flows into the student only (the teacher is a constant)."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta must be in [0, 1], got {beta}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student and teacher logits differ in shape: {tuple(student_logits.shape)} vs "
                         f"{tuple(teacher_logits.shape)} (the two models need one vocabulary)")
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    if beta == 0.0:
        return (t.exp() * (t - s)).sum(-1)
    if beta == 1.0:
        return (s.exp() * (s - t)).sum(-1)
    m = torch.logsumexp(torch.stack([s + math.log(1 - beta), t + math.log(beta)]), dim=0)
    return beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, divergence: str = "jsd",
                      beta: float = 0.5, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Sum over masked-in positions of the chosen divergence ("forward_kl", "reverse_kl", or "jsd" with
    `beta`), and the token count: logits [B, T, V], mask [B, T] -> (sum, count). The loss is sum / count
    over a step's micro-batches (the training loop divides by the step's total)."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; valid: {', '.join(DIVERGENCES)}")
    b = {"forward_kl": 0.0, "reverse_kl": 1.0}.get(divergence, beta)
    per_token = generalized_jsd(student_logits, teacher_logits, b, temperature)
    keep = mask.bool()
    return torch.where(keep, per_token, 0).sum(), keep.sum()
