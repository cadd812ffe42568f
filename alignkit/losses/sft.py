"""Next-token negative log-likelihood on the masked-in tokens."""

from __future__ import annotations

import torch


def sft_loss(logprobs: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_sum = -sum_{b,t} m_{b,t} * log pi(y_{b,t} | y_{b,<t}),  with the token count N = sum m.

    Shapes: logprobs, loss_mask [B, T] -> a scalar. The SUM is returned, not the mean:
    the training loop divides by N counted over every micro-batch of the optimiser
    step (and every process), so gradient accumulation weighs each token equally
    instead of averaging per-micro-batch means. Pretraining is the case m = 1 on
    every real token; SFT has m = 1 on response tokens only.

    metrics: none beyond the loss itself.
    """
    mask = loss_mask.bool()
    loss_sum = -torch.where(mask, logprobs, torch.zeros_like(logprobs)).sum()
    return loss_sum, {}
