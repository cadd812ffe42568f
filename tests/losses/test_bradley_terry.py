from __future__ import annotations

import pytest
import torch

from alignkit.losses import bradley_terry_loss, ranking_pairs

# r_w - r_l = 2 - 1 = 1 and 0 - 1 = -1
CHOSEN = torch.tensor([2.0, 0.0])
REJECTED = torch.tensor([1.0, 1.0])


def test_loss_without_margin():
    losses, _ = bradley_terry_loss(CHOSEN, REJECTED)
    # -log sigmoid(1) = log(1 + e^-1) = 0.3132617;  -log sigmoid(-1) = log(1 + e) = 1.3132617
    torch.testing.assert_close(losses, torch.tensor([0.3132617, 1.3132617]))


def test_loss_with_float_margin():
    losses, _ = bradley_terry_loss(CHOSEN, REJECTED, margin=0.5)
    # -log sigmoid(1 - 0.5) = log(1 + e^-0.5) = 0.4740770
    # -log sigmoid(-1 - 0.5) = log(1 + e^1.5) = 1.7014133
    torch.testing.assert_close(losses, torch.tensor([0.4740770, 1.7014133]))


def test_loss_with_per_example_margin():
    losses, metrics = bradley_terry_loss(CHOSEN, REJECTED, margin=torch.tensor([1.0, -1.0]))
    # 1 - 1 = 0 and -1 - (-1) = 0: -log sigmoid(0) = log 2 = 0.6931472 for both
    torch.testing.assert_close(losses, torch.tensor([0.6931472, 0.6931472]))
    # the margin metric is r_w - r_l, not shifted by the margin argument
    torch.testing.assert_close(metrics["margin"], torch.tensor([1.0, -1.0]))


def test_metrics_accuracy_and_margin():
    chosen = torch.tensor([2.0, 0.0, 3.0], requires_grad=True)
    rejected = torch.tensor([1.0, 1.0, 3.0])
    losses, metrics = bradley_terry_loss(chosen, rejected)
    assert losses.shape == (3,)
    # 2 > 1 right, 0 < 1 wrong, 3 == 3 a tie counts as wrong
    torch.testing.assert_close(metrics["accuracy"], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(metrics["margin"], torch.tensor([1.0, -1.0, 0.0]))
    for value in metrics.values():
        assert value.shape == (3,) and not value.requires_grad


def test_gradient_raises_chosen_and_lowers_rejected():
    chosen = torch.tensor([0.3], requires_grad=True)
    rejected = torch.tensor([0.1], requires_grad=True)
    losses, _ = bradley_terry_loss(chosen, rejected)
    losses.sum().backward()
    # dL/dr_w = -sigmoid(-(0.3 - 0.1)) = -sigmoid(-0.2) = -0.4501660; dL/dr_l = +0.4501660
    torch.testing.assert_close(chosen.grad, torch.tensor([-0.4501660]))
    torch.testing.assert_close(rejected.grad, torch.tensor([0.4501660]))


def test_ranking_pairs_three():
    i, j = ranking_pairs(3)
    assert i.dtype == j.dtype == torch.long
    assert list(zip(i.tolist(), j.tolist())) == [(0, 1), (0, 2), (1, 2)]


def test_ranking_pairs_count_and_order():
    i, j = ranking_pairs(5)
    pairs = list(zip(i.tolist(), j.tolist()))
    assert len(pairs) == 10  # K(K-1)/2 = 5 * 4 / 2
    assert pairs == sorted(pairs) and all(a < b for a, b in pairs)
    assert len(set(pairs)) == 10
    assert ranking_pairs(1)[0].numel() == 0


def test_mismatched_shapes_raise():
    with pytest.raises(ValueError, match="shape"):
        bradley_terry_loss(torch.zeros(2), torch.zeros(2, 1))
