from __future__ import annotations

import math

import pytest
import torch

from alignkit.ops import entropy_from_logits, token_logprobs

# logits [1, 2, 3]: logsumexp = 3 + log(1 + e^-1 + e^-2) = 3 + log(1.5032147) = 3.4076060
# so log p = [1, 2, 3] - 3.4076060 = [-2.4076060, -1.4076060, -0.4076060]
LOGP_123 = [-2.4076060, -1.4076060, -0.4076060]


def test_token_logprobs_hand_values():
    logits = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [1.0, 2.0, 3.0]]])  # [1, 3, 3]
    labels = torch.tensor([[2, 1, 0]])
    # uniform over 3 classes: log(1/3) = -1.0986123
    expected = torch.tensor([[LOGP_123[2], -1.0986123, LOGP_123[0]]])
    out = token_logprobs(logits, labels)
    assert out.shape == (1, 3) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_token_logprobs_ignore_labels_do_not_crash():
    logits = torch.tensor([[[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]])
    labels = torch.tensor([[-100, 1]])
    out = token_logprobs(logits, labels)
    # -100 is read as class 0; the caller masks that position
    torch.testing.assert_close(out, torch.tensor([[LOGP_123[0], LOGP_123[1]]]), atol=1e-6, rtol=0)
    out_bf16 = token_logprobs(logits.bfloat16(), labels)
    assert torch.isfinite(out_bf16).all()


def test_token_logprobs_matches_log_softmax_gather():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g) * 3
    labels = torch.randint(0, 11, (3, 5), generator=g)
    expected = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(token_logprobs(logits, labels), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_token_logprobs_low_precision_computed_in_fp32(dtype):
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(3, 5, 50, generator=g) * 4).to(dtype)
    labels = torch.randint(0, 50, (3, 5), generator=g)
    out = token_logprobs(logits, labels)
    assert out.dtype == torch.float32
    # same low-precision logits, upcast: a bf16/fp16 computation would be off by ~1e-2
    expected = token_logprobs(logits.float(), labels)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_entropy_hand_values():
    # [1, 2, 3]: p = [0.0900306, 0.2447285, 0.6652410],
    # H = 3.4076060 - (0.0900306*1 + 0.2447285*2 + 0.6652410*3) = 0.8323956
    # p = [0.98, 0.01, 0.01] (logits = log p):
    # H = -(0.98 log 0.98 + 2 * 0.01 log 0.01) = 0.0197987 + 0.0921034 = 0.1119021
    logits = torch.tensor([[[1.0, 2.0, 3.0], [math.log(0.98), math.log(0.01), math.log(0.01)]]])
    out = entropy_from_logits(logits)
    assert out.shape == (1, 2) and out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([[0.8323956, 0.1119021]]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_entropy_uniform_is_log_v(dtype):
    # any constant logits over V = 7: H = log 7 = 1.9459101
    logits = torch.full((2, 3, 7), 3.5, dtype=dtype)
    out = entropy_from_logits(logits)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.full((2, 3), 1.9459101), atol=1e-6, rtol=0)


def test_entropy_matches_definition_and_bf16_upcast():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 4, 20, generator=g) * 3
    logp = torch.log_softmax(logits, -1)
    expected = -(logp.exp() * logp).sum(-1)
    torch.testing.assert_close(entropy_from_logits(logits), expected, atol=1e-5, rtol=0)
    low = logits.bfloat16()
    torch.testing.assert_close(
        entropy_from_logits(low), entropy_from_logits(low.float()), atol=1e-5, rtol=0
    )
