"""Direct preference optimisation from sequence log-probs: DPO, conservative DPO, IPO.

All losses take the summed response log-probs [B] of the chosen (y_w) and
rejected (y_l) completions under the policy and the reference, and
work on the difference of log-ratios

    h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l)).

A new variant is a function with the same signature plus an entry in DPO_LOSSES.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor


def _check_shapes(*logps: Tensor) -> None:
    # [B] against [B, 1] would broadcast to [B, B] silently
    shapes = {tuple(x.shape) for x in logps}
    if len(shapes) != 1:
        raise ValueError(f"log-prob tensors must share one shape [B], got {sorted(shapes)}")


def _dpo_metrics(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float,
) -> dict[str, Tensor]:
    """Implicit rewards beta * log(pi / pi_ref) and policy log-probs, each detached [B]."""
    chosen = (beta * (policy_chosen - ref_chosen)).detach().float()
    rejected = (beta * (policy_rejected - ref_rejected)).detach().float()
    return {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margin": chosen - rejected,
        "rewards/accuracy": (chosen > rejected).float(),
        "logps/chosen": policy_chosen.detach().float(),
        "logps/rejected": policy_rejected.detach().float(),
    }


def dpo_sigmoid_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """L_b = -(1 - eps) log sigmoid(beta h_b) - eps log sigmoid(-beta h_b).

    eps = 0 is DPO (Rafailov et al. 2023): the Bradley–Terry loss on the implicit
    rewards beta * log(pi / pi_ref). eps > 0 is conservative DPO (Mitchell 2023):
    each label is taken to be flipped with probability eps, which bounds the
    optimum of h instead of pushing it to infinity. 0 <= eps < 0.5.

    Shapes: the four sequence log-probs [B] (summed over response tokens).
    Returns per-example losses [B] and metrics, each a detached float tensor [B]:
    rewards/chosen = beta (log pi(y_w) - log pi_ref(y_w)), rewards/rejected
    (the same for y_l), rewards/margin (their difference), rewards/accuracy
    (1.0 where rewards/chosen > rewards/rejected), logps/chosen and
    logps/rejected (policy log-probs).
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    _check_shapes(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h)
    if label_smoothing:
        losses = losses - label_smoothing * F.logsigmoid(-beta * h)
    return losses, _dpo_metrics(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)


def ipo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """L_b = (h_b - 1 / (2 beta))^2   (IPO, Azar et al. 2023).

    A squared loss that regresses h onto the finite target 1/(2 beta) instead of
    pushing it to infinity, so it does not overfit deterministic preferences.
    Past the target the gradient changes sign and pulls h back.

    IPO is usually applied to length-normalised log-probs (the MEAN log-prob per
    response token, as in the paper and in TRL), and beta is tuned for that
    scale; this function takes whatever log-probs the caller passes, so the
    caller chooses sum or mean.

    Shapes: the four log-probs [B]. Returns per-example losses [B] and the same
    metrics as dpo_sigmoid_loss, each a detached float tensor [B].
    """
    if beta <= 0:
        raise ValueError(f"IPO needs beta > 0 (its target is 1 / (2 beta)), got {beta}")
    _check_shapes(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    losses = (h - 1.0 / (2.0 * beta)) ** 2
    return losses, _dpo_metrics(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)


DPO_LOSSES: dict[str, Callable[..., tuple[Tensor, dict[str, Tensor]]]] = {
    "sigmoid": dpo_sigmoid_loss,
    "ipo": ipo_loss,
}

# the variants that accept label_smoothing
_SMOOTHABLE = frozenset({"sigmoid"})


def dpo_loss(
    loss_type: str,
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The loss registered in DPO_LOSSES under `loss_type` ("sigmoid" or "ipo").

    Shapes and returns as in that function: losses [B], metrics {name: [B]}.
    Raises ValueError for an unknown loss_type (listing the valid ones) and for
    label_smoothing != 0 with a loss that has no label smoothing (ipo).
    """
    try:
        fn = DPO_LOSSES[loss_type]
    except KeyError:
        valid = ", ".join(sorted(DPO_LOSSES))
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; valid names: {valid}") from None
    args = (policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    if label_smoothing == 0.0:
        return fn(*args)
    if loss_type not in _SMOOTHABLE:
        valid = ", ".join(sorted(_SMOOTHABLE))
        raise ValueError(
            f"label_smoothing={label_smoothing} is not supported by loss_type {loss_type!r}; "
            f"only by: {valid}"
        )
    return fn(*args, label_smoothing=label_smoothing)
