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


def _resume_cfg(model_dir, data, out, **kw):
    """Adaptive beta and a high lr: a resume that dropped beta or the optimizer state would show."""
    base = dict(model=str(model_dir), data=str(data), output_dir=str(out), reward=["tests.train.test_grpo:contains_seven"],
                rollout_batch_size=8, batch_size=4, ppo_epochs=2, max_new_tokens=6, lr=5e-3, beta=0.05, target_kl=0.5,
                kl_horizon=20.0, log_steps=1, seed=3)
    return ppo.PPOConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def stopped_run(tiny_model_dir, tmp_path_factory):
    """A PPO run stopped after 2 of 4 steps, with checkpoint-1 and checkpoint-2 (12 prompts, 8 per step: steps 3-4 start the second epoch)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("ppo_resume")
    data = _prompts(root / "p.jsonl", n=12)
    ppo.run(_resume_cfg(tiny_model_dir, data, root / "stopped", max_steps=2, save_steps=1))
    yield root / "stopped", data
    torch.set_num_threads(threads)


def _copy_run(src, dst):
    import shutil

    return shutil.copytree(src, dst)


def test_ppo_resumed_at_step_2_reproduces_the_uninterrupted_run(tiny_model_dir, tmp_path, stopped_run, one_thread):
    import torch
    from safetensors.torch import load_file

    stopped, data = stopped_run
    full = ppo.run(_resume_cfg(tiny_model_dir, data, tmp_path / "full", max_steps=4))
    resumed_dir = _copy_run(stopped, tmp_path / "resumed")
    resumed = ppo.run(_resume_cfg(tiny_model_dir, data, resumed_dir, max_steps=4, resume="auto"))
    assert [h["step"] for h in resumed] == [3, 4]
    assert resumed == full[2:]  # every metric, beta included, after step 2
    assert full[-1]["train/beta"] != 0.05  # the adaptive beta moved, so its restoration is tested
    for sub in ("model.safetensors", "value/model.safetensors"):  # policy and critic
        a, b = load_file(tmp_path / "full" / sub), load_file(resumed_dir / sub)
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)


def test_ppo_checkpoint_is_sealed_and_loads_into_plain_transformers(stopped_run):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from alignkit.train.loop import checkpoint_problem, latest_checkpoint, load_state

    stopped, _ = stopped_run
    ckpt = latest_checkpoint(stopped)
    assert ckpt == stopped / "checkpoint-2" and checkpoint_problem(ckpt) is None
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert {"model.safetensors", "value/model.safetensors", "training_state.pt", "rng_state_0.pt"} <= set(manifest)
    AutoModelForCausalLM.from_pretrained(ckpt)
    AutoModelForSequenceClassification.from_pretrained(ckpt / "value")
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["beta"] > 0 and state["batch_size"] == 8
    assert set(load_state(ckpt / "training_state.pt")) == {"optimizer", "scheduler"}
    assert set(load_state(ckpt / "rng_state_0.pt")) >= {"python", "numpy", "torch"}


def test_ppo_refuses_a_corrupt_or_incomplete_checkpoint(tiny_model_dir, tmp_path, stopped_run):
    from alignkit.train.loop import TrainingError, latest_checkpoint

    stopped, data = stopped_run
    run_dir = _copy_run(stopped, tmp_path / "run")
    critic = run_dir / "checkpoint-2/value/model.safetensors"
    critic.write_bytes(critic.read_bytes()[:-7] + b"garbage")
    with pytest.raises(TrainingError, match="not a complete checkpoint: value/model.safetensors"):
        ppo.run(_resume_cfg(tiny_model_dir, data, run_dir, max_steps=4, resume=str(run_dir / "checkpoint-2")))
    assert latest_checkpoint(run_dir).name == "checkpoint-1"  # resume=auto passes over it
    (run_dir / "checkpoint-1/manifest.json").unlink()  # a save that never finished
    with pytest.raises(TrainingError, match="the save did not finish"):
        ppo.run(_resume_cfg(tiny_model_dir, data, run_dir, max_steps=4, resume=str(run_dir / "checkpoint-1")))


def test_ppo_resume_refuses_a_changed_rollout_batch_size(tiny_model_dir, tmp_path, stopped_run, one_thread):
    from alignkit.train.loop import TrainingError

    stopped, data = stopped_run
    run_dir = _copy_run(stopped, tmp_path / "run")
    changed = dict(max_steps=3, resume="auto", rollout_batch_size=4)
    with pytest.raises(TrainingError, match=r"batch_size: 8 -> 4.*allow_resume_mismatch"):
        ppo.run(_resume_cfg(tiny_model_dir, data, run_dir, **changed))
    history = ppo.run(_resume_cfg(tiny_model_dir, data, run_dir, allow_resume_mismatch=True, **changed))
    assert [h["step"] for h in history] == [3]


def test_ppo_with_a_value_head_on_the_policy_backbone_learns_and_resumes(tiny_model_dir, tmp_path, monkeypatch, one_thread):
    """share_backbone: no critic checkpoint is loaded, the reward rises as with a separate
    critic, and a resumed run reproduces the uninterrupted one."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import alignkit.models.reward

    def no_critic_copy(*args, **kwargs):
        raise AssertionError("a separate critic was loaded")

    monkeypatch.setattr(alignkit.models.reward, "load_reward_backbone", no_critic_copy)
    prompts = _prompts(tmp_path / "prompts.jsonl")
    history = ppo.run(ppo.PPOConfig(model=str(tiny_model_dir), data=str(prompts), output_dir=str(tmp_path / "ppo"),
                                    reward=["tests.train.test_grpo:contains_seven"], share_backbone=True, max_steps=30,
                                    rollout_batch_size=16, batch_size=8, ppo_epochs=4, max_new_tokens=8, lr=5e-3,
                                    beta=0.02, vf_coef=0.1, log_steps=1, seed=1))
    first, last = history[:5], history[-5:]
    mean = lambda rows, k: sum(h[k] for h in rows) / len(rows)  # noqa: E731
    assert mean(last, "train/reward") > mean(first, "train/reward") + 0.3, (first, last)
    assert not (tmp_path / "ppo" / "value").exists() and (tmp_path / "ppo" / ppo.VALUE_HEAD_FILE).exists()
    AutoModelForCausalLM.from_pretrained(tmp_path / "ppo")  # the policy alone, loadable by plain transformers

    cfg = lambda out, **kw: _resume_cfg(tiny_model_dir, prompts, out, share_backbone=True, **kw)  # noqa: E731
    full = ppo.run(cfg(tmp_path / "full", max_steps=4))
    ppo.run(cfg(tmp_path / "resumed", max_steps=2, save_steps=1))
    resumed = ppo.run(cfg(tmp_path / "resumed", max_steps=4, resume="auto"))
    assert resumed == full[2:]
    for name in ("model.safetensors", ppo.VALUE_HEAD_FILE):
        a, b = load_file(tmp_path / "full" / name), load_file(tmp_path / "resumed" / name)
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)


