from __future__ import annotations

import pytest
import torch

from alignkit.losses import kto_default_weights, kto_loss, kto_reference_point

# r = policy - ref = [-3 - (-4), -4 - (-3)] = [1, -1]; example 0 desirable, 1 undesirable
POLICY = torch.tensor([-3.0, -4.0])
REF = torch.tensor([-4.0, -3.0])
LABELS = torch.tensor([True, False])
BETA = 0.5
Z_REF = torch.tensor(0.2)


def test_hand_values_with_weights():
    losses, _ = kto_loss(POLICY, REF, LABELS, Z_REF, BETA, desirable_weight=2.0, undesirable_weight=3.0)
    # desirable:   2 * (1 - sigmoid(0.5 * (1 - 0.2)))    = 2 * (1 - sigmoid(0.4)) = 2 * 0.4013123 = 0.8026247
    # undesirable: 3 * (1 - sigmoid(0.5 * (0.2 - (-1)))) = 3 * (1 - sigmoid(0.6)) = 3 * 0.3543437 = 1.0630311
    torch.testing.assert_close(losses, torch.tensor([0.8026247, 1.0630311]))


def test_default_weights_are_one():
    losses, _ = kto_loss(POLICY, REF, LABELS, Z_REF, BETA)
    # 1 - sigmoid(0.4) = 0.4013123;  1 - sigmoid(0.6) = 0.3543437
    torch.testing.assert_close(losses, torch.tensor([0.4013123, 0.3543437]))


def test_metrics():
    losses, metrics = kto_loss(POLICY.clone().requires_grad_(), REF, LABELS, Z_REF, BETA)
    assert losses.shape == (2,)
    expected = {
        "rewards/desirable": [0.5, 0.0],  # beta * r = 0.5 * 1 on the desirable example only
        "rewards/undesirable": [0.0, -0.5],  # 0.5 * -1 on the undesirable example only
        "count/desirable": [1.0, 0.0],
        "count/undesirable": [0.0, 1.0],
        "kl": [0.2, 0.2],
    }
    assert set(metrics) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(metrics[name], torch.tensor(value), msg=name)
        assert not metrics[name].requires_grad and metrics[name].dtype == torch.float32


def test_gradient_signs():
    policy = POLICY.clone().requires_grad_()
    losses, _ = kto_loss(policy, REF, LABELS, Z_REF, BETA)
    losses.sum().backward()
    # desirable: d/dr [1 - sigmoid(beta (r - z))] = -beta s(1 - s), s = sigmoid(0.4): -0.5 * 0.2402607 = -0.1201304
    # undesirable: d/dr [1 - sigmoid(beta (z - r))] = +beta s(1 - s), s = sigmoid(0.6): 0.5 * 0.2287842 = 0.1143921
    torch.testing.assert_close(policy.grad, torch.tensor([-0.1201304, 0.1143921]))


def test_reference_point_mean():
    # [-2 - (-3), -3 - (-3)] = [1, 0], mean 0.5
    z = kto_reference_point(torch.tensor([-2.0, -3.0]), torch.tensor([-3.0, -3.0]))
    assert z.shape == ()
    torch.testing.assert_close(z, torch.tensor(0.5))


def test_reference_point_clamped_at_zero():
    # [-3 - (-2), -4 - (-2)] = [-1, -2], mean -1.5 -> max(0, -1.5) = 0
    z = kto_reference_point(torch.tensor([-3.0, -4.0]), torch.tensor([-2.0, -2.0]))
    torch.testing.assert_close(z, torch.tensor(0.0))


def test_reference_point_is_detached():
    policy_kl = torch.tensor([-2.0, -3.0], requires_grad=True)
    z = kto_reference_point(policy_kl, torch.tensor([-3.0, -3.0]))
    assert not z.requires_grad
    policy = POLICY.clone().requires_grad_()
    losses, _ = kto_loss(policy, REF, LABELS, z, BETA)
    losses.sum().backward()
    assert policy.grad is not None
    assert policy_kl.grad is None


def test_loss_detaches_z_ref_it_is_given():
    z = torch.tensor(0.2, requires_grad=True)
    policy = POLICY.clone().requires_grad_()
    losses, metrics = kto_loss(policy, REF, LABELS, z, BETA)
    losses.sum().backward()
    assert z.grad is None
    assert not metrics["kl"].requires_grad


def test_default_weights_for_imbalance():
    assert kto_default_weights(100, 400) == (4.0, 1.0)
    assert kto_default_weights(400, 100) == (1.0, 4.0)
    assert kto_default_weights(300, 300) == (1.0, 1.0)
    w_d, w_u = kto_default_weights(3, 7)
    # w_D n_D / (w_U n_U) = (7/3) * 3 / (1 * 7) = 1
    assert (w_d, w_u) == pytest.approx((7 / 3, 1.0))
    assert w_d * 3 / (w_u * 7) == pytest.approx(1.0)


@pytest.mark.parametrize(("n_desirable", "n_undesirable"), [(0, 5), (5, 0)])
def test_default_weights_reject_empty_class(n_desirable, n_undesirable):
    with pytest.raises(ValueError, match="both kinds"):
        kto_default_weights(n_desirable, n_undesirable)


def test_mismatched_shapes_raise():
    with pytest.raises(ValueError, match="one shape"):
        kto_loss(POLICY, REF, LABELS[:1], Z_REF, BETA)
    with pytest.raises(ValueError, match="shape"):
        kto_reference_point(torch.zeros(2), torch.zeros(3))
