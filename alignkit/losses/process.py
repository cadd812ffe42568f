"""Process reward models: a binary cross-entropy per reasoning step, and the first wrong step.

A PRM scores each step k of a solution with p_k = sigmoid(z_k) = P(step k is correct), z_k its
logit read at the step's last token (Lightman et al. 2023; Math-Shepherd, Wang et al. 2024).
Labels are 0/1 from a step checker or soft, in [0, 1], from Monte-Carlo estimates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def step_loss(logits: Tensor, labels: Tensor, threshold: float = 0.5) -> tuple[Tensor, dict[str, Tensor]]:
    """L_k = -[y_k log sigmoid(z_k) + (1 - y_k) log(1 - sigmoid(z_k))]   (binary cross-entropy with logits).

    Shapes: logits, labels [S] (one entry per step; labels 0/1 or soft in [0, 1]). Returns per-step
    losses [S] (the loop sums them and divides by the global step count) and metrics, each a detached
    float tensor [S], on the steps read as correct when y >= threshold and predicted correct when
    sigmoid(z) >= threshold:

        accuracy        1.0 where the prediction matches the label
        incorrect_tp    1.0 where an incorrect step is predicted incorrect (F1 on incorrect steps
        incorrect_fp    ... a correct step predicted incorrect              = 2tp / (2tp + fp + fn))
        incorrect_fn    ... an incorrect step predicted correct
    """
    if logits.shape != labels.shape:
        raise ValueError(f"logits shape {tuple(logits.shape)} != labels shape {tuple(labels.shape)}")
    losses = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none")
    wrong = labels < threshold
    predicted_wrong = torch.sigmoid(logits.detach().float()) < threshold
    metrics = {
        "accuracy": (wrong == predicted_wrong).float(),
        "incorrect_tp": (wrong & predicted_wrong).float(),
        "incorrect_fp": (~wrong & predicted_wrong).float(),
        "incorrect_fn": (wrong & ~predicted_wrong).float(),
    }
    return losses, metrics


def first_error(correct: Tensor, step_mask: Tensor) -> Tensor:
    """f_b = min{k : step k of row b is not correct}, or K_b (the row's step count) when all are.

    Shapes: correct, step_mask [B, T] bool, the steps of each row where step_mask is True, in order
    (columns without a step are ignored). Returns [B] long: the index among the row's steps.
    """
    step_index = step_mask.long().cumsum(-1) - 1  # k at each step's column
    wrong = step_mask & ~correct
    big = torch.full_like(step_index, torch.iinfo(torch.long).max)
    first = torch.where(wrong, step_index, big).amin(-1)
    return torch.where(wrong.any(-1), first, step_mask.sum(-1))
