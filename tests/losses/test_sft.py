from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from alignkit.losses import sft_loss
from alignkit.ops import token_logprobs
from alignkit.train.common import lm_step

# Log-softmax by hand, log p_i = z_i - log sum_j exp(z_j):
# z = [1, 2, 3]:          log sum exp = log(e + e^2 + e^3) = 3.4076060 -> log p = [-2.4076060, -1.4076060, -0.4076060]
# z = [0, 0, 0]:          log p = log(1/3) = -1.0986123 for every class
# z = [0, log 2, log 3]:  log sum exp = log(1 + 2 + 3) = log 6 -> log p = [-1.7917595, -1.0986123, -0.6931472]
Z_123 = [1.0, 2.0, 3.0]
Z_FLAT = [0.0, 0.0, 0.0]
Z_123_PROBS = [0.0, math.log(2), math.log(3)]  # probabilities 1/6, 2/6, 3/6
LOGP_123 = [z - math.log(math.exp(1) + math.exp(2) + math.exp(3)) for z in Z_123]
LOGP_FLAT = math.log(1 / 3)
LOGP_123_PROBS = [math.log(1 / 6), math.log(2 / 6), math.log(3 / 6)]


def test_hand_values_of_the_log_softmax_above():
    assert [round(v, 7) for v in LOGP_123] == [-2.407606, -1.407606, -0.407606]
    assert round(LOGP_FLAT, 7) == -1.0986123
    assert [round(v, 7) for v in LOGP_123_PROBS] == [-1.7917595, -1.0986123, -0.6931472]


def test_sft_loss_hand_values_skip_the_masked_token():
    # row 0: z=[1,2,3] label 2 (kept), z=[0,log 2,log 3] label 0 (MASKED: -1.7917595 must not count)
    # row 1: z=[0,0,0] label 1 (kept),  z=[0,log 2,log 3] label 1 (kept)
    logits = torch.tensor([[Z_123, Z_123_PROBS], [Z_FLAT, Z_123_PROBS]])  # [B=2, T=2, V=3]
    labels = torch.tensor([[2, 0], [1, 1]])
    loss_mask = torch.tensor([[1, 0], [1, 1]])
    logprobs = token_logprobs(logits, labels).requires_grad_(True)
    loss, metrics = sft_loss(logprobs, loss_mask)
    # L = -(log p(2 | [1,2,3]) + log p(1 | flat) + log p(1 | [0,log 2,log 3]))
    #   = 0.4076060 + 1.0986123 + 1.0986123 = 2.6048306  (a SUM over both rows, not a mean)
    expected = -(LOGP_123[2] + LOGP_FLAT + LOGP_123_PROBS[1])
    assert abs(expected - 2.6048306) < 1e-7
    assert loss.shape == () and metrics == {}
    torch.testing.assert_close(loss, torch.tensor(expected), atol=1e-6, rtol=0)
    loss.backward()  # dL/dlogp = -m: the masked token gets no gradient
    assert logprobs.grad.tolist() == [[-1.0, 0.0], [-1.0, -1.0]]


def test_masked_out_minus_infinity_does_not_reach_the_loss():
    logprobs = torch.tensor([[LOGP_123[0], float("-inf")]], requires_grad=True)
    loss, _ = sft_loss(logprobs, torch.tensor([[1, 0]]))
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(-LOGP_123[0]), atol=1e-6, rtol=0)
    assert logprobs.grad.tolist() == [[-1.0, 0.0]]


class FixedLogits(torch.nn.Module):
    """A stand-in model whose logits at column t are fixed: logits [B, T, V]."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, logits_to_keep=None, **_):
        return SimpleNamespace(logits=self.logits if logits_to_keep is None else self.logits[:, logits_to_keep])


def test_lm_step_scores_token_t_plus_1_with_the_logits_of_column_t():
    """The shift sft_loss relies on: column t's logits predict token t+1, and loss_mask is on the tokens."""
    # tokens:    [0, 2, 1, 2]; loss on tokens 2 and 3 (the completion [1, 2]), not on the prompt [0, 2]
    # logits of column 1 predict token 2 (= 1), those of column 2 predict token 3 (= 2)
    input_ids = torch.tensor([[0, 2, 1, 2]])
    logits = torch.tensor([[Z_FLAT, Z_123_PROBS, Z_123, Z_FLAT]])  # [1, 4, 3]; column 3 predicts nothing
    batch = {"input_ids": input_ids, "attention_mask": torch.ones(1, 4, dtype=torch.long),
             "loss_mask": torch.tensor([[0, 0, 1, 1]])}
    loss, metrics = lm_step(FixedLogits(logits), batch)
    # L = -(log p(1 | [0,log 2,log 3]) + log p(2 | [1,2,3])) = 1.0986123 + 0.4076060 = 1.5062183
    expected = -(LOGP_123_PROBS[1] + LOGP_123[2])
    assert abs(expected - 1.5062183) < 1e-7
    torch.testing.assert_close(loss, torch.tensor(expected), atol=1e-6, rtol=0)
    # argmax is 2 in both columns: target 1 missed, target 2 hit
    assert int(metrics["accuracy"]) == 1
