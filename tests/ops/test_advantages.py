from __future__ import annotations

import math

import pytest
import torch

from alignkit.ops import (
    ADVANTAGE_ESTIMATORS,
    adaptive_kl_beta,
    advantage_estimator,
    explained_variance,
    gae,
    grpo_advantages,
    rloo_advantages,
)

NAN = float("nan")

# --- GAE ---------------------------------------------------------------------------------
# One row of 3 tokens, gamma = 0.9, lam = 0.8 (gamma lam = 0.72), r = [0, 0, 1], V = [0.5, 0.4, 0.6]
# t=2: delta = 1 + 0.9 * 0 - 0.6 = 0.4                 A2 = 0.4
# t=1: delta = 0 + 0.9 * 0.6 - 0.4 = 0.14              A1 = 0.14 + 0.72 * 0.4 = 0.428
# t=0: delta = 0 + 0.9 * 0.4 - 0.5 = -0.14             A0 = -0.14 + 0.72 * 0.428 = 0.16816
# returns = A + V = [0.66816, 0.828, 1.0]
R1 = torch.tensor([[0.0, 0.0, 1.0]])
V1 = torch.tensor([[0.5, 0.4, 0.6]])
A1 = torch.tensor([[0.16816, 0.428, 0.4]])
RET1 = torch.tensor([[0.66816, 0.828, 1.0]])


def test_gae_hand_values():
    adv, ret = gae(R1, V1, torch.ones(1, 3), gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, A1)
    torch.testing.assert_close(ret, RET1)


def test_gae_lambda_one_returns_are_discounted_reward_to_go():
    # lam = 1: R_t = sum_k gamma^k r_{t+k}, whatever V: [0.81, 0.9, 1.0] for r = [0, 0, 1]
    _, ret = gae(R1, V1, torch.ones(1, 3), gamma=0.9, lam=1.0)
    torch.testing.assert_close(ret, torch.tensor([[0.81, 0.9, 1.0]]))


