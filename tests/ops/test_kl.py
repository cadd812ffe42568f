from __future__ import annotations

import math

import pytest
import torch

from alignkit.ops import KL_ESTIMATORS, kl_estimator, kl_k1, kl_k2, kl_k3

# (logp, logp_ref) pairs: (-1, -2), (-2, -1), (-0.5, -0.5)
LOGP = torch.tensor([-1.0, -2.0, -0.5])
LOGP_REF = torch.tensor([-2.0, -1.0, -0.5])


def test_k1_hand_values():
    # logp - logp_ref: -1 - (-2) = 1, -2 - (-1) = -1, 0
    torch.testing.assert_close(kl_k1(LOGP, LOGP_REF), torch.tensor([1.0, -1.0, 0.0]))


def test_k2_hand_values():
    # 0.5 * (logp - logp_ref)^2: 0.5 * 1 = 0.5, 0.5 * 1 = 0.5, 0
    torch.testing.assert_close(kl_k2(LOGP, LOGP_REF), torch.tensor([0.5, 0.5, 0.0]))


def test_k3_hand_values():
    # r = logp_ref - logp: -1, 1, 0
    # e^-1 - 1 + 1 = 0.3678794;  e^1 - 1 - 1 = 0.7182818;  e^0 - 1 - 0 = 0
    torch.testing.assert_close(kl_k3(LOGP, LOGP_REF), torch.tensor([0.3678794, 0.7182818, 0.0]))


def test_k3_nonnegative():
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(10_000, generator=g) * 3
    logp_ref = torch.randn(10_000, generator=g) * 3
    assert (kl_k3(logp, logp_ref) >= 0).all()
    # tiny ratios, where exp(r) - 1 - r in float32 would cancel to negative values
    near = logp + torch.randn(10_000, generator=g) * 1e-4
    assert (kl_k3(logp, near) >= 0).all()
    assert (kl_k1(logp, logp_ref) < 0).any()  # k1, by contrast, is not


def test_estimators_approach_exact_kl():
    # p = [0.5, 0.3, 0.2], q = [0.2, 0.3, 0.5]
    # KL(p || q) = 0.5 log(2.5) + 0.3 log(1) + 0.2 log(0.4) = 0.3 * 0.9162907 = 0.2748872
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.3, 0.5])
    exact = 0.3 * math.log(2.5)
    g = torch.Generator().manual_seed(0)
    y = torch.multinomial(p, 200_000, replacement=True, generator=g)
    logp, logp_ref = p.log()[y], q.log()[y]
    # k1's per-sample std is ~0.72, so its standard error is ~0.0016; k3's is smaller
    assert abs(kl_k1(logp, logp_ref).mean().item() - exact) < 0.01
    assert abs(kl_k3(logp, logp_ref).mean().item() - exact) < 0.01
    # k2 is biased: E[r^2]/2 = 0.5 * 0.7 * log(2.5)^2 = 0.2938560, not KL
    assert abs(kl_k2(logp, logp_ref).mean().item() - 0.2938560) < 0.01
    assert abs(kl_k2(logp, logp_ref).mean().item() - exact) > 0.015


def test_registry():
    assert KL_ESTIMATORS == {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}
    assert kl_estimator("k3") is kl_k3


def test_unknown_estimator_lists_valid_names():
    with pytest.raises(ValueError) as info:
        kl_estimator("k4")
    message = str(info.value)
    assert "'k4'" in message
    for name in ("k1", "k2", "k3"):
        assert name in message
