from __future__ import annotations

import math

import pytest
import torch

from alignkit.losses import (
    AGGREGATION_LEVELS,
    aggregate,
    clipped_policy_loss,
    clipped_value_loss,
    kl_penalty_loss,
)
from alignkit.losses.policy import sequence_level_logprobs

NAN = float("nan")

# --- aggregate -----------------------------------------------------------------------------
# Row 0 has 1 token (loss 4), row 1 has 3 tokens (losses 1, 2, 3); the pads hold finite garbage.
LOSS = torch.tensor([[4.0, 100.0, 100.0], [1.0, 2.0, 3.0]])
MASK = torch.tensor([[1, 0, 0], [1, 1, 1]])


def test_aggregate_token_hand_values():
    num, den = aggregate(LOSS, MASK, "token")
    # (4 + 1 + 2 + 3) / 4 tokens = 10 / 4 = 2.5
    assert num.item() == 10.0 and den.item() == 4.0
    assert den.dtype == torch.float32


def test_aggregate_sequence_hand_values():
    num, den = aggregate(LOSS, MASK, "sequence")
    # per-sequence means 4 / 1 = 4 and (1 + 2 + 3) / 3 = 2; (4 + 2) / 2 sequences = 3
    # (not 2.5: the 1-token row's token weighs 1/2, each token of the 3-token row 1/6 -- the length bias)
    assert num.item() == 6.0 and den.item() == 2.0


def test_aggregate_ignores_nan_and_empty_rows():
    loss = torch.tensor([[4.0, NAN, float("inf")], [1.0, 2.0, 3.0], [NAN, NAN, NAN]], requires_grad=True)
    mask = torch.tensor([[1, 0, 0], [1, 1, 1], [0, 0, 0]])
    num, den = aggregate(loss, mask, "sequence")
    assert (num.item(), den.item()) == (6.0, 2.0)  # the empty row counts as no sequence
    num.backward()
    # d num / d loss: 1 for row 0's token, 1/3 for row 1's, 0 elsewhere (never NaN)
    torch.testing.assert_close(loss.grad, torch.tensor([[1.0, 0, 0], [1 / 3, 1 / 3, 1 / 3], [0, 0, 0]]))


def test_aggregate_bnpo_and_dr_grpo_hand_values():
    num, den = aggregate(LOSS, MASK, "bnpo")
    # the micro-batch's token mean, one unit: 10 / 4
    assert (num.item(), den.item()) == (2.5, 1.0)
    num, den = aggregate(LOSS, MASK, "dr_grpo", max_tokens=8)
    # the token sum over 2 rows x 8 allowed tokens, whatever their lengths: 10 / 16
    assert (num.item(), den.item()) == (10.0, 16.0)
    assert [aggregate(LOSS, MASK, a)[0].item() for a in ("dapo", "grpo")] == [10.0, 6.0]  # TRL's names
    with pytest.raises(ValueError, match="max_tokens"):
        aggregate(LOSS, MASK, "dr_grpo")


def test_aggregate_bnpo_depends_on_the_split():
    # TRL's bnpo normalises per micro-batch: halves of 1 and 3 tokens give (4/1 + 6/3) / 2 = 3, not 10/4
    (n1, d1), (n2, d2) = aggregate(LOSS[:1], MASK[:1], "bnpo"), aggregate(LOSS[1:], MASK[1:], "bnpo")
    assert ((n1 + n2) / (d1 + d2)).item() == 3.0


@pytest.mark.parametrize("level", [lv for lv in AGGREGATION_LEVELS if lv != "bnpo"])
def test_aggregate_split_batch_reproduces_whole_batch(level):
    g = torch.Generator().manual_seed(0)
    loss = torch.randn(6, 5, generator=g)
    lengths = [5, 1, 1, 4, 3, 2]  # halves of 7 and 9 tokens, so a mean of the halves' means is wrong
    mask = torch.tensor([[1] * n + [0] * (5 - n) for n in lengths])
    num, den = aggregate(loss, mask, level, max_tokens=5)
    (n1, d1), (n2, d2) = aggregate(loss[:3], mask[:3], level, 5), aggregate(loss[3:], mask[3:], level, 5)
    torch.testing.assert_close((n1 + n2) / (d1 + d2), num / den)
    torch.testing.assert_close(d1 + d2, den)
    if level == "dr_grpo":  # the 16 tokens' sum over 6 rows x 5
        torch.testing.assert_close(num / den, loss[mask.bool()].sum() / 30)
    elif level == "token":
        # the whole-batch value by hand: mean of the 16 masked-in tokens;
        # averaging the halves' own means would give another number
        torch.testing.assert_close(num / den, loss[mask.bool()].mean())
        assert not torch.allclose((n1 / d1 + n2 / d2) / 2, num / den)
    else:
        # 6 per-sequence means, each weighed 1/6
        means = torch.stack([loss[b, :n].mean() for b, n in enumerate(lengths)])
        torch.testing.assert_close(num / den, means.mean())
        torch.testing.assert_close(den, torch.tensor(6.0))


