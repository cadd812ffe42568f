"""Policy-gradient losses per token (PPO, GRPO, DAPO) and the one reduction they share.

Every function here returns PER-TOKEN terms [B, T], 0 at masked-out positions;
the trainer reduces them with `aggregate`, which returns a sum and a count
separately so that gradient accumulation and data parallelism stay exact:

    num, den = aggregate(loss, mask, level)      # per micro-batch
    total_den = sum of den over the step's micro-batches (all-reduced over processes)
    (num / total_den).backward()                 # times the process count under DDP,
                                                 # which averages gradients

Masked-out positions are never read (torch.where, not multiplication by the
mask), so NaN or inf there cannot reach values or gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor

AGGREGATION_LEVELS = ("token", "sequence", "bnpo", "dr_grpo")
# TRL's loss_type names for the same reductions
AGGREGATION_ALIASES = {"dapo": "token", "grpo": "sequence"}


def _check(mask: Tensor, *xs: Tensor) -> Tensor:
    for x in xs:
        if x.shape != mask.shape or x.dim() != 2:
            raise ValueError(f"expected [B, T] tensors of mask shape {tuple(mask.shape)}, got {tuple(x.shape)}")
    return mask.bool()


def aggregate(loss: Tensor, mask: Tensor, level: str, max_tokens: int | None = None) -> tuple[Tensor, Tensor]:
    """Reduce per-token losses [B, T] to (numerator, denominator), two scalars.

        "token" (dapo):    num = sum_{b,t} m_bt l_bt                     den = sum_{b,t} m_bt
        "sequence" (grpo): num = sum_b (sum_t m_bt l_bt / sum_t m_bt)    den = #{b : sum_t m_bt > 0}
        "bnpo":            num = sum_{b,t} m_bt l_bt / sum_{b,t} m_bt    den = 1
        "dr_grpo":         num = sum_{b,t} m_bt l_bt                     den = B * max_tokens

    The loss is num / den. "token" weighs every token of the step equally (DAPO);
    "sequence" takes each sequence's mean and weighs sequences equally (the GRPO
    paper), so a token of a short sequence weighs more than one of a long
    sequence (the length bias that Dr. GRPO removes). "bnpo" is the token mean
    of each micro-batch, then the mean over micro-batches (TRL's bnpo: it depends
    on how the step is split). "dr_grpo" divides by a constant, every completion
    counted at the longest allowed length `max_tokens` (Dr. GRPO, Liu et al. 2025).
    Rows with no masked-in token count for nothing in "token" and "sequence".

    The SUM and the COUNT are returned separately so that the trainer divides
    the numerators of all micro-batches (and processes) of an optimiser step by
    their denominators' total: the result is then exactly the loss of the whole
    batch at once, whatever the split. (Averaging per-micro-batch means is not:
    it over-weighs tokens of micro-batches with fewer tokens.)

    Shapes: loss, mask [B, T]. Returns num (differentiable, loss's dtype) and den
    (a detached float tensor, at least float32). Raises ValueError for a level
    not in AGGREGATION_LEVELS.
    """
    level = AGGREGATION_ALIASES.get(level, level)
    mask = _check(mask, loss)
    count_dtype = torch.promote_types(loss.dtype, torch.float32)
    row_sum = torch.where(mask, loss, 0).sum(dim=1)
    den = torch.tensor(aggregation_units(mask, level, max_tokens), dtype=count_dtype, device=loss.device)
    if level == "sequence":
        row_mean = row_sum / mask.sum(dim=1).clamp(min=1).to(row_sum.dtype)
        return row_mean.sum(), den
    if level == "bnpo":
        return row_sum.sum() / mask.sum().clamp(min=1), den
    return row_sum.sum(), den


def aggregation_units(mask: Tensor, level: str, max_tokens: int | None = None) -> float:
    """`aggregate`'s denominator for a completion mask [B, T]: the loss units a micro-batch holds
    (the training loop's count, summed over the micro-batches and processes of a step)."""
    level = AGGREGATION_ALIASES.get(level, level)
    if level not in AGGREGATION_LEVELS:
        valid = ", ".join((*AGGREGATION_LEVELS, *AGGREGATION_ALIASES))
        raise ValueError(f"unknown aggregation level {level!r}; valid levels: {valid}")
    if level == "token":
        return float(mask.sum())
    if level == "sequence":
        return float((mask.sum(dim=1) > 0).sum())
    if level == "bnpo":
        return 1.0
    if not max_tokens:
        raise ValueError("dr_grpo divides by B * max_tokens: give max_tokens (the longest completion allowed)")
    return float(mask.shape[0] * max_tokens)


def sequence_level_logprobs(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Per-token log-probs whose ratio to old_logprobs is the sequence's (GSPO, Zheng et al. 2025):

        logp'_t = logp_old_t + (1/|y|) sum_s m_s (logp_s - logp_old_s)

    so clipped_policy_loss(logp', logp_old, ...) sees, at every token of a sequence, the
    importance ratio s = (pi(y) / pi_old(y))^(1/|y|) (the length-normalised sequence ratio),
    and clips whole sequences. The gradient flows through the mean into every token's
    log-prob. Shapes: [B, T] each; masked-out positions are returned as old_logprobs."""
    mask = _check(mask, logprobs, old_logprobs)
    diff = torch.where(mask, logprobs - old_logprobs.detach(), 0)
    mean = diff.sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1)
    return torch.where(mask, old_logprobs.detach() + mean, old_logprobs.detach())


def clipped_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate (Schulman et al. 2017), per token, negated to a loss:

        ratio = exp(logp - logp_old)
        l_t   = max(-A ratio, -A clip(ratio, 1 - eps_low, 1 + eps_high))

    eps_low = clip_eps; eps_high = clip_eps_high, or clip_eps when None (a
    larger eps_high is DAPO's clip-higher, Yu et al. 2025, which leaves
    low-probability tokens room to rise). The max is the pessimistic bound: the
    clipped branch is taken only where it is the larger loss, i.e. where the
    ratio has already moved past the clip range in the direction A favours,
    and there the gradient is 0.

    Shapes: logprobs, old_logprobs, mask [B, T]; advantages [B, T], or [B]
    (one per sequence, as GRPO / RLOO give), broadcast over tokens. old_logprobs
    and advantages are treated as constants. Returns per-token losses [B, T]
    (0 at masked-out positions) and metrics, each detached float [B, T], 0 at
    masked-out positions:

        clipfrac    1.0 where the clipped branch is active (clipped term > unclipped)
        ratio       pi / pi_old
        approx_kl   0.5 (logp - logp_old)^2  (k2, an estimate of KL(pi_old || pi))
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1).expand_as(logprobs)
    mask = _check(mask, logprobs, old_logprobs, advantages)
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    advantages = torch.where(mask, advantages.detach(), 0)
    log_ratio = torch.where(mask, logprobs - old_logprobs.detach(), 0)  # exp(garbage) could overflow
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + eps_high)
    loss = torch.where(mask, torch.maximum(unclipped, clipped), 0)
    metrics = {
        "clipfrac": (mask & (clipped > unclipped)).float(),
        "ratio": torch.where(mask, ratio.detach(), 0).float(),
        "approx_kl": (0.5 * log_ratio.detach() ** 2).float(),
    }
    return loss, metrics


def kl_penalty_loss(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) for the loss, from `alignkit.ops.kl`:

        k3: kl_t = exp(r) - r - 1, r = logp_ref - logp   (>= 0, unbiased; Schulman 2020; GRPO's)
        k2: kl_t = r^2 / 2                               (biased, low variance)

    GRPO adds beta * kl_t to clipped_policy_loss's per-token loss. Gradient flows
    through logprobs only (ref_logprobs are constants). k1 (= -r) is refused here: its
    expected gradient on samples from pi is E[grad log pi] = 0, so as a loss it does
    nothing; k1 belongs in the reward (`kl_in_reward`).
    Shapes: logprobs, ref_logprobs, mask [B, T]. Returns [B, T], 0 where masked out.
    """
    from alignkit.ops.kl import kl_estimator

    if estimator == "k1":
        raise ValueError("kl estimator k1 in the loss has zero expected gradient; use k2 or k3, or put k1 in the reward")
    mask = _check(mask, logprobs, ref_logprobs)
    # masked positions get logp = logp_ref, where every estimator is exactly 0
    ref = ref_logprobs.detach()
    return kl_estimator(estimator)(torch.where(mask, logprobs, ref), ref)


def clipped_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    clip_eps: float = 0.2,
    *,
    mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped value loss, per token:

        v_clip = clip(v, v_old - eps, v_old + eps)
        l_t    = 0.5 max((v - R)^2, (v_clip - R)^2)

    The value prediction may not gain from moving further than eps from the
    value at rollout time (old_values, as in the PPO2 baselines).

    Shapes: values, old_values, returns [B, T]; mask [B, T] or None (every token
    counts). old_values and returns are constants. Returns per-token losses
    [B, T] (0 where masked out) and metrics: vf_clipfrac, detached float [B, T],
    1.0 where the clipped term is the larger (0 where masked out).
    """
    if mask is None:
        mask = torch.ones_like(values, dtype=torch.bool)
    mask = _check(mask, values, old_values, returns)
    old_values = torch.where(mask, old_values.detach(), 0)
    returns = torch.where(mask, returns.detach(), 0)
    values = torch.where(mask, values, 0)
    v_clip = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    unclipped = (values - returns) ** 2
    clipped = (v_clip - returns) ** 2
    loss = torch.where(mask, 0.5 * torch.maximum(unclipped, clipped), 0)
    return loss, {"vf_clipfrac": (mask & (clipped > unclipped)).float()}
