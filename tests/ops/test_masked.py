from __future__ import annotations

import pytest
import torch

from alignkit.ops import masked_mean, masked_sum, masked_var, masked_whiten

# Two sequences, [1, 2, 3, 4] and [10, 20], padded to length 5 on either side.
# The pad value 1000 is finite so that ignoring the mask gives a different (wrong) answer.
P = 1000.0
RIGHT_X = torch.tensor([[1.0, 2.0, 3.0, 4.0, P], [10.0, 20.0, P, P, P]])
RIGHT_M = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
LEFT_X = torch.tensor([[P, 1.0, 2.0, 3.0, 4.0], [P, P, P, 10.0, 20.0]])
LEFT_M = torch.tensor([[0, 1, 1, 1, 1], [0, 0, 0, 1, 1]])
# Masked-in values: 1, 2, 3, 4, 10, 20. n = 6, sum = 40, mean = 40/6 = 6.6666667.
# Squared deviations from 20/3: (17/3)^2 + (14/3)^2 + (11/3)^2 + (8/3)^2 + (10/3)^2 + (40/3)^2
#   = (289 + 196 + 121 + 64 + 100 + 1600) / 9 = 2370/9 = 263.33333
# biased var = 263.33333 / 6 = 43.888889; unbiased = 263.33333 / 5 = 52.666667


