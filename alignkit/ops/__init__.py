"""Pure tensor functions: token log-probs, entropy, masked reductions, KL estimators.

Nothing here imports the rest of alignkit.
"""

from __future__ import annotations

from .advantages import (
    ADVANTAGE_ESTIMATORS,
    adaptive_kl_beta,
    advantage_estimator,
    explained_variance,
    gae,
    grpo_advantages,
    process_advantages,
    rloo_advantages,
)
from .kl import KL_ESTIMATORS, kl_estimator, kl_k1, kl_k2, kl_k3
from .logprobs import entropy_from_logits, token_logprobs
from .masked import masked_mean, masked_sum, masked_var, masked_whiten

__all__ = [
    "process_advantages",
    "KL_ESTIMATORS",
    "entropy_from_logits",
    "kl_estimator",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "token_logprobs",
    "ADVANTAGE_ESTIMATORS",
    "adaptive_kl_beta",
    "advantage_estimator",
    "explained_variance",
    "gae",
    "grpo_advantages",
    "rloo_advantages",
]
