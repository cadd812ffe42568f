"""Reductions over the masked-in elements of a tensor.

`mask` is bool or 0/1 with the same shape as `x`. Only masked-in elements are
read: results do not depend on padding side, and inf/NaN at masked-out positions
do not leak into values or gradients (they are replaced with torch.where, since
0 * inf is NaN).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check(x: Tensor, mask: Tensor) -> Tensor:
    if mask.shape != x.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != x shape {tuple(x.shape)}")
    return mask.bool()


def masked_sum(x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """sum_i mask_i * x_i over `dim` (all elements when None).

    x, mask: same shape. Returns a scalar, or x's shape without `dim`.
    """
    mask = _check(x, mask)
    x = torch.where(mask, x, 0)
    return x.sum() if dim is None else x.sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """sum_i mask_i * x_i / sum_i mask_i over `dim` (all elements when None).

    x, mask: same shape. Returns a scalar, or x's shape without `dim`.
    Where no element is masked in, the mean is 0 (not NaN).
    """
    mask = _check(x, mask)
    total = masked_sum(x, mask, dim)
    count = mask.sum() if dim is None else mask.sum(dim=dim)
    return total / count.clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance over all masked-in elements.

    var = sum_i mask_i (x_i - mean)^2 / n, times n / (n - 1) when unbiased,
    with n = sum_i mask_i. x, mask: same shape. Returns a scalar.
    Raises ValueError if unbiased and n < 2.
    """
    mask = _check(x, mask)
    x = torch.where(mask, x, 0)  # so masked-out NaN cannot reach the gradient
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = int(mask.sum())  # a CPU-GPU sync point, needed for the check
        if n < 2:
            raise ValueError(
                f"unbiased masked_var needs at least 2 masked-in elements, got {n}"
            )
        var = var * (n / (n - 1))
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps), plus mean again if not shift_mean.

    mean and (unbiased) var over the masked-in elements. x, mask: same shape.
    Returns x's shape, 0 at masked-out positions.
    """
    mask = _check(x, mask)
    x = torch.where(mask, x, 0)
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, 0)
