"""The PRM's step loss and the first wrong step, against values worked by hand."""

import math

import torch

from alignkit.losses.process import first_error, step_loss


def test_step_loss_by_hand():
    logits = torch.tensor([0.0, 2.0, -1.0, 3.0])
    labels = torch.tensor([1.0, 0.0, 0.0, 0.25])  # the last a soft (Monte-Carlo) label
    losses, m = step_loss(logits, labels)
    # BCE: -[y log s(z) + (1-y) log(1-s(z))]; log s(z) = -log(1+e^-z), log(1-s(z)) = -log(1+e^z)
    by_hand = [math.log(2), math.log(1 + math.e ** 2), math.log(1 + math.e ** -1),
               0.25 * math.log(1 + math.e ** -3) + 0.75 * math.log(1 + math.e ** 3)]
    torch.testing.assert_close(losses, torch.tensor(by_hand), atol=1e-6, rtol=0)
    # read as correct at >= 0.5: labels C, W, W, W; predictions s(z) = .5 C, .88 C, .27 W, .95 C
    assert m["accuracy"].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert m["incorrect_tp"].tolist() == [0.0, 0.0, 1.0, 0.0]
    assert m["incorrect_fp"].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert m["incorrect_fn"].tolist() == [0.0, 1.0, 0.0, 1.0]


def test_first_error_counts_steps_not_columns():
    mask = torch.tensor([[0, 1, 0, 1, 1, 0], [1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 1, 1]], dtype=torch.bool)
    correct = torch.tensor([[1, 1, 0, 0, 1, 0], [1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 1, 0]], dtype=torch.bool)
    # row 0: steps at columns 1, 3, 4 -> correct, wrong, correct: first error is step 1 (column 0's 1 is not a step)
    # row 1: both steps correct -> 2 (the step count); row 2: steps at 2, 4, 5 -> the third is wrong -> 2
    assert first_error(correct, mask).tolist() == [1, 2, 2]
