"""Gradient accumulation weighs every loss token equally, however the step is split."""

import pytest
import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM

from alignkit.data import pad_batch
from alignkit.train.common import lm_count, lm_step
from alignkit.train.loop import accumulate_gradients

LENGTHS = [3, 300, 17, 120, 5, 64, 250, 9]


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    g = torch.Generator().manual_seed(0)
    examples = []
    for i, n in enumerate(LENGTHS):
        ids = torch.randint(3, 300, (n,), generator=g).tolist()
        start = int(torch.randint(1, n, (1,), generator=g))  # response starts somewhere inside
        examples.append({"id": i, "input_ids": ids, "loss_mask": [0] * start + [1] * (n - start)})
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    return model, examples, Accelerator()


def _grads(model, examples, accelerator, batch_size):
    model.zero_grad(set_to_none=True)
    batches = [pad_batch(examples[i : i + batch_size], 0) for i in range(0, len(examples), batch_size)]
    sums, count, bad = accumulate_gradients(model, batches, [1.0] * len(batches), lm_step, lm_count, accelerator)
    assert not bad
    return sums["loss"] / count, torch.cat([p.grad.flatten() for p in model.parameters()])


def _mean_of_means_grads(model, examples, batch_size):
    """The wrong variant: each micro-batch's mean loss, averaged over micro-batches."""
    model.zero_grad(set_to_none=True)
    batches = [pad_batch(examples[i : i + batch_size], 0) for i in range(0, len(examples), batch_size)]
    for b in batches:
        loss_sum, _ = lm_step(model, b)
        (loss_sum / lm_count(b) / len(batches)).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_splits_give_the_same_loss_and_gradient(setup):
    model, examples, acc = setup
    loss_81, grad_81 = _grads(model, examples, acc, batch_size=8)   # 1 micro-batch of 8
    loss_18, grad_18 = _grads(model, examples, acc, batch_size=1)   # 8 micro-batches of 1
    loss_24, grad_24 = _grads(model, examples, acc, batch_size=2)   # 4 micro-batches of 2
    assert abs(loss_18 - loss_81) <= 1e-6 and abs(loss_24 - loss_81) <= 1e-6
    assert _rel(grad_18, grad_81) <= 1e-6
    assert _rel(grad_24, grad_81) <= 1e-6
    # The test can fail: a mean of per-micro-batch means is a different gradient.
    assert _rel(_mean_of_means_grads(model, examples, 2), grad_81) > 1e-3


def test_weight_zero_micro_batch_adds_nothing(setup):
    model, examples, acc = setup
    _, grad = _grads(model, examples[:2], acc, batch_size=2)
    model.zero_grad(set_to_none=True)
    batches = [pad_batch(examples[:2], 0), pad_batch(examples[2:3], 0)]
    accumulate_gradients(model, batches, [1.0, 0.0], lm_step, lm_count, acc)
    torch.testing.assert_close(torch.cat([p.grad.flatten() for p in model.parameters()]), grad, atol=1e-7, rtol=1e-6)
