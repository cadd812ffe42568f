"""gradient_checkpointing: the same gradients, activations recomputed in the backward."""

import pytest
import torch
from safetensors.torch import load_file

from alignkit.config import ConfigError
from alignkit.train import dpo, ppo, sft
from alignkit.train.loop import load_trainable_model
from tests import helpers


def test_the_layers_checkpoint_and_the_run_is_unchanged(tiny_model_dir, tmp_path, one_thread):
    cfg = sft.SFTConfig(model=str(tiny_model_dir), gradient_checkpointing=True)
    model = load_trainable_model(cfg, None)
    assert model.is_gradient_checkpointing and all(layer.gradient_checkpointing for layer in model.model.layers)
    data = helpers.sft_file(tmp_path / "s.jsonl", 16)
    weights, losses = {}, {}
    for on in (False, True):
        r = sft.run(sft.SFTConfig(model=str(tiny_model_dir), data=str(data), output_dir=str(tmp_path / str(on)),
                                  max_steps=3, batch_size=4, lr=1e-2, log_steps=1, max_length=64,
                                  gradient_checkpointing=on))
        weights[on] = load_file(tmp_path / str(on) / "model.safetensors")
        losses[on] = [h["train/loss"] for h in r.history if "train/loss" in h]
    assert losses[True] == pytest.approx(losses[False], abs=1e-6)
    assert all(torch.allclose(weights[True][k], weights[False][k], atol=1e-6) for k in weights[True])


def test_with_lora_and_dpo(tiny_model_dir, tmp_path, one_thread):
    data = helpers.preference_file(tmp_path / "p.jsonl", 8, 0)
    losses = {}
    for on in (False, True):
        r = dpo.run(dpo.DPOConfig(model=str(tiny_model_dir), data=str(data), output_dir=str(tmp_path / str(on)),
                                  max_steps=2, batch_size=4, lr=1e-2, log_steps=1, max_length=64, lora_r=4,
                                  gradient_checkpointing=on))
        losses[on] = [h["train/loss"] for h in r.history if "train/loss" in h]
    assert losses[True] == pytest.approx(losses[False], abs=1e-6)


def test_ppo_refuses_it():
    with pytest.raises(ConfigError, match="eval mode"):
        ppo.PPOConfig(model="m", data="p.jsonl", reward=["tests.helpers:digit_fraction"],
                      gradient_checkpointing=True).validate()
