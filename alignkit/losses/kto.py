"""Kahneman–Tversky optimisation (Ethayarajh et al. 2024) on unpaired labelled completions.

Each example is one completion with a label: desirable (thumbs up) or
undesirable (thumbs down). With the implied reward r = log pi(y|x) - log pi_ref(y|x)
and a reference point z_ref (a batch estimate of KL(pi || pi_ref), not
back-propagated through), the value of a desirable completion is
sigmoid(beta (r - z_ref)) and of an undesirable one sigmoid(beta (z_ref - r));
the loss is the weighted 1 - value.
"""

from __future__ import annotations

import torch
from torch import Tensor


def kto_reference_point(policy_kl_logps: Tensor, ref_kl_logps: Tensor) -> Tensor:
    """z_ref = max(0, mean_b(log pi(y'_b | x_b) - log pi_ref(y'_b | x_b))), detached.

    The inputs are sequence log-probs [B] of MISMATCHED prompt/completion pairs:
    y'_b is the completion of ANOTHER example in the batch (e.g. shifted by one)
    scored under prompt x_b. Such completions are not what the policy was trained
    towards, so their mean log-ratio estimates KL(pi || pi_ref) without rewarding
    the examples themselves. The mean is over this batch; to use every process's
    batch, gather the inputs first. Returns a detached scalar (0-dim) tensor:
    no gradient flows through the reference point.
    """
    if policy_kl_logps.shape != ref_kl_logps.shape:
        raise ValueError(
            f"policy_kl_logps shape {tuple(policy_kl_logps.shape)} "
            f"!= ref_kl_logps shape {tuple(ref_kl_logps.shape)}"
        )
    return (policy_kl_logps - ref_kl_logps).detach().mean().clamp(min=0)


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    labels: Tensor,
    z_ref: Tensor | float,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """With r_b = policy_logps_b - ref_logps_b:

        L_b = w_D (1 - sigmoid(beta (r_b - z_ref)))   where labels_b (desirable)
        L_b = w_U (1 - sigmoid(beta (z_ref - r_b)))   where not labels_b (undesirable)

    Shapes: policy_logps, ref_logps [B] (sequence log-probs of each example's own
    completion), labels bool [B] (True = desirable), z_ref a scalar (see
    kto_reference_point; detached here too). Returns per-example losses [B] and
    metrics, each a detached float tensor [B] (the loop sums them over examples):

        rewards/desirable     beta r_b where desirable, else 0
        rewards/undesirable   beta r_b where undesirable, else 0
        count/desirable       1.0 where desirable, else 0 (divide the sums by these)
        count/undesirable     1.0 where undesirable, else 0
        kl                    z_ref, repeated for each example
    """
    if not (policy_logps.shape == ref_logps.shape == labels.shape):
        raise ValueError(
            f"policy_logps {tuple(policy_logps.shape)}, ref_logps {tuple(ref_logps.shape)} "
            f"and labels {tuple(labels.shape)} must share one shape [B]"
        )
    labels = labels.bool()
    z = torch.as_tensor(z_ref, dtype=policy_logps.dtype, device=policy_logps.device).detach()
    r = policy_logps - ref_logps
    # 1 - sigmoid(x) = sigmoid(-x), without the cancellation near sigmoid(x) = 1
    desirable = desirable_weight * torch.sigmoid(-beta * (r - z))
    undesirable = undesirable_weight * torch.sigmoid(-beta * (z - r))
    losses = torch.where(labels, desirable, undesirable)

    reward = (beta * r).detach().float()
    zeros = torch.zeros_like(reward)
    metrics = {
        "rewards/desirable": torch.where(labels, reward, zeros),
        "rewards/undesirable": torch.where(labels, zeros, reward),
        "count/desirable": labels.float(),
        "count/undesirable": (~labels).float(),
        "kl": z.float().expand(labels.shape).clone(),
    }
    return losses, metrics


def kto_default_weights(n_desirable: int, n_undesirable: int) -> tuple[float, float]:
    """(w_D, w_U), the default weights for imbalanced desirable/undesirable data.

    The KTO paper recommends keeping w_D n_D / (w_U n_U) in [1, 4/3]. This
    weights the larger class 1.0 and upweights the smaller one so that the
    ratio is exactly 1: 100 desirable vs 400 undesirable -> (4.0, 1.0);
    400 vs 100 -> (1.0, 4.0); balanced data -> (1.0, 1.0).
    Raises ValueError if either count is not positive.
    """
    if n_desirable <= 0 or n_undesirable <= 0:
        raise ValueError(
            "KTO needs examples of both kinds to weigh them; got "
            f"n_desirable={n_desirable}, n_undesirable={n_undesirable}"
        )
    if n_desirable >= n_undesirable:
        return 1.0, n_desirable / n_undesirable
    return n_undesirable / n_desirable, 1.0
