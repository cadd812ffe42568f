"""Bradley–Terry preference loss for reward models, and the pairs a ranking gives.

P(y_w > y_l) = sigmoid(r(x, y_w) - r(x, y_l)); the reward model maximises the
log-likelihood of the observed preferences. K responses ranked best first give
all K(K-1)/2 pairs (i better than j for i < j), as in InstructGPT.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def bradley_terry_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    margin: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """L_b = -log sigmoid(r_w,b - r_l,b - m_b)   (m = 0 when margin is None).

    Shapes: chosen_rewards, rejected_rewards [B]; margin [B], a float or None.
    Returns per-example losses [B] (the training loop sums them and divides by
    the global pair count) and metrics, each a detached float tensor [B]:

        accuracy   1.0 where r_w > r_l, else 0.0 (ties count as wrong)
        margin     r_w - r_l (the margin argument is not subtracted)

    A margin (e.g. from Llama 2's graded preferences) asks the reward model to
    separate the pair by at least m before the loss flattens out.
    """
    if chosen_rewards.shape != rejected_rewards.shape:
        raise ValueError(
            f"chosen_rewards shape {tuple(chosen_rewards.shape)} "
            f"!= rejected_rewards shape {tuple(rejected_rewards.shape)}"
        )
    diff = chosen_rewards - rejected_rewards
    logits = diff if margin is None else diff - margin
    losses = -F.logsigmoid(logits)
    diff = diff.detach()
    metrics = {
        "accuracy": (diff > 0).float(),
        "margin": diff.float(),
    }
    return losses, metrics


def ranking_pairs(k: int) -> tuple[Tensor, Tensor]:
    """Index pairs (i, j), i < j, for K responses ranked best first: i is the better one.

    Returns two LongTensors [K(K-1)/2] in lexicographic order
    ((0,1), (0,2), ..., (0,K-1), (1,2), ..., (K-2,K-1)); empty when K < 2.
    Use as bradley_terry_loss(rewards[..., i], rewards[..., j]).
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    # triu_indices walks the upper triangle row by row: exactly lexicographic order
    i, j = torch.triu_indices(k, k, offset=1)
    return i, j
