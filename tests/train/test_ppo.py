"""PPO end to end: a reward model learned from preferences, then PPO against it."""

import json
import random

import pytest

from alignkit.models.reward import RewardModel
from alignkit.rollout.sampler import sample
from alignkit.train import ppo, reward
from tests.train.test_grpo import _prompts, contains_seven


def _seven_preferences(path, n, seed):
    """Chosen completions contain a '7', rejected ones are the same text without: a reward
    model learns the gold property `contains_seven` from preferences alone."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            a = rng.randint(0, 99)
            base = "".join(rng.choice("0123456789abcdehlnorstw ") for _ in range(rng.randint(3, 8)))
            good = " " + base[: rng.randint(0, len(base))] + "7" + base[rng.randint(0, len(base)):]
            bad = " " + base.replace("7", "")
            f.write(json.dumps({"prompt": f"What is {a}+{a % 5}?", "chosen": good, "rejected": bad}) + "\n")
    return path


def _sampled_scores(model_dir, prompts_file, rm, per_prompt=4):
    """Mean reward-model score and gold reward of sampled completions (fixed seed) of every prompt."""
    import torch
    from transformers import AutoModelForCausalLM

    from alignkit.data import load_records, pad_batch, tokenize_prompts
    from alignkit.models.load import load_tokenizer

    tok = load_tokenizer(str(model_dir))
    examples, _ = tokenize_prompts(load_records(str(prompts_file), "prompts"), tok, 64)
    batch = pad_batch(examples, tok.pad_token_id, side="left")
    roll = sample(AutoModelForCausalLM.from_pretrained(model_dir), batch["input_ids"].repeat_interleave(per_prompt, 0),
                  batch["attention_mask"].repeat_interleave(per_prompt, 0), max_new_tokens=8,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, generator=torch.Generator().manual_seed(0))
    texts = tok.batch_decode(roll.completion_ids.masked_fill(roll.completion_mask == 0, tok.pad_token_id),
                             skip_special_tokens=True)
    prompts = [ex["prompt"] for ex in examples for _ in range(per_prompt)]
    rm_scores, gold = rm.score(prompts, texts), contains_seven(prompts, texts)
    return {"rm": sum(rm_scores) / len(texts), "gold": sum(gold) / len(texts)}


def test_ppo_raises_the_reward_model_score(tiny_model_dir, tmp_path):
    rm_dir = tmp_path / "rm"
    reward.run(reward.RewardConfig(model=str(tiny_model_dir), data=str(_seven_preferences(tmp_path / "p.jsonl", 96, 0)),
                                   eval_data=str(_seven_preferences(tmp_path / "e.jsonl", 32, 1)), output_dir=str(rm_dir),
                                   max_steps=30, batch_size=8, lr=3e-3, log_steps=10))
    prompts = _prompts(tmp_path / "prompts.jsonl")
    history = ppo.run(ppo.PPOConfig(model=str(tiny_model_dir), data=str(prompts), output_dir=str(tmp_path / "ppo"),
                                    reward=[str(rm_dir)], max_steps=30, rollout_batch_size=16, batch_size=8,
                                    ppo_epochs=4, max_new_tokens=8, lr=5e-3, beta=0.02, log_steps=1, seed=1))
    rm = RewardModel.load(str(rm_dir))
    before = _sampled_scores(tiny_model_dir, prompts, rm)
    after = _sampled_scores(tmp_path / "ppo", prompts, rm)
    assert after["rm"] > before["rm"] + 0.3, (before, after)  # in the reward model's normalised units
    assert after["gold"] > before["gold"] + 0.3, (before, after)  # and the gold property behind the preferences
    assert all(abs(h["train/kl_per_completion"]) < 50 for h in history)  # KL stays finite and bounded


def test_ppo_with_zero_advantage_leaves_policy_loss_and_kl_at_zero():
    """A policy equal to its reference with zero advantages: loss 0 and KL 0."""
    import torch

    from alignkit.losses import aggregate, clipped_policy_loss, kl_penalty_loss

    logp = torch.tensor([[-1.2, -0.3, -2.0], [-0.5, -0.7, 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    loss, metrics = clipped_policy_loss(logp, logp.detach(), torch.zeros(2), mask)
    kl = kl_penalty_loss(logp, logp.detach(), mask)
    total, count = aggregate(loss + 0.1 * kl, mask, "token")
    assert float(total.detach()) == 0.0 and float(kl.abs().sum()) == 0.0 and float(metrics["clipfrac"].sum()) == 0.0


@pytest.mark.parametrize("batch_size", [16, 4])
def test_first_ppo_minibatch_is_on_policy(tiny_model_dir, tmp_path, batch_size):
    """pi_old comes from a no-grad pass over the whole rollout; the first minibatch recomputes it
    on a slice in train mode: the ratio is 1 within 1e-6 and nothing is clipped, whatever the split."""
    history = ppo.run(ppo.PPOConfig(model=str(tiny_model_dir), data=str(_prompts(tmp_path / "p.jsonl")),
                                    output_dir=str(tmp_path / "ppo"), reward=["tests.train.test_grpo:contains_seven"],
                                    max_steps=2, rollout_batch_size=16, batch_size=batch_size, ppo_epochs=2,
                                    max_new_tokens=8, lr=5e-3, log_steps=1, seed=1))
    for h in history:
        assert h["train/first_minibatch_ratio_dev"] < 1e-6 and h["train/first_minibatch_clipfrac"] == 0.0
