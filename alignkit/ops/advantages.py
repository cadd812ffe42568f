"""Advantage estimators: GAE for a critic, group baselines (GRPO, RLOO) without one.

Token tensors are [B, T] with a 0/1 (or bool) mask; sequence rewards are [B].
Grouped estimators take rows grouped consecutively: rows 0..G-1 are the G
completions of prompt 0, rows G..2G-1 those of prompt 1, and so on. Only
masked-in / valid entries are read, so NaN or inf elsewhere cannot leak.

A new group estimator is a function `f(rewards, group_size, valid=None) -> [B]`
plus an entry in ADVANTAGE_ESTIMATORS.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), per token.

        delta_t = r_t + gamma V_{t+1} - V_t
        A_t     = delta_t + gamma lam A_{t+1}
        R_t     = A_t + V_t               (the critic's regression target)

    with V_{t+1} = A_{t+1} = 0 after a row's last masked-in token, so rows whose
    masked-in span ends at different positions (right padding) are each handled
    as if alone. Masked-out positions are skipped: "t+1" is the next masked-in
    token of the row (so left padding or a masked-out hole is passed through).

    Shapes: rewards, values, mask [B, T]. Returns (advantages, returns), each
    [B, T], 0 at masked-out positions. Computed without gradient (values are a
    target here, not a prediction): both outputs are detached.
    """
    if not (rewards.shape == values.shape == mask.shape) or rewards.dim() != 2:
        raise ValueError(
            "rewards, values and mask must share one shape [B, T], got "
            f"{tuple(rewards.shape)}, {tuple(values.shape)}, {tuple(mask.shape)}"
        )
    mask = mask.bool()
    with torch.no_grad():  # a masked-out position's garbage only ever meets torch.where below
        advantages = torch.zeros_like(values)
        next_value = torch.zeros_like(values[:, 0])
        next_adv = torch.zeros_like(values[:, 0])
        for t in reversed(range(values.shape[1])):  # T steps, each vectorised over B
            m = mask[:, t]
            delta = rewards[:, t] + gamma * next_value - values[:, t]
            adv = delta + gamma * lam * next_adv
            advantages[:, t] = torch.where(m, adv, 0)
            # a masked-out position carries the later token's state through unchanged
            next_value = torch.where(m, values[:, t], next_value)
            next_adv = torch.where(m, adv, next_adv)
        returns = torch.where(mask, advantages + values, 0)
    return advantages, returns


