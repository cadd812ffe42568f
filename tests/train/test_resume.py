"""Resume restores model, optimizer, scheduler, RNG and data position exactly."""

import json

import pytest

from tests import helpers
import torch
from safetensors.torch import load_file

from alignkit.train import sft
from alignkit.train.loop import TrainingError, latest_checkpoint


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    return helpers.sft_file(tmp_path_factory.mktemp("sftdata") / "sft.jsonl", 30)


def _cfg(model_dir, data, out, **kw):
    base = dict(model=str(model_dir), data=str(data), output_dir=str(out), batch_size=2, grad_accum=2,
                lr=1e-2, log_steps=1, max_length=64, seed=3)
    return sft.SFTConfig(**{**base, **kw})


def _losses(out):
    return {h["step"]: h["train/loss"] for h in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "train/loss" in h}


def _weights(path):
    return load_file(path / "model.safetensors")


def test_resume_mid_run_equals_uninterrupted(tiny_model_dir, sft_file, tmp_path):
    # 30 examples / (2 * 2) = 8 steps per epoch; 20 steps cross two epoch boundaries.
    full = sft.run(_cfg(tiny_model_dir, sft_file, tmp_path / "full", max_steps=20, save_steps=7))
    assert full.steps == 20
    sft.run(_cfg(tiny_model_dir, sft_file, tmp_path / "resumed", max_steps=20, resume=str(tmp_path / "full/checkpoint-7")))
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "resumed")
    assert sorted(b) == list(range(8, 21))  # exactly the 13 remaining steps, none repeated
    assert all(a[s] == b[s] for s in b)  # bitwise, step by step
    wa, wb = _weights(tmp_path / "full"), _weights(tmp_path / "resumed")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_at_epoch_boundary_runs_the_remaining_steps(tiny_model_dir, sft_file, tmp_path):
    # 8 steps per epoch: a checkpoint at step 8 is exactly the end of epoch 1.
    sft.run(_cfg(tiny_model_dir, sft_file, tmp_path / "run", epochs=2, save_steps=8))
    (tmp_path / "run/checkpoint-16").rename(tmp_path / "later")  # keep only the epoch-boundary one
    assert latest_checkpoint(tmp_path / "run").name == "checkpoint-8"
    resumed = sft.run(_cfg(tiny_model_dir, sft_file, tmp_path / "run", epochs=2, save_steps=8, resume="auto"))
    steps_after = [h["step"] for h in resumed.history if "train/loss" in h]
    assert steps_after == list(range(9, 17))


def test_resume_refuses_changed_batch_geometry(tiny_model_dir, sft_file, tmp_path):
    sft.run(_cfg(tiny_model_dir, sft_file, tmp_path / "run", max_steps=4, save_steps=2))
    with pytest.raises(TrainingError, match=r"batch_size: 2 -> 4"):
        sft.run(_cfg(tiny_model_dir, sft_file, tmp_path / "run", max_steps=4, batch_size=4,
                     resume=str(tmp_path / "run/checkpoint-2")))


def test_resume_refuses_changed_data(tiny_model_dir, sft_file, tmp_path):
    sft.run(_cfg(tiny_model_dir, sft_file, tmp_path / "run", max_steps=4, save_steps=2))
    other = tmp_path / "other.jsonl"
    other.write_text(sft_file.read_text().replace("answer", "result"))
    with pytest.raises(TrainingError, match=r"data_fingerprint"):
        sft.run(_cfg(tiny_model_dir, other, tmp_path / "run", max_steps=4, resume="auto"))


def test_every_epoch_visits_each_example_once():
    from alignkit.train.loop import step_indices

    n, global_batch, steps_per_epoch = 30, 4, 8  # the last batch of an epoch holds 2
    for epoch in range(3):
        seen = [i for s in range(steps_per_epoch) for i in step_indices(epoch * steps_per_epoch + s, n, global_batch, steps_per_epoch, seed=3)]
        assert sorted(seen) == list(range(n))  # 0 duplicated, 0 skipped
    assert step_indices(0, n, 4, 8, seed=3) != step_indices(8, n, 4, 8, seed=3)  # reshuffled each epoch


def test_lora_resume_equals_uninterrupted_and_saves_a_plain_model(tiny_model_dir, sft_file, tmp_path):
    from transformers import AutoModelForCausalLM

    full = _cfg(tiny_model_dir, sft_file, tmp_path / "full", max_steps=6, save_steps=3, lora_r=4)
    sft.run(full)
    sft.run(_cfg(tiny_model_dir, sft_file, tmp_path / "resumed", max_steps=6, lora_r=4,
                 resume=str(tmp_path / "full/checkpoint-3")))
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "resumed")
    assert sorted(b) == [4, 5, 6] and all(a[s] == b[s] for s in b)
    wa, wb = _weights(tmp_path / "full"), _weights(tmp_path / "resumed")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (tmp_path / "full/adapter/adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "full").state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    changed = [k for k in base if not torch.equal(base[k], merged[k])]
    assert changed and all("proj" in k for k in changed)  # LoRA touched the linear layers only


def test_resume_refuses_a_changed_process_count(tiny_model_dir, sft_file, tmp_path):
    from alignkit.train.loop import write_manifest

    sft.run(_cfg(tiny_model_dir, sft_file, tmp_path / "run", max_steps=4, save_steps=2))
    ckpt = tmp_path / "run/checkpoint-2"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    (ckpt / "trainer_state.json").write_text(json.dumps({**state, "world_size": 2}))  # saved by 2 processes
    write_manifest(ckpt)
    with pytest.raises(TrainingError, match=r"world_size: 2 -> 1"):
        sft.run(_cfg(tiny_model_dir, sft_file, tmp_path / "run", max_steps=4, resume=str(ckpt)))
