"""The preference-loss family against hand-computed values (alignkit/losses/preference.py)."""

from __future__ import annotations

import pytest
import torch

from alignkit.losses import PREFERENCE_LOSSES, PairLogps, bradley_terry_loss, preference_loss
from alignkit.losses.preference import needs_reference

# Two pairs, beta 0.1.
#   policy log pi(y_w) = [-5, -8], log pi(y_l) = [-7, -6]; reference [-6, -7], [-6, -6]
#   a = log-ratio of chosen = [1, -1], b = of rejected = [-1, 0], h = a - b = [2, -1]
#   response tokens |y_w| = [2, 4], |y_l| = [1, 2]: per-token log pi(y_w) = [-2.5, -2], log pi(y_l) = [-7, -3]
BETA = 0.1


def pairs(requires_grad: bool = False, reference: bool = True) -> PairLogps:
    return PairLogps(torch.tensor([-5.0, -8.0], requires_grad=requires_grad),
                     torch.tensor([-7.0, -6.0], requires_grad=requires_grad),
                     torch.tensor([2.0, 4.0]), torch.tensor([1.0, 2.0]),
                     torch.tensor([-6.0, -7.0]) if reference else None,
                     torch.tensor([-6.0, -6.0]) if reference else None)


# log sigmoid(z) = -log(1 + e^-z) below; each value worked from the formula in the loss's docstring
HAND = {
    # -log sigmoid(beta h): log(1 + e^-0.2) = 0.5981389, log(1 + e^0.1) = 0.7443967
    ("sigmoid", ()): [0.5981389, 0.7443967],
    # max(0, 1 - beta h) = 1 - 0.2, 1 + 0.1
    ("hinge", ()): [0.8, 1.1],
    # h_bar = a/|y_w| - b/|y_l| = 1/2 + 1 = 1.5, -1/4 - 0 = -0.25; (h_bar - 5)^2 = 12.25, 27.5625
    ("ipo", ()): [12.25, 27.5625],
    # -log sigmoid(0.1 h_bar) = log(1 + e^-0.15) = 0.6209570, log(1 + e^0.025) = 0.7057253
    ("sigmoid_norm", ()): [0.620957, 0.7057253],
    # eps 1e-3: s(0.2) (log s(0.2) - log 0.999) + s(-0.2) (log s(-0.2) - log 0.001), s = sigmoid
    ("exo_pair", ()): [2.4220146, 2.9350043],
    # -log s(0.1 a) - 0.5 log s(-0.1 a) - 0.5 log s(-0.1 b)
    ("nca_pair", ()): [1.3387933, 1.4131686],
    # eps 0.1: (0.9 log(1 + e^-0.2) - 0.1 log(1 + e^0.2)) / 0.8 = (0.5383250 - 0.0798139) / 0.8
    ("robust", (("label_smoothing", 0.1),)): [0.5731389, 0.7568967],
    # delta 0.05: -log s(0.1 a - 0.05) - log s(-(0.1 b - 0.05)): log(1 + e^-0.05) + log(1 + e^-0.15), ...
    ("bco_pair", (("bco_delta", 0.05),)): [1.2894167, 1.4394167],
    # (a - 5)^2 + (b + 5)^2 = 16 + 16, 36 + 25
    ("sppo_hard", ()): [32.0, 61.0],
    # policy margins [2, -2] sorted [-2, 2], reference [0, -1] sorted [-1, 0]: delta [-1, 2]
    ("aot", ()): [0.7443967, 0.5981389],
    # a sorted [-1, 1], b sorted [-1, 0]: delta [0, 1]; log 2, log(1 + e^-0.1)
    ("aot_unpaired", ()): [0.6931472, 0.6443967],
    # (1 - s(0.1 a)) + s(0.1 b) = (1 - 0.5249792) + 0.4750208, (1 - 0.4750208) + 0.5
    ("apo_zero", ()): [0.9500416, 1.0249792],
    # s(0.1 a) + (1 - s(0.1 h)) = 0.5249792 + 0.4501660, 0.4750208 + 0.5249792
    ("apo_down", ()): [0.9751452, 1.0],
    # z = 0.1 h, m = s(z / 0.05) = s(4), s(-2); (1 - m) log(1 + e^-z) + m e^-z
    ("discopop", ()): [0.8147631, 0.787402],
    # -log s(0.1 (-2.5 + 7) - 0.5) = log(1 + e^0.05), -log s(0.1 (-2 + 3) - 0.5) = log(1 + e^0.4)
    ("simpo", ()): [0.7184596, 0.9130153],
    # -log s(0.1 (log pi(y_w) - log pi(y_l))) + 1.0 * per-token NLL(y_w) = 0.5981389 + 2.5, 0.7981389 + 2
    ("cpo", ()): [3.0981389, 2.7981389],
    # NLL(y_w) - 0.1 log s(log odds(-2.5) - log odds(-7)), log odds(m) = m - log(1 - e^m)
    ("orpo", ()): [2.5010155, 2.0288751],
    # per-token NLL of the chosen
    ("sft", ()): [2.5, 2.0],
}


