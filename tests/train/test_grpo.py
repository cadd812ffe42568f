"""GRPO / RLOO end to end on a tiny model with a verifiable reward."""

import json

import pytest
import torch
from safetensors.torch import load_file

from alignkit.train import grpo
from tests.helpers import prompts_file


def _cfg(model_dir, data, out, **kw):
    base = dict(model=str(model_dir), data=str(data), output_dir=str(out), reward=["tests.helpers:digit_fraction"],
                num_generations=4, batch_size=16, max_new_tokens=8, lr=1e-2, beta=0.0, log_steps=1, seed=1,
                eval_fraction=0.0)
    return grpo.GRPOConfig(**{**base, **kw})


def _history(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("batch_size,grad_accum", [(16, 1), (8, 2), (4, 4)])
def test_first_update_is_on_policy(tiny_model_dir, tmp_path, batch_size, grad_accum):
    out = tmp_path / "o"
    grpo.run(_cfg(tiny_model_dir, prompts_file(tmp_path / "p.jsonl"), out, max_steps=1, beta=0.04, temperature=0.8,
                  batch_size=batch_size, grad_accum=grad_accum))
    first = _history(out)[0]
    assert first["train/sampler_logprob_gap"] < 1e-5  # sampler and learner agree on every token
    assert first["train/clipfrac"] == 0.0
    assert first["train/kl_per_token"] < 1e-6  # pi == pi_ref before the first update


def test_grpo_climbs_a_verifiable_reward(tiny_model_dir, tmp_path):
    out = tmp_path / "o"
    logs = grpo.run(_cfg(tiny_model_dir, prompts_file(tmp_path / "p.jsonl"), out, max_steps=30, beta=0.04,
                         reward=["tests.helpers:contains_seven"])).history
    rewards = [h["train/reward"] for h in logs if "train/reward" in h]
    early, late = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert late > early + 0.3, (early, late)
    assert all(0 <= h["train/kl_per_token"] < 10 for h in logs)  # KL stays finite


def test_rloo_and_token_level_loss_also_learn(tiny_model_dir, tmp_path):
    out = tmp_path / "o"
    grpo.run(grpo.RLOOConfig(**{**_cfg(tiny_model_dir, prompts_file(tmp_path / "p.jsonl"), out, max_steps=30).__dict__,
                                "advantage": "rloo", "loss_level": "token"}))
    rewards = [h["train/reward"] for h in _history(out) if "train/reward" in h]
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.15


def test_grpo_resume_replays_the_same_samples(tiny_model_dir, tmp_path):
    data = prompts_file(tmp_path / "p.jsonl")
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

    rollouts = grpo.Rollouts(cfg, tokenizer, [load_reward_fn("tests.helpers:digit_fraction")], [1.0], reference,
                             make_accelerator(cfg, "grpo"))
    examples, _ = tokenize_prompts([{"prompt": "What is 1+2?"}, {"prompt": "What is 3+4?"}], tokenizer, 64)
    ((batch,),) = rollouts(policy, [{**grpo.collate_prompts(examples, tokenizer.pad_token_id), "weight": 1.0}],
                           step=0).updates
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


def _weights(out):
    return load_file(out / "model.safetensors")


def test_num_iterations_makes_the_clip_act(tiny_model_dir, tmp_path, one_thread):
    """mu = 1: the ratio is exactly 1, so clip_eps changes nothing (bitwise). mu = 2: the second
    update on the same samples has moved pi away from the sampler, the clip bites (clipfrac > 0)
    and the weights depend on clip_eps."""
    data = prompts_file(tmp_path / "p.jsonl", n=8)
    runs = {}
    for mu in (1, 2):
        for eps in (0.05, 10.0):
            out = tmp_path / f"mu{mu}-eps{eps}"
            grpo.run(_cfg(tiny_model_dir, data, out, max_steps=1, num_iterations=mu, clip_eps=eps, lr=5e-2,
                          max_grad_norm=0.0))
            runs[mu, eps] = (_history(out)[0]["train/clipfrac"], _weights(out))
    assert runs[1, 0.05][0] == 0.0
    assert all(torch.equal(runs[1, 0.05][1][k], runs[1, 10.0][1][k]) for k in runs[1, 0.05][1])
    assert runs[2, 0.05][0] > 0.05, runs[2, 0.05][0]  # logged metrics are the last (second) update's
    assert runs[2, 10.0][0] == 0.0  # nothing is that far from the sampler
    diff = max(float((runs[2, 0.05][1][k] - runs[2, 10.0][1][k]).abs().max()) for k in runs[2, 0.05][1])
    assert diff > 1e-4, diff


def test_k1_in_the_loss_is_refused_and_rloo_defaults_put_it_in_the_reward():
    from alignkit.config import ConfigError

    with pytest.raises(ConfigError, match="kl_estimator k1 in the loss has zero expected gradient"):
        grpo.GRPOConfig(beta=0.1, kl_estimator="k1").validate()
    rloo = grpo.RLOOConfig()
    assert (rloo.kl_in_reward, grpo.resolved_kl_estimator(rloo), rloo.loss_level, rloo.advantage) == (
        True, "k1", "token", "rloo")
    assert grpo.resolved_kl_estimator(grpo.GRPOConfig()) == "k3"


def test_kl_estimators_in_the_reward_come_from_the_registry():
    # log pi - log pi_ref = d = [0.5, -0.25] on the kept tokens: k2 = d^2 / 2, k3 = e^-d - 1 + d
    import math

    rewards, logprobs = torch.tensor([1.0]), torch.tensor([[-1.0, -2.0, 0.0]])
    ref, mask = torch.tensor([[-1.5, -1.75, -9.0]]), torch.tensor([[1, 1, 0]])
    k2 = 0.5 * (0.5 ** 2 + 0.25 ** 2)
    k3 = (math.exp(-0.5) - 1 + 0.5) + (math.exp(0.25) - 1 - 0.25)
    for name, kl in (("k1", 0.25), ("k2", k2), ("k3", k3)):
        torch.testing.assert_close(grpo.kl_penalised_rewards(rewards, logprobs, ref, mask, 2.0, name),
                                   torch.tensor([1.0 - 2.0 * kl]))


def test_a_kl_budget_raises_beta_over_it_and_never_lowers_it_below_beta(tiny_model_dir, tmp_path, one_thread):
    data = prompts_file(tmp_path / "p.jsonl")
    # under budget: beta stays at its configured value (a ceiling, not a target)
    grpo.run(_cfg(tiny_model_dir, data, tmp_path / "high", beta=0.04, kl_budget=100.0, max_steps=3))
    assert [h["train/beta"] for h in _history(tmp_path / "high")] == pytest.approx([0.04] * 3)
    # over budget from the second step on (step 1 samples pi == pi_ref: KL 0): with 16 completions a step and
    # horizon 16, each step multiplies beta by 1 + clip(KL / budget - 1, -0.2, 0.2) = 1.2
    grpo.run(_cfg(tiny_model_dir, data, tmp_path / "low", beta=0.04, kl_budget=1e-3, kl_horizon=16.0, max_steps=5,
                  save_steps=4))
    history = _history(tmp_path / "low")
    assert all(h["train/kl_per_completion"] > 1e-3 for h in history[1:])
    assert [h["train/beta"] for h in history] == pytest.approx([0.04, 0.04, 0.048, 0.0576, 0.06912])
    saved = json.loads((tmp_path / "low" / "checkpoint-4" / "trainer_state.json").read_text())
    assert saved["state"]["beta"] == pytest.approx(0.04 * 1.2 ** 3)  # the beta of step 5: a resume goes on with it
    with pytest.raises(Exception, match="kl_budget needs beta > 0"):
        _cfg(tiny_model_dir, data, tmp_path / "x", beta=0.0, kl_budget=1.0).validate()