def test_aggregate_unknown_level():
    with pytest.raises(ValueError, match="token, sequence, bnpo, dr_grpo, dapo, grpo"):
        aggregate(LOSS, MASK, "batch")


def test_sequence_level_logprobs_by_hand():
    # row 0: log-ratios 0.3, -0.1 (mean 0.1) and a pad; row 1: one token, log-ratio 0.4
    old = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    logp = torch.tensor([[-0.7, -2.1, 50.0], [-0.6, 9.0, 9.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    seq = sequence_level_logprobs(logp, old, mask)
    # every token's ratio is the sequence's: exp(0.1) for row 0, exp(0.4) for row 1; pads as old
    torch.testing.assert_close(seq, torch.tensor([[-0.9, -1.9, -3.0], [-0.6, -1.0, -1.0]]))
    seq[0, 0].backward()  # d/d logp of the mean over row 0's 2 tokens
    torch.testing.assert_close(logp.grad, torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 0.0]]))


# --- clipped_policy_loss -------------------------------------------------------------------
# Five tokens of one row, clip_eps = 0.2 (ratio clipped to [0.8, 1.2]):
#   token  A    ratio  -A ratio  -A clip(ratio)  loss   clipped?  d loss / d logp
#   0      1    1      -1        -1              -1     no        -A ratio = -1
#   1      2    1.5    -3        -2.4            -2.4   yes       0
#   2      -1   0.5    0.5       0.8             0.8    yes       0
#   3      2    0.5    -1        -1.6            -1     no        -A ratio = -1
#   4      -1   1.5    1.5       1.2             1.5    no        -A ratio = 1.5
ADV = torch.tensor([[1.0, 2.0, -1.0, 2.0, -1.0]])
RATIO = torch.tensor([[1.0, 1.5, 0.5, 0.5, 1.5]])
OLD = torch.full((1, 5), -1.0)
ONES = torch.ones(1, 5)


def _logprobs(ratio: torch.Tensor) -> torch.Tensor:
    return (OLD + ratio.log()).requires_grad_(True)


def test_clipped_policy_loss_hand_values_and_clipfrac():
    loss, metrics = clipped_policy_loss(_logprobs(RATIO), OLD, ADV, ONES)
    torch.testing.assert_close(loss, torch.tensor([[-1.0, -2.4, 0.8, -1.0, 1.5]]))  # -2.4 = -1.2 A, 0.8 = 0.8 (-A)
    torch.testing.assert_close(metrics["clipfrac"], torch.tensor([[0.0, 1.0, 1.0, 0.0, 0.0]]))
    torch.testing.assert_close(metrics["ratio"], RATIO)
    # approx_kl = 0.5 (log ratio)^2: log 1.5 = 0.4054651 -> 0.0822011;  log 0.5 = -0.6931472 -> 0.2402265
    torch.testing.assert_close(metrics["approx_kl"], torch.tensor([[0.0, 0.0822011, 0.2402265, 0.2402265, 0.0822011]]))
    for v in metrics.values():
        assert not v.requires_grad and v.shape == (1, 5)


def test_clipped_policy_loss_gradient_is_zero_through_clipped_tokens():
    logprobs = _logprobs(RATIO)
    loss, _ = clipped_policy_loss(logprobs, OLD, ADV, ONES)
    loss.sum().backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-1.0, 0.0, 0.0, -1.0, 1.5]]))


def test_clip_eps_high_changes_only_the_upper_bound():
    # A = [1, 1, -1], ratio = [1.25, 1.5, 0.5]
    adv, ratio = torch.tensor([[1.0, 1.0, -1.0]]), torch.tensor([[1.25, 1.5, 0.5]])
    old, mask = torch.full((1, 3), -1.0), torch.ones(1, 3)
    logprobs = old + ratio.log()
    loss, m = clipped_policy_loss(logprobs, old, adv, mask, clip_eps=0.2)
    # upper bound 1.2: -1.2, -1.2; lower bound 0.8: 0.8
    torch.testing.assert_close(loss, torch.tensor([[-1.2, -1.2, 0.8]]))
    loss, m = clipped_policy_loss(logprobs, old, adv, mask, clip_eps=0.2, clip_eps_high=0.28)
    # upper bound 1.28: ratio 1.25 is inside (loss -1.25, not clipped), 1.5 clips to -1.28; lower bound still 0.8
    torch.testing.assert_close(loss, torch.tensor([[-1.25, -1.28, 0.8]]))
    torch.testing.assert_close(m["clipfrac"], torch.tensor([[0.0, 1.0, 1.0]]))


