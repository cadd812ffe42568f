"""Pure loss functions: tensors in, `(loss, metrics)` out, formula in each docstring."""

from alignkit.losses.bradley_terry import bradley_terry_loss, ranking_pairs
from alignkit.losses.kto import kto_default_weights, kto_loss, kto_reference_point
from alignkit.losses.policy import (
    AGGREGATION_LEVELS,
    aggregate,
    clipped_policy_loss,
    clipped_value_loss,
    kl_penalty_loss,
)
from alignkit.losses.preference import PREFERENCE_LOSSES, PairLogps, preference_loss
from alignkit.losses.sft import sft_loss

__all__ = [
    "PREFERENCE_LOSSES",
    "PairLogps",
    "bradley_terry_loss",
    "preference_loss",
    "kto_default_weights",
    "kto_loss",
    "kto_reference_point",
    "ranking_pairs",
    "sft_loss",
    "AGGREGATION_LEVELS",
    "aggregate",
    "clipped_policy_loss",
    "clipped_value_loss",
    "kl_penalty_loss",
]
