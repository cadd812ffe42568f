"""SFT with packing computes the same loss and gradient as without."""

import torch
from transformers import AutoModelForCausalLM

from alignkit.data import pack_examples, pad_batch
from alignkit.train.common import lm_count, lm_step


def test_packed_loss_and_gradient_equal_unpacked(tiny_model_dir):
    g = torch.Generator().manual_seed(1)
    examples = []
    for i, n in enumerate([9, 30, 4, 17, 25, 6]):
        ids = torch.randint(3, 300, (n,), generator=g).tolist()
        examples.append({"id": i, "input_ids": ids, "loss_mask": [0] * (n // 2) + [1] * (n - n // 2)})
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)

    def loss_and_grad(batch):
        model.zero_grad(set_to_none=True)
        loss_sum, _ = lm_step(model, batch)
        (loss_sum / lm_count(batch)).backward()
        return float(loss_sum.detach()), lm_count(batch), torch.cat([p.grad.flatten() for p in model.parameters()])

    packed_rows = pack_examples(examples, max_length=32)
    assert len(packed_rows) < len(examples)
    loss_p, count_p, grad_p = loss_and_grad(pad_batch(packed_rows, 0))
    loss_u, count_u, grad_u = loss_and_grad(pad_batch(examples, 0))
    assert count_p == count_u
    assert abs(loss_p - loss_u) <= 1e-4 * abs(loss_u)
    assert float((grad_p - grad_u).norm() / grad_u.norm()) <= 1e-5