def test_sequence_advantages_broadcast_over_tokens():
    logprobs = torch.tensor([[-1.0, -2.0], [-0.5, -0.1]])
    old = torch.tensor([[-1.1, -1.9], [-0.6, -0.3]])
    mask = torch.ones(2, 2)
    per_seq, _ = clipped_policy_loss(logprobs, old, torch.tensor([1.0, -2.0]), mask)
    per_token, _ = clipped_policy_loss(logprobs, old, torch.tensor([[1.0, 1.0], [-2.0, -2.0]]), mask)
    torch.testing.assert_close(per_seq, per_token)
    assert per_seq[1].gt(0).all()  # row 1's negative advantage reached both its tokens


def test_clipped_policy_loss_masked_positions():
    logprobs = torch.tensor([[-1.0, NAN, 500.0]], requires_grad=True)  # pads: NaN and exp overflow
    old = torch.tensor([[-1.0, -1.0, -500.0]])
    mask = torch.tensor([[1, 0, 0]])
    loss, metrics = clipped_policy_loss(logprobs, old, torch.tensor([[3.0, 3.0, 3.0]]), mask)
    torch.testing.assert_close(loss, torch.tensor([[-3.0, 0.0, 0.0]]))
    for name, v in metrics.items():
        assert v[0, 1:].tolist() == [0.0, 0.0], name
    loss.sum().backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-3.0, 0.0, 0.0]]))


# --- kl_penalty_loss -----------------------------------------------------------------------
def test_kl_penalty_hand_values_and_gradient():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5, NAN]], requires_grad=True)
    ref = torch.tensor([[-2.0, -1.0, -0.5, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    kl = kl_penalty_loss(logprobs, ref, mask)
    # r = ref - logp = [-1, 1, 0]: e^-1 + 1 - 1 = 0.3678794;  e^1 - 1 - 1 = 0.7182818;  0;  masked: 0
    torch.testing.assert_close(kl, torch.tensor([[0.3678794, 0.7182818, 0.0, 0.0]]))
    kl.sum().backward()
    # d kl / d logp = 1 - e^r: 1 - 0.3678794 = 0.6321206;  1 - e = -1.7182818;  0;  0
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.6321206, -1.7182818, 0.0, 0.0]]))


# --- clipped_value_loss --------------------------------------------------------------------
def test_clipped_value_loss_hand_values():
    # eps = 0.2; v_clip = clip(v, old - 0.2, old + 0.2)
    #  v    old  R    v_clip  (v-R)^2  (v_clip-R)^2  loss = 0.5 max  clipped?
    #  1.0  0.5  1.0  0.7     0        0.09          0.045           yes
    #  0.6  0.5  1.0  0.6     0.16     0.16          0.08            no (inside the range)
    #  2.0  0.5  1.0  0.7     1        0.09          0.5             no
    #  0.0  0.5  1.0  0.3     1        0.49          0.5             no
    #  0.0  0.5  -1.  0.3     1        1.69          0.845           yes
    values = torch.tensor([[1.0, 0.6, 2.0, 0.0, 0.0]], requires_grad=True)
    old = torch.tensor([[0.5, 0.5, 0.5, 0.5, 0.5]])
    returns = torch.tensor([[1.0, 1.0, 1.0, 1.0, -1.0]])
    loss, metrics = clipped_value_loss(values, old, returns, clip_eps=0.2)
    torch.testing.assert_close(loss, torch.tensor([[0.045, 0.08, 0.5, 0.5, 0.845]]))
    torch.testing.assert_close(metrics["vf_clipfrac"], torch.tensor([[1.0, 0.0, 0.0, 0.0, 1.0]]))
    loss.sum().backward()
    # clipped tokens: no gradient; else d/dv 0.5 (v - R)^2 = v - R: -0.4, 1, -1
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, -0.4, 1.0, -1.0, 0.0]]))


def test_clipped_value_loss_mask():
    values = torch.tensor([[2.0, NAN]])
    loss, metrics = clipped_value_loss(values, torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 5.0]]),
                                       mask=torch.tensor([[1, 0]]))
    # 0.5 * (2 - 0)^2 = 2; the masked-out token is 0
    torch.testing.assert_close(loss, torch.tensor([[2.0, 0.0]]))
    assert metrics["vf_clipfrac"].tolist() == [[0.0, 0.0]]
    assert math.isfinite(loss.sum().item())
