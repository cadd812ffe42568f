"""A non-finite loss stops training by default, or skips the step leaving weights unchanged."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from alignkit.data import pad_batch
from alignkit.train.common import lm_count, lm_step
from alignkit.train.loop import TrainConfig, TrainingError, train


def _examples(n=8):
    return [{"id": i, "input_ids": [1, 40 + i, 41, 42, 2], "loss_mask": [0, 0, 1, 1, 1]} for i in range(n)]


def _poisoned_step(model, batch):
    loss_sum, metrics = lm_step(model, batch)
    if 5 in batch["ids"].tolist():
        loss_sum = loss_sum * float("nan")
    return loss_sum, metrics


def _run(tiny_model_dir, tiny_tokenizer, out, **kw):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    cfg = TrainConfig(output_dir=str(out), batch_size=8, max_steps=1, lr=1e-2, log_steps=1, **kw)
    return model, train(cfg, model, tiny_tokenizer, _examples(), _poisoned_step, lm_count,
                        lambda b: pad_batch(b, 0), name="nan-test")


def test_nan_stops_with_step_and_example_ids(tiny_model_dir, tiny_tokenizer, tmp_path):
    with pytest.raises(TrainingError, match=r"step 1: non-finite loss \(example ids \[.*5.*\]\)"):
        _run(tiny_model_dir, tiny_tokenizer, tmp_path)


def test_nan_skip_leaves_weights_bitwise_unchanged_and_counts(tiny_model_dir, tiny_tokenizer, tmp_path):
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    model, result = _run(tiny_model_dir, tiny_tokenizer, tmp_path, on_nan="skip")
    assert result.skipped_steps == 1
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k].cpu()) for k in before)