def test_gae_rows_of_different_lengths_equal_each_row_alone():
    # row 0: the 3-token row above; row 1: 2 tokens then one pad holding finite garbage
    # (finite, so that reading it gives a wrong answer rather than NaN)
    r2, v2 = torch.tensor([[0.5, 2.0]]), torch.tensor([[1.0, -1.0]])
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 2.0, 100.0]])
    values = torch.tensor([[0.5, 0.4, 0.6], [1.0, -1.0, 50.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    alone_adv, alone_ret = gae(r2, v2, torch.ones(1, 2), gamma=0.9, lam=0.8)
    # row 1 alone: t=1: delta = 2 - (-1) = 3, A = 3 (V beyond the end is 0, not the pad's 50)
    #              t=0: delta = 0.5 + 0.9 * (-1) - 1 = -1.4, A = -1.4 + 0.72 * 3 = 0.76
    torch.testing.assert_close(alone_adv, torch.tensor([[0.76, 3.0]]))
    torch.testing.assert_close(adv[0:1], A1)
    torch.testing.assert_close(ret[0:1], RET1)
    torch.testing.assert_close(adv[1:2, :2], alone_adv)
    torch.testing.assert_close(ret[1:2, :2], alone_ret)


def test_gae_masked_positions_are_zero_and_garbage_does_not_leak():
    # left and right padding holding NaN / inf
    rewards = torch.tensor([[NAN, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, float("inf")]])
    values = torch.tensor([[NAN, 0.5, 0.4, 0.6], [0.5, 0.4, 0.6, NAN]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
    assert adv[0, 0] == 0 and ret[0, 0] == 0 and adv[1, 3] == 0 and ret[1, 3] == 0
    # both rows hold the same 3 tokens: left or right padding gives the same numbers
    torch.testing.assert_close(adv[0, 1:], A1[0])
    torch.testing.assert_close(adv[1, :3], A1[0])
    torch.testing.assert_close(ret[1, :3], RET1[0])


def test_gae_passes_through_a_masked_out_hole():
    # [t0, hole, t1, t2] is the 3-token row [t0, t1, t2]: the hole's 7s are never read
    rewards = torch.tensor([[0.0, 7.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 7.0, 0.4, 0.6]])
    adv, ret = gae(rewards, values, torch.tensor([[1, 0, 1, 1]]), gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, torch.tensor([[0.16816, 0.0, 0.428, 0.4]]))
    torch.testing.assert_close(ret, torch.tensor([[0.66816, 0.0, 0.828, 1.0]]))


def test_gae_matches_scalar_loop():
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    lengths = [7, 1, 4, 6, 3]
    mask = torch.tensor([[1] * n + [0] * (7 - n) for n in lengths])
    adv, ret = gae(rewards, values, mask, gamma=0.95, lam=0.9)
    for b, n in enumerate(lengths):
        a_next, expected = 0.0, [0.0] * 7
        for t in reversed(range(n)):
            v_next = float(values[b, t + 1]) if t + 1 < n else 0.0
            a_next = float(rewards[b, t]) + 0.95 * v_next - float(values[b, t]) + 0.95 * 0.9 * a_next
            expected[t] = a_next
        torch.testing.assert_close(adv[b], torch.tensor(expected))
        torch.testing.assert_close(ret[b], (torch.tensor(expected) + values[b]) * mask[b])


# --- GRPO / RLOO ---------------------------------------------------------------------------
# group 0: [0, 2, 4]: mean 2, deviations [-2, 0, 2], std = sqrt((4 + 0 + 4) / 2) = 2
# group 1: [0, 0, 3]: mean 1, deviations [-1, -1, 2], std = sqrt((1 + 1 + 4) / 2) = sqrt(3) = 1.7320508
# (Bessel's correction matters: the population std would be sqrt(8/3) and sqrt(2))
GROUPED = torch.tensor([0.0, 2.0, 4.0, 0.0, 0.0, 3.0])


def test_grpo_hand_values_scaled_by_std():
    adv = grpo_advantages(GROUPED, group_size=3)
    expected = torch.cat([
        torch.tensor([-2.0, 0.0, 2.0]) / (2.0 + 1e-6),  # [-1, 0, 1]
        torch.tensor([-1.0, -1.0, 2.0]) / (1.7320508 + 1e-6),  # [-0.5773503, -0.5773503, 1.1547005]
    ])
    torch.testing.assert_close(adv, expected)


def test_grpo_hand_values_without_std_dr_grpo():
    adv = grpo_advantages(GROUPED, group_size=3, scale_by_std=False)
    torch.testing.assert_close(adv, torch.tensor([-2.0, 0.0, 2.0, -1.0, -1.0, 2.0]))


def test_grpo_constant_group_gives_zero_not_nan():
    adv = grpo_advantages(torch.tensor([5.0, 5.0, 5.0, 0.0, 2.0, 4.0]), group_size=3)
    torch.testing.assert_close(adv, torch.tensor([0.0, 0.0, 0.0, -1.0, 0.0, 1.0]), atol=1e-5, rtol=0)


def test_grpo_invalid_row_excluded_and_zero():
    # group 0: valid [1, 3] (the NaN reward failed): mean 2, std = sqrt((1 + 1) / 1) = 1.4142136
    #   -> [-1 / 1.4142136, 0, 1 / 1.4142136] = [-0.7071068, 0, 0.7071068]
    # group 1 unaffected: [0, 2, 4] -> [-1, 0, 1]
    rewards = torch.tensor([1.0, NAN, 3.0, 0.0, 2.0, 4.0])
    valid = torch.tensor([True, False, True, True, True, True])
    adv = grpo_advantages(rewards, group_size=3, valid=valid)
    torch.testing.assert_close(adv, torch.tensor([-0.7071068, 0.0, 0.7071068, -1.0, 0.0, 1.0]), atol=1e-5, rtol=0)
    # without std: [1 - 2, 0, 3 - 2]
    adv = grpo_advantages(rewards, group_size=3, scale_by_std=False, valid=valid)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 0.0, 1.0, -2.0, 0.0, 2.0]))


@pytest.mark.parametrize("fn", [grpo_advantages, rloo_advantages])
def test_group_with_one_valid_row_is_all_zero(fn):
    rewards = torch.tensor([7.0, NAN, NAN, 0.0, 2.0, 4.0])
    valid = torch.tensor([True, False, False, True, True, True])
    adv = fn(rewards, 3, valid=valid)
    assert torch.isfinite(adv).all()
    assert adv[:3].tolist() == [0.0, 0.0, 0.0]
    assert adv[3:].abs().sum() > 0  # the other group is untouched
    # a group of size 1 has no baseline either
    assert fn(torch.tensor([1.0, 2.0]), 1).tolist() == [0.0, 0.0]


def test_rloo_hand_values():
    # [1, 2, 6]: A_0 = 1 - (2 + 6) / 2 = -3;  A_1 = 2 - (1 + 6) / 2 = -1.5;  A_2 = 6 - (1 + 2) / 2 = 4.5
    torch.testing.assert_close(rloo_advantages(torch.tensor([1.0, 2.0, 6.0]), 3), torch.tensor([-3.0, -1.5, 4.5]))


def test_rloo_invalid_row_excluded():
    # valid [1, 3]: A = [1 - 3, 0, 3 - 1]
    adv = rloo_advantages(torch.tensor([1.0, NAN, 3.0]), 3, valid=torch.tensor([True, False, True]))
    torch.testing.assert_close(adv, torch.tensor([-2.0, 0.0, 2.0]))


def test_group_estimators_match_torch_reference():
    g = torch.Generator().manual_seed(1)
    rewards = torch.randn(4 * 5, generator=g)
    groups = rewards.view(4, 5)
    mean, std = groups.mean(1, keepdim=True), groups.std(1, keepdim=True)
    torch.testing.assert_close(grpo_advantages(rewards, 5), ((groups - mean) / (std + 1e-6)).view(-1))
    torch.testing.assert_close(rloo_advantages(rewards, 5), (5 / 4 * (groups - mean)).view(-1))


def test_group_size_must_divide_batch():
    with pytest.raises(ValueError, match="groups of 4"):
        grpo_advantages(torch.zeros(6), 4)


def test_registry():
    assert advantage_estimator("grpo") is grpo_advantages
    assert advantage_estimator("rloo") is rloo_advantages
    assert set(ADVANTAGE_ESTIMATORS) == {"grpo", "rloo"}
    with pytest.raises(ValueError, match="grpo, rloo"):
        advantage_estimator("reinforce++")


# --- adaptive KL ---------------------------------------------------------------------------
# beta = 0.1, target = 6, horizon = 10000, n_steps = 256: n_steps / horizon = 0.0256
@pytest.mark.parametrize(
    ("observed", "expected"),
    [
        (6.6, 0.1 * (1 + 0.1 * 0.0256)),  # error = 6.6 / 6 - 1 = 0.1 -> beta rises: 0.100256
        (5.4, 0.1 * (1 - 0.1 * 0.0256)),  # error = -0.1 -> beta falls: 0.099744
        (60.0, 0.1 * (1 + 0.2 * 0.0256)),  # error = 9, clipped to 0.2: 0.100512
        (0.0, 0.1 * (1 - 0.2 * 0.0256)),  # error = -1, clipped to -0.2: 0.099488
        (6.0, 0.1),  # on target: unchanged
    ],
)
def test_adaptive_kl_beta(observed, expected):
    assert adaptive_kl_beta(0.1, observed, 6.0, 10_000, 256) == pytest.approx(expected, rel=1e-12)


def test_adaptive_kl_beta_accepts_tensor():
    beta = adaptive_kl_beta(0.1, torch.tensor(6.6), 6.0, 10_000, 256)
    assert isinstance(beta, float) and beta == pytest.approx(0.100256, rel=1e-6)


def test_rloo_scaled_by_the_group_std_by_hand():
    # rewards 1, 2, 6: leave-one-out advantages -3, -1.5, 4.5; mean 3, sample variance
    # ((-2)^2 + (-1)^2 + 3^2) / 2 = 7, so each is divided by sqrt(7)
    scaled = rloo_advantages(torch.tensor([1.0, 2.0, 6.0]), 3, scale_by_std=True, eps=0.0)
    torch.testing.assert_close(scaled, torch.tensor([-3.0, -1.5, 4.5]) / 7 ** 0.5)


# --- explained variance ----------------------------------------------------------------------
# R = [1, 2, 3] on the mask (a 4th token masked out, garbage there): Var R = 2/3 (population).
# V = [1, 2, 2]: R - V = [0, 0, 1], mean 1/3, Var = (1/9 + 1/9 + 4/9) / 3 = 2/9: EV = 1 - (2/9) / (2/3) = 2/3.
# V = R: EV = 1. V = 2 (a constant): R - V has R's variance: EV = 0.


def test_explained_variance_hand_values():
    returns, mask = torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1, 1, 1, 0]])
    assert explained_variance(torch.tensor([[1.0, 2.0, 2.0, -100.0]]), returns, mask) == pytest.approx(2 / 3)
    assert explained_variance(returns.clone(), returns, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full((1, 4), 2.0), returns, mask) == pytest.approx(0.0, abs=1e-7)