@pytest.mark.parametrize(("name", "options"), list(HAND))
def test_hand_values(name, options):
    reference = PREFERENCE_LOSSES[name].reference
    losses, _ = preference_loss([name], pairs(reference=reference), BETA, **dict(options))
    torch.testing.assert_close(losses, torch.tensor(HAND[(name, options)]))


def test_every_registered_loss_has_a_hand_value():
    assert {name for name, _ in HAND} == set(PREFERENCE_LOSSES)


def test_label_smoothing_conservative_dpo():
    losses, _ = preference_loss(["sigmoid"], pairs(), BETA, label_smoothing=0.1)
    # 0.9 log(1 + e^-0.2) + 0.1 log(1 + e^0.2) = 0.9 * 0.5981389 + 0.1 * 0.7981389 = 0.6181389
    torch.testing.assert_close(losses, torch.tensor([0.6181389, 0.7343967]))


def test_mixture_and_rpo():
    # 1.0 sigmoid + 0.5 hinge + rpo_alpha 0.2 * per-token NLL(y_w) [2.5, 2]
    losses, metrics = preference_loss(["sigmoid", "hinge"], pairs(), BETA, weights=[1.0, 0.5], rpo_alpha=0.2)
    torch.testing.assert_close(losses, torch.tensor([0.5981389 + 0.4 + 0.5, 0.7443967 + 0.55 + 0.4]))
    torch.testing.assert_close(metrics["loss/hinge"], torch.tensor([0.8, 1.1]))


def test_metrics_are_the_implicit_rewards():
    _, metrics = preference_loss(["sigmoid"], pairs(requires_grad=True), BETA)
    expected = {"rewards/chosen": [0.1, -0.1], "rewards/rejected": [-0.1, 0.0], "rewards/margin": [0.2, -0.1],
                "rewards/accuracy": [1.0, 0.0], "logps/chosen": [-5.0, -8.0], "logps/rejected": [-7.0, -6.0]}
    assert set(metrics) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(metrics[name], torch.tensor(value), msg=name)
        assert not metrics[name].requires_grad
    _, free = preference_loss(["simpo"], pairs(reference=False), BETA)  # no reference: beta log pi
    torch.testing.assert_close(free["rewards/chosen"], torch.tensor([-0.5, -0.8]))


@pytest.mark.parametrize(("name", "grad_chosen"), [
    # d/d log pi(y_w) of -log s(beta h) = -beta s(-beta h): -0.1 s(-0.2), -0.1 s(0.1)
    ("sigmoid", [-0.0450166, -0.0524979]),
    # of (h_bar - 5)^2 = 2 (h_bar - 5) / |y_w|: 2 (-3.5) / 2, 2 (-5.25) / 4
    ("ipo", [-3.5, -2.625]),
    # of the hinge: -beta while beta h < 1
    ("hinge", [-0.1, -0.1]),
])
def test_gradients(name, grad_chosen):
    p = pairs(requires_grad=True)
    losses, _ = preference_loss([name], p, BETA)
    losses.sum().backward()
    torch.testing.assert_close(p.chosen.grad, torch.tensor(grad_chosen))


def test_dpo_is_bradley_terry_on_implicit_rewards():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(6, generator=g) * 5 for _ in range(4))
    ones = torch.ones(6)
    dpo, dpo_metrics = preference_loss(["sigmoid"], PairLogps(pc, pr, ones, ones, rc, rr), 0.3)
    bt, bt_metrics = bradley_terry_loss(0.3 * (pc - rc), 0.3 * (pr - rr))
    torch.testing.assert_close(dpo, bt)
    torch.testing.assert_close(dpo_metrics["rewards/accuracy"], bt_metrics["accuracy"])


def test_robust_with_no_noise_is_dpo():
    torch.testing.assert_close(preference_loss(["robust"], pairs(), BETA)[0],
                               preference_loss(["sigmoid"], pairs(), BETA)[0])


def test_registry_errors_and_reference():
    with pytest.raises(ValueError, match=r"unknown loss_type 'dpo'; valid names: sigmoid, hinge, ipo"):
        preference_loss(["dpo"], pairs(), BETA)
    with pytest.raises(ValueError, match="loss_weights has 1 values for 2 loss types"):
        preference_loss(["sigmoid", "sft"], pairs(), BETA, weights=[1.0])
    with pytest.raises(ValueError, match="needs the reference"):
        preference_loss(["sigmoid"], pairs(reference=False), BETA)
    with pytest.raises(ValueError, match="one shape"):
        PairLogps(torch.zeros(2), torch.zeros(2, 1), torch.ones(2), torch.ones(2))
    with pytest.raises(ValueError, match="label_smoothing"):
        preference_loss(["sigmoid"], pairs(), BETA, label_smoothing=0.5)
    assert not needs_reference(["simpo", "sft"]) and needs_reference(["cpo", "sigmoid"])
