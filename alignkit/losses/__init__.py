"""Pure loss functions: tensors in, `(loss, metrics)` out, formula in each docstring."""

from alignkit.losses.sft import sft_loss

__all__ = ["sft_loss"]
