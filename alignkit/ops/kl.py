"""Per-token estimators of KL(pi || pi_ref) from samples y ~ pi.

After John Schulman, "Approximating KL divergence" (2020). With
log_ratio r = logp_ref - logp = log(pi_ref(y) / pi(y)):

    k1 = -r               unbiased, can be negative, high variance
    k2 = r^2 / 2          biased, low variance
    k3 = (e^r - 1) - r    unbiased, always >= 0, low variance (used by GRPO)

All take logp, logp_ref of any (same) shape and return that shape.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def kl_k1(logp: Tensor, logp_ref: Tensor) -> Tensor:
    """k1 = logp - logp_ref. Elementwise; unbiased, can be negative."""
    return logp - logp_ref


def kl_k2(logp: Tensor, logp_ref: Tensor) -> Tensor:
    """k2 = 0.5 * (logp - logp_ref)^2. Elementwise; biased, low variance."""
    return 0.5 * (logp - logp_ref) ** 2


def kl_k3(logp: Tensor, logp_ref: Tensor) -> Tensor:
    """k3 = exp(logp_ref - logp) - 1 - (logp_ref - logp). Elementwise; unbiased, >= 0."""
    r = logp_ref - logp
    return torch.expm1(r) - r  # expm1: exact near r = 0, where most tokens sit


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,
}


def kl_estimator(name: str) -> Callable[[Tensor, Tensor], Tensor]:
    """The estimator registered under `name` ("k1", "k2" or "k3")."""
    try:
        return KL_ESTIMATORS[name]
    except KeyError:
        valid = ", ".join(sorted(KL_ESTIMATORS))
        raise ValueError(f"unknown KL estimator {name!r}; valid names: {valid}") from None