def _grouped(rewards: Tensor, group_size: int, valid: Tensor | None) -> tuple[Tensor, Tensor]:
    """rewards [B] and validity [B] as [B / G, G], with invalid rewards replaced by 0."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be [B], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.shape[0] % group_size:
        raise ValueError(
            f"batch of {rewards.shape[0]} rows does not split into groups of {group_size}"
        )
    if valid is None:
        valid = torch.ones_like(rewards, dtype=torch.bool)
    elif valid.shape != rewards.shape:
        raise ValueError(f"valid shape {tuple(valid.shape)} != rewards shape {tuple(rewards.shape)}")
    if not rewards.is_floating_point():
        rewards = rewards.to(torch.get_default_dtype())
    valid = valid.bool().view(-1, group_size)
    r = torch.where(valid, rewards.view(-1, group_size), 0)  # a failed reward may be NaN
    return r, valid


def grpo_advantages(
    rewards: Tensor,
    group_size: int,
    scale_by_std: bool = True,
    eps: float = 1e-6,
    valid: Tensor | None = None,
) -> Tensor:
    """A_i = (r_i - mean_g) / (std_g + eps)   (GRPO, Shao et al. 2024), or
    A_i =  r_i - mean_g                       when not scale_by_std (Dr. GRPO, Liu et al. 2025),

    where mean_g and std_g are over the valid rows of row i's group, std with
    Bessel's correction (n - 1, as torch.std). A group with all rewards equal
    gives 0. Invalid rows (valid False, e.g. a reward that failed) are left out
    of their group's statistics and get advantage 0; so does every row of a group
    with fewer than 2 valid rows. Never NaN.

    Shapes: rewards [B] (B a multiple of group_size, groups consecutive),
    valid bool [B] or None (all valid). Returns [B].
    """
    r, v = _grouped(rewards, group_size, valid)
    n = v.sum(dim=1, keepdim=True)
    mean = r.sum(dim=1, keepdim=True) / n.clamp(min=1)
    centred = torch.where(v, r - mean, 0)
    if not scale_by_std:
        return centred.view(-1)
    # a group's single valid row equals its mean, so centred is already 0 there
    var = (centred**2).sum(dim=1, keepdim=True) / (n - 1).clamp(min=1)
    return (centred / (var.sqrt() + eps)).view(-1)


def rloo_advantages(rewards: Tensor, group_size: int, scale_by_std: bool = False, eps: float = 1e-6,
                    valid: Tensor | None = None) -> Tensor:
    """A_i = r_i - (1 / (n - 1)) sum_{j != i} r_j   (REINFORCE leave-one-out,
    Kool et al. 2019; Ahmadian et al. 2024), sums over the valid rows j of
    row i's group, n their number. Equal to n / (n - 1) (r_i - mean_g).
    With scale_by_std, A_i / (std_g + eps), std_g as in `grpo_advantages`.

    The baseline of each row excludes its own reward, so the estimate stays
    unbiased. Invalid rows get 0 and are left out of the others' baselines;
    a group with fewer than 2 valid rows gives 0 for every row. Never NaN.

    Shapes: rewards [B] (B a multiple of group_size, groups consecutive),
    valid bool [B] or None (all valid). Returns [B].
    """
    r, v = _grouped(rewards, group_size, valid)
    n = v.sum(dim=1, keepdim=True)
    baseline = (r.sum(dim=1, keepdim=True) - r) / (n - 1).clamp(min=1)
    adv = torch.where(v & (n >= 2), r - baseline, 0)
    if scale_by_std:
        mean = r.sum(dim=1, keepdim=True) / n.clamp(min=1)
        var = (torch.where(v, r - mean, 0) ** 2).sum(dim=1, keepdim=True) / (n - 1).clamp(min=1)
        adv = adv / (var.sqrt() + eps)
    return adv.view(-1)


def process_advantages(step_rewards: Tensor, step_mask: Tensor, group_size: int, scale_by_std: bool = True,
                       eps: float = 1e-6) -> Tensor:
    """Process supervision's advantages (DeepSeekMath, Shao et al. 2024, §4.1.3), per token:

        r~_k = (r_k - mean_g) / (std_g + eps)      over every step k of every completion in the group
        A_t  = sum_{k : end(k) >= t} r~_k          the normalised rewards of the steps at or after token t

    (r_k - mean_g when not scale_by_std; std with Bessel's correction, as `grpo_advantages`). A token's
    advantage counts the step it belongs to and every later one: dense credit where the outcome
    reward gives every token the same advantage. A group with fewer than 2 steps gives 0.

    Shapes: step_rewards [B, T], the reward of step k at its last token's column (read where step_mask
    is set; anything elsewhere is ignored); step_mask [B, T] bool; rows grouped consecutively by
    group_size. Returns [B, T] (0 after each row's last step).
    """
    if step_rewards.shape != step_mask.shape or step_rewards.dim() != 2:
        raise ValueError(f"step_rewards {tuple(step_rewards.shape)} and step_mask {tuple(step_mask.shape)} must "
                         "share one shape [B, T]")
    if group_size < 1 or step_rewards.shape[0] % group_size:
        raise ValueError(f"batch of {step_rewards.shape[0]} rows does not split into groups of {group_size}")
    mask = step_mask.bool().view(-1, group_size * step_mask.shape[1])
    r = torch.where(mask, step_rewards.float().view_as(mask), 0)
    n = mask.sum(-1, keepdim=True)
    mean = r.sum(-1, keepdim=True) / n.clamp(min=1)
    centred = torch.where(mask & (n >= 2), r - mean, 0)
    if scale_by_std:
        std = ((centred ** 2).sum(-1, keepdim=True) / (n - 1).clamp(min=1)).sqrt()
        centred = centred / (std + eps)
    normalised = centred.view_as(step_rewards)
    return normalised.flip(-1).cumsum(-1).flip(-1)  # reversed cumulative sum: steps at or after t


ADVANTAGE_ESTIMATORS: dict[str, Callable[..., Tensor]] = {
    "grpo": grpo_advantages,
    "rloo": rloo_advantages,
}


def advantage_estimator(name: str) -> Callable[..., Tensor]:
    """The group estimator registered under `name` ("grpo" or "rloo").

    Each is called as f(rewards [B], group_size, scale_by_std, valid=None) -> [B].
    """
    try:
        return ADVANTAGE_ESTIMATORS[name]
    except KeyError:
        valid = ", ".join(sorted(ADVANTAGE_ESTIMATORS))
        raise ValueError(f"unknown advantage estimator {name!r}; valid names: {valid}") from None


def adaptive_kl_beta(
    beta: float, observed_kl: float | Tensor, target_kl: float, horizon: float, n_steps: int
) -> float:
    """The next KL coefficient of the adaptive controller (Ziegler et al. 2019):

        error = clip(observed_kl / target_kl - 1, -0.2, 0.2)
        beta' = beta * (1 + error * n_steps / horizon)

    beta rises while the policy drifts further than target_kl from the reference
    and falls while it stays closer; the clip bounds each step's change.
    observed_kl: the KL measured over the last n_steps samples (a float or a
    0-dim tensor, in the same unit as target_kl, e.g. nats per completion).
    The caller keeps beta between steps (the controller's only state).
    """
    if target_kl <= 0 or horizon <= 0:
        raise ValueError(f"target_kl and horizon must be > 0, got {target_kl} and {horizon}")
    error = min(max(float(observed_kl) / target_kl - 1.0, -0.2), 0.2)
    return beta * (1.0 + error * n_steps / horizon)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """1 - Var[R - V] / Var[R] over the masked tokens (population variances): 1 is a perfect
    critic, 0 one no better than a constant, negative one worse than a constant."""
    from .masked import masked_var

    var_r = masked_var(returns, mask, unbiased=False)
    return float(1 - masked_var(returns - values, mask, unbiased=False) / var_r.clamp(min=1e-8))