def poison(x, mask):
    """x with inf, -inf and NaN written at masked-out positions."""
    bad = torch.tensor([float("nan"), float("inf"), -float("inf")])
    fill = bad.repeat(x.numel() // 3 + 1)[: x.numel()].view_as(x)
    return torch.where(mask.bool(), x, fill)


def test_masked_sum_hand_values():
    assert masked_sum(RIGHT_X, RIGHT_M).item() == 40.0
    torch.testing.assert_close(masked_sum(RIGHT_X, RIGHT_M, dim=1), torch.tensor([10.0, 30.0]))
    # columns: 1+10, 2+20, 3, 4, 0
    torch.testing.assert_close(
        masked_sum(RIGHT_X, RIGHT_M, dim=0), torch.tensor([11.0, 22.0, 3.0, 4.0, 0.0])
    )


def test_masked_mean_hand_values():
    torch.testing.assert_close(masked_mean(RIGHT_X, RIGHT_M), torch.tensor(40.0 / 6))
    # rows: (1+2+3+4)/4 = 2.5, (10+20)/2 = 15
    torch.testing.assert_close(masked_mean(RIGHT_X, RIGHT_M, dim=1), torch.tensor([2.5, 15.0]))
    torch.testing.assert_close(masked_mean(RIGHT_X, RIGHT_M, dim=-1), torch.tensor([2.5, 15.0]))


def test_masked_mean_empty_row_is_zero():
    x = torch.tensor([[1.0, 3.0], [float("nan"), float("inf")]])
    m = torch.tensor([[1, 1], [0, 0]])
    torch.testing.assert_close(masked_mean(x, m, dim=1), torch.tensor([2.0, 0.0]))


def test_masked_var_hand_values():
    # [1, 2, 3, 4]: mean 2.5, squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5
    # biased 5/4 = 1.25, unbiased 5/3 = 1.6666667
    x = torch.tensor([[P, 1.0, 2.0, 3.0, 4.0, P]])
    m = torch.tensor([[0, 1, 1, 1, 1, 0]])
    torch.testing.assert_close(masked_var(x, m, unbiased=False), torch.tensor(1.25))
    torch.testing.assert_close(masked_var(x, m, unbiased=True), torch.tensor(5.0 / 3))
    torch.testing.assert_close(masked_var(x, m), torch.tensor(5.0 / 3))  # unbiased by default
    torch.testing.assert_close(masked_var(RIGHT_X, RIGHT_M, unbiased=False), torch.tensor(43.888889))
    torch.testing.assert_close(masked_var(RIGHT_X, RIGHT_M), torch.tensor(52.666667))


def test_masked_var_unbiased_needs_two_elements():
    x = torch.tensor([5.0, P, P])
    m = torch.tensor([True, False, False])
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(x, m)
    assert masked_var(x, m, unbiased=False).item() == 0.0


def test_masked_whiten_hand_values():
    # [1, 2, 3, 4]: mean 2.5, unbiased std sqrt(5/3) = 1.2909944
    # (x - 2.5) / 1.2909944 = [-1.1618950, -0.3872983, 0.3872983, 1.1618950]
    x = torch.tensor([[P, 1.0, 2.0, 3.0, 4.0]])
    m = torch.tensor([[0, 1, 1, 1, 1]])
    expected = torch.tensor([[0.0, -1.1618950, -0.3872983, 0.3872983, 1.1618950]])
    torch.testing.assert_close(masked_whiten(x, m), expected)
    torch.testing.assert_close(masked_whiten(x, m, shift_mean=False), (expected + 2.5) * m)


def test_masked_whiten_mean_zero_var_one():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 9, generator=g) * 5 + 3
    m = torch.rand(4, 9, generator=g) > 0.4
    w = masked_whiten(x, m)
    assert (w[~m] == 0).all()
    torch.testing.assert_close(masked_mean(w, m), torch.tensor(0.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(masked_var(w, m), torch.tensor(1.0), atol=1e-5, rtol=0)
    # shift_mean=False keeps the original mean
    w2 = masked_whiten(x, m, shift_mean=False)
    torch.testing.assert_close(masked_mean(w2, m), masked_mean(x, m), atol=1e-5, rtol=0)


def test_left_and_right_padding_agree():
    for dim in (None, 1):
        assert torch.equal(masked_sum(LEFT_X, LEFT_M, dim), masked_sum(RIGHT_X, RIGHT_M, dim))
        assert torch.equal(masked_mean(LEFT_X, LEFT_M, dim), masked_mean(RIGHT_X, RIGHT_M, dim))
    for unbiased in (True, False):
        torch.testing.assert_close(
            masked_var(LEFT_X, LEFT_M, unbiased), masked_var(RIGHT_X, RIGHT_M, unbiased)
        )
    for shift_mean in (True, False):
        left = masked_whiten(LEFT_X, LEFT_M, shift_mean)
        right = masked_whiten(RIGHT_X, RIGHT_M, shift_mean)
        torch.testing.assert_close(left[LEFT_M.bool()], right[RIGHT_M.bool()])


def test_nan_and_inf_at_masked_positions_do_not_leak():
    for x, m in ((RIGHT_X, RIGHT_M), (LEFT_X, LEFT_M)):
        bad = poison(x, m)
        assert not torch.isfinite(bad).all()
        for dim in (None, 1):
            torch.testing.assert_close(masked_sum(bad, m, dim), masked_sum(x, m, dim))
            torch.testing.assert_close(masked_mean(bad, m, dim), masked_mean(x, m, dim))
        torch.testing.assert_close(masked_var(bad, m), masked_var(x, m))
        torch.testing.assert_close(masked_var(bad, m, False), masked_var(x, m, False))
        torch.testing.assert_close(masked_whiten(bad, m), masked_whiten(x, m))
        torch.testing.assert_close(masked_whiten(bad, m, False), masked_whiten(x, m, False))


@pytest.mark.parametrize(
    "fn",
    [masked_sum, masked_mean, masked_var, lambda x, m: masked_whiten(x, m).pow(2).sum()],
    ids=["sum", "mean", "var", "whiten"],
)
def test_gradients_finite_and_zero_at_masked_positions(fn):
    x = poison(RIGHT_X, RIGHT_M).requires_grad_(True)
    fn(x, RIGHT_M).backward()
    assert torch.isfinite(x.grad).all()
    assert (x.grad[~RIGHT_M.bool()] == 0).all()


def test_mask_shape_mismatch_raises():
    with pytest.raises(ValueError, match="mask shape"):
        masked_mean(RIGHT_X, RIGHT_M[:, :-1])
