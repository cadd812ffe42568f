"""GRPO / RLOO end to end on a tiny model with a verifiable reward."""

import json

import pytest
import torch
from safetensors.torch import load_file

from alignkit.train import grpo

DIGITS = set("0123456789")


def digit_fraction(prompts, completions, **_):
    """A reward a random model can climb: the share of digits in the completion."""
    return [sum(ch in DIGITS for ch in c) / max(len(c), 1) for c in completions]


def contains_seven(prompts, completions, **_):
    """A verifiable reward: 1 when the completion contains the target token '7'."""
    return [1.0 if "7" in c else 0.0 for c in completions]


def _prompts(path, n=48):
    with path.open("w") as f:
        for a in range(n):
            f.write(json.dumps({"prompt": f"What is {a}+{a % 5}?", "answer": a + a % 5}) + "\n")
    return path


def _cfg(model_dir, data, out, **kw):
    base = dict(model=str(model_dir), data=str(data), output_dir=str(out), reward=["tests.train.test_grpo:digit_fraction"],
                num_generations=4, batch_size=16, max_new_tokens=8, lr=1e-2, beta=0.0, log_steps=1, seed=1,
                eval_fraction=0.0)
    return grpo.GRPOConfig(**{**base, **kw})


def _history(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("batch_size,grad_accum", [(16, 1), (8, 2), (4, 4)])
def test_first_update_is_on_policy(tiny_model_dir, tmp_path, batch_size, grad_accum):
    out = tmp_path / "o"
    grpo.run(_cfg(tiny_model_dir, _prompts(tmp_path / "p.jsonl"), out, max_steps=1, beta=0.04, temperature=0.8,
                  batch_size=batch_size, grad_accum=grad_accum))
    first = _history(out)[0]
    assert first["train/sampler_logprob_gap"] < 1e-5  # sampler and learner agree on every token
    assert first["train/clipfrac"] == 0.0
    assert first["train/kl_per_token"] < 1e-6  # pi == pi_ref before the first update


def test_grpo_climbs_a_verifiable_reward(tiny_model_dir, tmp_path):
    out = tmp_path / "o"
    logs = grpo.run(_cfg(tiny_model_dir, _prompts(tmp_path / "p.jsonl"), out, max_steps=30, beta=0.04,
                         reward=["tests.train.test_grpo:contains_seven"])).history
    rewards = [h["train/reward"] for h in logs if "train/reward" in h]
    early, late = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert late > early + 0.3, (early, late)
    assert all(0 <= h["train/kl_per_token"] < 10 for h in logs)  # KL stays finite


def test_rloo_and_token_level_loss_also_learn(tiny_model_dir, tmp_path):
    out = tmp_path / "o"
    grpo.run(grpo.RLOOConfig(**{**_cfg(tiny_model_dir, _prompts(tmp_path / "p.jsonl"), out, max_steps=30).__dict__,
                                "advantage": "rloo", "loss_level": "token"}))
    rewards = [h["train/reward"] for h in _history(out) if "train/reward" in h]
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.15


def test_grpo_resume_replays_the_same_samples(tiny_model_dir, tmp_path):
    data = _prompts(tmp_path / "p.jsonl")
    grpo.run(_cfg(tiny_model_dir, data, tmp_path / "full", max_steps=6, save_steps=3, beta=0.04))
    grpo.run(_cfg(tiny_model_dir, data, tmp_path / "resumed", max_steps=6, beta=0.04,
                  resume=str(tmp_path / "full/checkpoint-3")))
    a = {h["step"]: h["train/loss"] for h in _history(tmp_path / "full") if "train/loss" in h}
    b = {h["step"]: (h["train/loss"], h["train/reward"]) for h in _history(tmp_path / "resumed") if "train/loss" in h}
    assert sorted(b) == [4, 5, 6] and all(a[s] == b[s][0] for s in b)
    wa, wb = load_file(tmp_path / "full/model.safetensors"), load_file(tmp_path / "resumed/model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_kl_penalised_rewards_by_hand():
    # two completions: log pi - log pi_ref = [0.5, -0.25, (masked) 9] and [1.0, (masked) 9, 9]
    rewards = torch.tensor([1.0, 0.0])
    logprobs = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.75, -9.0], [-1.5, -9.0, -9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # 1 - 0.5 * (0.5 - 0.25) = 0.875 ; 0 - 0.5 * 1.0 = -0.5
    torch.testing.assert_close(grpo.kl_penalised_rewards(rewards, logprobs, ref, mask, 0.5), torch.tensor([0.875, -0.5]))


def test_kl_in_reward_enters_the_advantages_not_the_loss(tiny_model_dir, tmp_path, one_thread):
    from alignkit.data import tokenize_prompts
    from alignkit.models.load import load_causal_lm, load_tokenizer
    from alignkit.rollout.rewards import load_reward_fn
    from alignkit.train.loop import make_accelerator

    cfg = _cfg(tiny_model_dir, "", tmp_path, beta=0.5, kl_in_reward=True, scale_rewards=False, num_generations=4)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    policy = load_causal_lm(str(tiny_model_dir))
    with torch.no_grad():  # a reference that differs from the policy, so the KL is not 0
        ref = load_causal_lm(str(tiny_model_dir))
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))

    def reference(_, fn):
        with torch.no_grad():
            return fn(ref)

    rollouts = grpo.Rollouts(cfg, tokenizer, [load_reward_fn("tests.train.test_grpo:digit_fraction")], reference,
                             make_accelerator(cfg, "grpo"))
    examples, _ = tokenize_prompts([{"prompt": "What is 1+2?"}, {"prompt": "What is 3+4?"}], tokenizer, 64)
    (batch,) = rollouts(policy, [grpo.collate_prompts(examples, tokenizer.pad_token_id)], step=0)
    k1 = ((batch["sampler_logprobs"] - batch["ref_logprobs"]) * batch["completion_mask"]).sum(-1)
    assert k1.abs().max() > 1e-3
    torch.testing.assert_close(batch["rewards_with_kl"], batch["rewards"] - 0.5 * k1)
    by_group = batch["rewards_with_kl"].view(2, 4)
    torch.testing.assert_close(batch["advantages"], (by_group - by_group.mean(-1, keepdim=True)).flatten())
    # no KL term in the loss: the loss equals the one computed with beta's KL taken out entirely
    loss, metrics = grpo.make_policy_step(cfg)(policy, batch)
    plain = {k: v for k, v in batch.items() if k != "ref_logprobs"}
    loss_without, _ = grpo.make_policy_step(cfg)(policy, plain)
    torch.testing.assert_close(loss, loss_without)
    assert "reward_with_kl" in metrics
