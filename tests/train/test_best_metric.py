"""best_metric rolls the final model back to its best evaluation; early_stop_patience stops on it."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from alignkit.config import ConfigError
from alignkit.train import grpo, sft
from alignkit.train.loop import BEST_WEIGHTS, BestEval, TrainingError
from tests import helpers


def test_best_eval_by_hand():
    b = BestEval("reward/gold")  # auto: max
    assert b.mode == "max"
    assert [b.update({"reward/gold": v}, s) for s, v in enumerate([0.1, 0.3, 0.2, 0.3, 0.5])] == [
        True, True, False, False, True]
    assert (b.value, b.step, b.evals_since) == (0.5, 4, 0)
    b.update({"reward/gold": 0.4}, 5)
    assert b.evals_since == 1

    low = BestEval("loss", threshold=0.05)  # auto: min; a gain of 0.05 or less is not a new best
    assert low.mode == "min"
    assert [low.update({"loss": v}, s) for s, v in enumerate([2.0, 1.96, 1.9, float("nan")])] == [True, False, True, False]
    assert (low.value, low.step, low.evals_since) == (1.9, 2, 1)
    assert BestEval("eval_perplexity").mode == "min"
    with pytest.raises(TrainingError, match=r"'reward/gold' is not among the eval metrics \(loss\)"):
        BestEval("reward/gold").update({"loss": 1.0}, 0)


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    return helpers.sft_file(tmp_path_factory.mktemp("best") / "sft.jsonl", 40)


def _sft(model_dir, data, out, **kw):
    return sft.SFTConfig(**{**dict(model=str(model_dir), data=str(data), output_dir=str(out), batch_size=4, lr=1e-2,
                                   log_steps=1, max_length=64, seed=3, eval_fraction=0.25, eval_steps=1,
                                   max_steps=6, best_metric="loss"), **kw})


OVERSHOOT = dict(lr=0.3, lr_scheduler="constant", warmup_ratio=0.0, max_steps=8)


def _evals(out, key):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


def test_final_model_is_the_best_evaluations_weights(tiny_model_dir, sft_data, tmp_path, one_thread):
    # a constant learning rate that overshoots: held-out loss falls and rises; the final model is the lowest one's
    r = sft.run(_sft(tiny_model_dir, sft_data, tmp_path / "run", save_steps=1, **OVERSHOOT))
    losses = _evals(tmp_path / "run", "eval/loss")
    best_step = min(losses, key=losses.get)
    assert r.best["step"] == best_step and r.best["value"] == losses[best_step] and r.best["stopped_at"] is None
    assert r.eval_metrics["loss"] == losses[best_step]
    final = load_file(tmp_path / "run" / "model.safetensors")
    source = tmp_path / "run" / f"checkpoint-{best_step}" if best_step else tiny_model_dir
    kept = load_file(source / "model.safetensors")
    assert all(torch.equal(final[k], kept[k]) for k in final)
    assert not (tmp_path / "run" / BEST_WEIGHTS).exists()  # a working file only
    assert best_step < 8, f"the overshooting run never got worse: {losses}"  # the rollback was exercised


def test_early_stop_after_patience_and_rollback_to_the_start(tiny_model_dir, sft_data, tmp_path, one_thread):
    # no evaluation can beat the first by 1e9: patience 2 stops at step 2, and the model is the initial one
    r = sft.run(_sft(tiny_model_dir, sft_data, tmp_path / "run", early_stop_patience=2, early_stop_threshold=1e9))
    assert r.best == {"stopped_at": 2, "metric": "loss", "value": r.initial_eval_metrics["loss"], "step": 0}
    assert max(_evals(tmp_path / "run", "train/loss")) == 2  # no step after the stop
    final, start = load_file(tmp_path / "run" / "model.safetensors"), load_file(tiny_model_dir / "model.safetensors")
    assert all(torch.equal(final[k], start[k]) for k in final)


def test_resume_keeps_the_best_as_it_was_at_the_checkpoint(tiny_model_dir, sft_data, tmp_path, one_thread):
    full = sft.run(_sft(tiny_model_dir, sft_data, tmp_path / "full", save_steps=1, **OVERSHOOT))
    shutil.copytree(tmp_path / "full" / "checkpoint-3", tmp_path / "cut" / "checkpoint-3")
    resumed = sft.run(_sft(tiny_model_dir, sft_data, tmp_path / "cut", save_steps=1, resume="auto", **OVERSHOOT))
    assert resumed.best == full.best
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_grpo_rolls_back_on_a_watched_gold_reward(tiny_model_dir, tmp_path, one_thread):
    # the proxy (digits) is optimised; the watched source (weight 0) is what the final model is chosen by
    data = helpers.prompts_file(tmp_path / "prompts.jsonl", n=24)
    gold = "tests.helpers:contains_seven"
    r = grpo.run(grpo.GRPOConfig(
        model=str(tiny_model_dir), data=str(data), output_dir=str(tmp_path / "run"), reward=[
            "tests.helpers:digit_fraction", gold], reward_weights=[1.0, 0.0], num_generations=2, batch_size=8,
        max_new_tokens=4, max_steps=4, lr=1e-2, log_steps=1, eval_fraction=0.25, eval_steps=1, save_steps=1,
        best_metric=f"reward/{gold}", seed=0))
    golds = _evals(tmp_path / "run", f"eval/reward/{gold}")
    assert r.best["step"] == max(golds, key=golds.get)  # the first of the highest
    assert r.eval_metrics[f"reward/{gold}"] == max(golds.values())


def test_config_errors():
    with pytest.raises(ConfigError, match="early_stop_patience needs best_metric"):
        sft.SFTConfig(data="x", early_stop_patience=2, eval_steps=5).validate()
    with pytest.raises(ConfigError, match="best_metric loss: no held-out data"):
        sft.SFTConfig(data="x", best_metric="loss").validate()
