from __future__ import annotations

import pytest
import torch

from alignkit.losses import DPO_LOSSES, bradley_terry_loss, dpo_loss, dpo_sigmoid_loss, ipo_loss

# log-ratios chosen: -5 - (-6) = 1, -8 - (-7) = -1
# log-ratios rejected: -7 - (-6) = -1, -6 - (-6) = 0
# h = [1 - (-1), -1 - 0] = [2, -1]
POLICY_CHOSEN = torch.tensor([-5.0, -8.0])
POLICY_REJECTED = torch.tensor([-7.0, -6.0])
REF_CHOSEN = torch.tensor([-6.0, -7.0])
REF_REJECTED = torch.tensor([-6.0, -6.0])
BETA = 0.1


def _inputs(requires_grad: bool = False):
    pc = POLICY_CHOSEN.clone().requires_grad_(requires_grad)
    pr = POLICY_REJECTED.clone().requires_grad_(requires_grad)
    return pc, pr, REF_CHOSEN, REF_REJECTED


def test_sigmoid_hand_values():
    losses, _ = dpo_sigmoid_loss(*_inputs(), beta=BETA)
    # beta h = [0.2, -0.1]
    # -log sigmoid(0.2) = log(1 + e^-0.2) = 0.5981389;  -log sigmoid(-0.1) = log(1 + e^0.1) = 0.7443967
    torch.testing.assert_close(losses, torch.tensor([0.5981389, 0.7443967]))


def test_label_smoothing_hand_values():
    losses, _ = dpo_sigmoid_loss(*_inputs(), beta=BETA, label_smoothing=0.1)
    # 0.9 * log(1 + e^-0.2) + 0.1 * log(1 + e^0.2) = 0.9 * 0.5981389 + 0.1 * 0.7981389 = 0.6181389
    # 0.9 * log(1 + e^0.1) + 0.1 * log(1 + e^-0.1) = 0.9 * 0.7443967 + 0.1 * 0.6443967 = 0.7343967
    torch.testing.assert_close(losses, torch.tensor([0.6181389, 0.7343967]))


def test_ipo_hand_values():
    losses, _ = ipo_loss(*_inputs(), beta=BETA)
    # target 1 / (2 * 0.1) = 5: (2 - 5)^2 = 9, (-1 - 5)^2 = 36
    torch.testing.assert_close(losses, torch.tensor([9.0, 36.0]))


@pytest.mark.parametrize("fn", [dpo_sigmoid_loss, ipo_loss])
def test_metrics(fn):
    losses, metrics = fn(*_inputs(requires_grad=True), beta=BETA)
    assert losses.shape == (2,)
    # rewards/chosen = 0.1 * [1, -1], rewards/rejected = 0.1 * [-1, 0]
    expected = {
        "rewards/chosen": [0.1, -0.1],
        "rewards/rejected": [-0.1, 0.0],
        "rewards/margin": [0.2, -0.1],  # 0.1 - (-0.1), -0.1 - 0
        "rewards/accuracy": [1.0, 0.0],
        "logps/chosen": [-5.0, -8.0],
        "logps/rejected": [-7.0, -6.0],
    }
    assert set(metrics) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(metrics[name], torch.tensor(value), msg=name)
        assert not metrics[name].requires_grad and metrics[name].dtype == torch.float32


@pytest.mark.parametrize(
    ("loss_type", "label_smoothing", "grad_chosen"),
    [
        # d/d pi_w = -(1 - eps) beta sigmoid(-beta h) + eps beta sigmoid(beta h)
        # eps = 0: -0.1 * sigmoid(-0.2) = -0.0450166;  -0.1 * sigmoid(0.1) = -0.0524979
        ("sigmoid", 0.0, [-0.0450166, -0.0524979]),
        # eps = 0.1: -0.9 * 0.0450166 + 0.1 * 0.0549834 = -0.0350166
        #            -0.9 * 0.0524979 + 0.1 * 0.0475021 = -0.0424979
        ("sigmoid", 0.1, [-0.0350166, -0.0424979]),
        # d/d pi_w = 2 (h - 5): 2 * (2 - 5) = -6, 2 * (-1 - 5) = -12 (h below the target)
        ("ipo", 0.0, [-6.0, -12.0]),
    ],
)
def test_gradient_signs(loss_type, label_smoothing, grad_chosen):
    pc, pr, rc, rr = _inputs(requires_grad=True)
    losses, _ = dpo_loss(loss_type, pc, pr, rc, rr, beta=BETA, label_smoothing=label_smoothing)
    losses.sum().backward()
    # descending the loss raises log pi(y_w) and lowers log pi(y_l)
    assert (pc.grad < 0).all()
    assert (pr.grad > 0).all()
    torch.testing.assert_close(pc.grad, torch.tensor(grad_chosen))
    torch.testing.assert_close(pr.grad, -torch.tensor(grad_chosen))  # h is pi_w - pi_l


def test_ipo_pulls_back_past_its_target():
    # h = 6 > 1 / (2 * 0.1) = 5: d/d pi_w = 2 * (6 - 5) = 2 > 0
    pc = torch.tensor([0.0], requires_grad=True)
    losses, _ = ipo_loss(pc, torch.tensor([-6.0]), torch.tensor([0.0]), torch.tensor([0.0]), beta=BETA)
    losses.sum().backward()
    torch.testing.assert_close(pc.grad, torch.tensor([2.0]))


def test_dpo_is_bradley_terry_on_implicit_rewards():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(6, generator=g) * 5 for _ in range(4))
    beta = 0.3
    dpo, dpo_metrics = dpo_sigmoid_loss(pc, pr, rc, rr, beta=beta)
    bt, bt_metrics = bradley_terry_loss(beta * (pc - rc), beta * (pr - rr))
    torch.testing.assert_close(dpo, bt)
    torch.testing.assert_close(dpo_metrics["rewards/accuracy"], bt_metrics["accuracy"])
    torch.testing.assert_close(dpo_metrics["rewards/margin"], bt_metrics["margin"])


def test_registry_dispatch():
    assert set(DPO_LOSSES) == {"sigmoid", "ipo"}
    for name, fn in DPO_LOSSES.items():
        via_registry, _ = dpo_loss(name, *_inputs(), beta=BETA)
        direct, _ = fn(*_inputs(), beta=BETA)
        torch.testing.assert_close(via_registry, direct)
    smoothed, _ = dpo_loss("sigmoid", *_inputs(), beta=BETA, label_smoothing=0.1)
    torch.testing.assert_close(smoothed, torch.tensor([0.6181389, 0.7343967]))


def test_unknown_loss_type_lists_valid_names():
    with pytest.raises(ValueError, match=r"'hinge'.*valid names: ipo, sigmoid"):
        dpo_loss("hinge", *_inputs(), beta=BETA)


def test_label_smoothing_with_ipo_raises():
    with pytest.raises(ValueError, match=r"label_smoothing=0\.1.*'ipo'"):
        dpo_loss("ipo", *_inputs(), beta=BETA, label_smoothing=0.1)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_sigmoid_loss(*_inputs(), beta=BETA, label_smoothing=0.5)
    with pytest.raises(ValueError, match="beta > 0"):
        ipo_loss(*_inputs(), beta=0.0)
    with pytest.raises(ValueError, match="one shape"):
        dpo_sigmoid_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN[:, None], REF_REJECTED, beta=BETA)