def test_shared_backbone_values_read_the_policy_hidden_state_at_each_column(tiny_model_dir):
    """One forward gives log pi and V(s_t) = w^T h_t + b, h the policy's last hidden state at the
    same columns as the log-probs: equal to separate passes."""
    import torch
    from transformers import AutoModelForCausalLM

    from alignkit.models.forward import forward_logprobs

    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    head = ppo.ValueHead(policy.config.hidden_size)
    torch.nn.init.normal_(head.score.weight)
    both = ppo.PolicyAndValue(policy, head)
    ids = torch.randint(3, policy.config.vocab_size, (3, 9))
    attn = torch.ones_like(ids)
    attn[0, :3] = 0  # a left-padded row
    columns = torch.arange(4, 8)
    with torch.no_grad():
        logprobs, _, values = both.logprobs_and_values(ids, attn, 0.7, columns)
        expected_logprobs, _ = forward_logprobs(policy, ids, attn, 0.7, columns=columns)
        hidden = policy.model(input_ids=ids, attention_mask=attn,
                              position_ids=(attn.cumsum(-1) - 1).clamp(min=0)).last_hidden_state
    torch.testing.assert_close(logprobs, expected_logprobs)
    torch.testing.assert_close(values, head.score(hidden[:, columns]).squeeze(-1))