def test_process_advantages_hand_values():
    """DeepSeekMath's process supervision: step rewards normalised over the group's steps, each token's
    advantage the sum of its step's and the later steps' normalised rewards."""
    from alignkit.ops import process_advantages

    # one group of 2 completions, 5 tokens each; steps end at columns 1, 3 (row 0) and 2, 4 (row 1)
    rewards = torch.tensor([[9.0, 1.0, 9.0, 0.0, 9.0], [9.0, 9.0, 1.0, 9.0, 2.0]])  # 9s are not steps: ignored
    steps = torch.tensor([[0, 1, 0, 1, 0], [0, 0, 1, 0, 1]], dtype=torch.bool)
    # steps 1, 0, 1, 2: mean 1, centred 0, -1, 0, 1; unscaled
    a = process_advantages(rewards, steps, 2, scale_by_std=False)
    torch.testing.assert_close(a, torch.tensor([[-1.0, -1.0, -1.0, -1.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0]]))
    # std (n - 1) = sqrt(2 / 3)
    s = process_advantages(rewards, steps, 2, eps=0.0)
    torch.testing.assert_close(s, a / math.sqrt(2 / 3))
    # groups are separate; a group with one step, or equal steps, gives 0, never NaN
    two = process_advantages(torch.ones(4, 3), torch.tensor([[0, 0, 1], [0, 0, 0], [0, 1, 1], [1, 0, 0]]).bool(), 2)
    assert torch.equal(two, torch.zeros(4, 3))
