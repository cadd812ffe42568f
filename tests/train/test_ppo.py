"""PPO end to end: a reward model learned from preferences, then PPO against it."""

import json
import random

import pytest

from alignkit.models.reward import RewardModel
from alignkit.rollout.sampler import sample
from alignkit.models.value import PolicyAndValue, ValueHead
from alignkit.train import ppo, reward
from tests.helpers import contains_seven, prompts_file


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


def _sampled_scores(model_dir, prompts_path, rm, per_prompt=4):
    """Mean reward-model score and gold reward of sampled completions (fixed seed) of every prompt."""
    import torch
    from transformers import AutoModelForCausalLM

    from alignkit.data import load_records, pad_batch, tokenize_prompts
    from alignkit.models.load import load_tokenizer

    tok = load_tokenizer(str(model_dir))
    examples, _ = tokenize_prompts(load_records(str(prompts_path), "prompts"), tok, 64)
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
    prompts = prompts_file(tmp_path / "prompts.jsonl")
    history = ppo.run(ppo.PPOConfig(model=str(tiny_model_dir), data=str(prompts), output_dir=str(tmp_path / "ppo"),
                                    reward=[str(rm_dir)], max_steps=30, rollout_batch_size=16, batch_size=8,
                                    ppo_epochs=4, max_new_tokens=8, lr=5e-3, beta=0.02, log_steps=1, seed=1)).history
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
    on a slice: the ratio is 1 within 1e-6 and nothing is clipped, whatever the split."""
    history = ppo.run(ppo.PPOConfig(model=str(tiny_model_dir), data=str(prompts_file(tmp_path / "p.jsonl")),
                                    output_dir=str(tmp_path / "ppo"), reward=["tests.helpers:contains_seven"],
                                    max_steps=2, rollout_batch_size=16, batch_size=batch_size, ppo_epochs=2,
                                    max_new_tokens=8, lr=5e-3, log_steps=1, seed=1)).history
    for h in history:
        assert h["train/first_minibatch_ratio_dev"] < 1e-6 and h["train/first_minibatch_clipfrac"] == 0.0


def _resume_cfg(model_dir, data, out, **kw):
    """Adaptive beta and a high lr: a resume that dropped beta or the optimizer state would show."""
    base = dict(model=str(model_dir), data=str(data), output_dir=str(out), reward=["tests.helpers:contains_seven"],
                rollout_batch_size=8, batch_size=4, ppo_epochs=2, max_new_tokens=6, lr=5e-3, beta=0.05, target_kl=0.5,
                kl_horizon=20.0, log_steps=1, seed=3)
    return ppo.PPOConfig(**{**base, **kw})


class _Killed(Exception):
    pass


def _run_killed_after(cfg, step):
    """Run `cfg` as if killed right after it sealed checkpoint-`step`: the same max_steps, so the
    same lr schedule, as the uninterrupted run it is compared with."""
    from alignkit.train import loop

    real = loop.save_checkpoint

    def save_then_die(*args, **kwargs):
        path = real(*args, **kwargs)
        if path.name == f"checkpoint-{step}":
            raise _Killed
        return path

    with pytest.MonkeyPatch.context() as mp, pytest.raises(_Killed):
        mp.setattr(loop, "save_checkpoint", save_then_die)
        ppo.run(cfg)


@pytest.fixture(scope="module")
def stopped_run(tiny_model_dir, tmp_path_factory):
    """A 4-step PPO run killed after step 2, with checkpoint-1 and checkpoint-2 (12 prompts, 8 per step: steps 3-4 start the second epoch)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("ppo_resume")
    data = prompts_file(root / "p.jsonl", n=12)
    _run_killed_after(_resume_cfg(tiny_model_dir, data, root / "stopped", max_steps=4, save_steps=1), 2)
    yield root / "stopped", data
    torch.set_num_threads(threads)


def _untimed(history):
    """Logged rows without the throughput, the one metric a resumed run does not repeat."""
    return [{k: v for k, v in h.items() if k != "train/tokens_per_s"} for h in history]


def _copy_run(src, dst):
    import shutil

    return shutil.copytree(src, dst)


def test_ppo_resumed_at_step_2_reproduces_the_uninterrupted_run(tiny_model_dir, tmp_path, stopped_run, one_thread):
    import torch
    from safetensors.torch import load_file

    stopped, data = stopped_run
    full = ppo.run(_resume_cfg(tiny_model_dir, data, tmp_path / "full", max_steps=4)).history
    resumed_dir = _copy_run(stopped, tmp_path / "resumed")
    resumed = ppo.run(_resume_cfg(tiny_model_dir, data, resumed_dir, max_steps=4, resume="auto")).history
    assert [h["step"] for h in resumed] == [3, 4]
    assert _untimed(resumed) == _untimed(full[2:])  # every metric, beta included, after step 2
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
    assert state["step"] == 2 and state["state"]["beta"] > 0 and state["batch_size"] == 8
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
    history = ppo.run(_resume_cfg(tiny_model_dir, data, run_dir, allow_resume_mismatch=True, **changed)).history
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
    prompts = prompts_file(tmp_path / "prompts.jsonl")
    history = ppo.run(ppo.PPOConfig(model=str(tiny_model_dir), data=str(prompts), output_dir=str(tmp_path / "ppo"),
                                    reward=["tests.helpers:contains_seven"], share_backbone=True, max_steps=30,
                                    rollout_batch_size=16, batch_size=8, ppo_epochs=4, max_new_tokens=8, lr=5e-3,
                                    beta=0.02, vf_coef=0.1, log_steps=1, seed=1)).history
    first, last = history[:5], history[-5:]
    mean = lambda rows, k: sum(h[k] for h in rows) / len(rows)  # noqa: E731
    assert mean(last, "train/reward") > mean(first, "train/reward") + 0.3, (first, last)
    assert not (tmp_path / "ppo" / "value").exists() and (tmp_path / "ppo" / ppo.VALUE_HEAD_FILE).exists()
    AutoModelForCausalLM.from_pretrained(tmp_path / "ppo")  # the policy alone, loadable by plain transformers

    cfg = lambda out, **kw: _resume_cfg(tiny_model_dir, prompts, out, share_backbone=True, **kw)  # noqa: E731
    full = ppo.run(cfg(tmp_path / "full", max_steps=4)).history
    _run_killed_after(cfg(tmp_path / "resumed", max_steps=4, save_steps=1), 2)
    resumed = ppo.run(cfg(tmp_path / "resumed", max_steps=4, resume="auto")).history
    assert _untimed(resumed) == _untimed(full[2:])
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
    head = ValueHead(policy.config.hidden_size)
    torch.nn.init.normal_(head.score.weight)
    both = PolicyAndValue(policy, head)
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


def prompt_number_and_length(prompts, completions, **_):
    """A reward that tells prompts and completions apart: a in "What is a+b?" plus len(completion) / 100."""
    return [float(p.split()[2].split("+")[0]) + len(c) / 100 for p, c in zip(prompts, completions)]


def _small_cfg(model_dir, data, out, **kw):
    base = dict(model=str(model_dir), data=str(data), output_dir=str(out), reward=["tests.helpers:digit_fraction"],
                rollout_batch_size=8, batch_size=4, ppo_epochs=2, max_new_tokens=6, lr=1e-3, log_steps=1, seed=1)
    return ppo.PPOConfig(**{**base, **kw})


def test_ppo_lr_schedule_counts_optimiser_updates(tiny_model_dir, tmp_path, one_thread):
    """lr_scheduler, warmup_ratio and min_lr_ratio act on PPO's optimiser updates. 12 prompts, 8 per
    step: steps of 8, 4, 8 prompts; minibatches of 4, 2 epochs: 4 + 2 + 4 = 10 updates, of which
    round(0.2 * 10) = 2 warm up from 0, then a cosine from lr down to min_lr_ratio * lr."""
    import math

    from torch.optim.optimizer import register_optimizer_step_pre_hook

    lrs = []  # the lr of every optimiser update, read just before it
    hook = register_optimizer_step_pre_hook(lambda opt, *_: lrs.append(opt.param_groups[0]["lr"]))
    try:
        result = ppo.run(_small_cfg(tiny_model_dir, prompts_file(tmp_path / "p.jsonl", n=12), tmp_path / "ppo",
                                    max_steps=3, lr_scheduler="cosine_with_min_lr", warmup_ratio=0.2, min_lr_ratio=0.5))
    finally:
        hook.remove()
    lr, warmup, total, floor = 1e-3, 2, 10, 0.5
    cosine = [lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (i - warmup) / (total - warmup))))
              for i in range(warmup, total)]
    assert lrs == pytest.approx([0.0, 0.5e-3] + cosine, rel=1e-9, abs=1e-15)
    assert lrs[2] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-3 * (0.5 + 0.25 * (1 + math.cos(7 * math.pi / 8))))
    assert [h["train/lr"] for h in result.history] == pytest.approx([cosine[2], cosine[4], 0.5e-3])  # the next update's


def test_ppo_grad_accum_splits_each_minibatch_without_changing_the_update(tiny_model_dir, tmp_path, monkeypatch,
                                                                          one_thread):
    """grad_accum 2 runs each minibatch of 8 as two forwards of 4 whose gradients add up to the
    minibatch's: every update's gradient (no clipping, so a wrong scale would show) and the final
    policy and critic equal grad_accum 1's within 1e-6."""
    import torch
    from safetensors.torch import load_file
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    rows, grads = [], []
    real_forward = ppo.PolicyAndValue.forward

    def counting_forward(self, ids, *args):
        rows.append(len(ids))
        return real_forward(self, ids, *args)

    monkeypatch.setattr(ppo.PolicyAndValue, "forward", counting_forward)
    hook = register_optimizer_step_pre_hook(
        lambda opt, *_: grads.append(torch.cat([p.grad.flatten() for g in opt.param_groups for p in g["params"]])))
    data = prompts_file(tmp_path / "p.jsonl", n=16)
    runs = {}
    try:
        for k in (1, 2):
            rows.clear()
            ppo.run(_small_cfg(tiny_model_dir, data, tmp_path / f"accum{k}", max_steps=2, rollout_batch_size=16,
                               batch_size=8, grad_accum=k, max_grad_norm=0.0, reward=["tests.helpers:digit_fraction"]))
            runs[k] = (list(rows), list(grads))
            grads.clear()
    finally:
        hook.remove()
    assert runs[1][0] == [8] * 8 and runs[2][0] == [4] * 16  # 2 steps x 2 epochs x 2 minibatches
    assert len(runs[1][1]) == len(runs[2][1]) == 8
    for one, two in zip(runs[1][1], runs[2][1]):
        assert float((one - two).abs().max()) <= 1e-6 * max(1.0, float(one.abs().max()))
    for name in ("model.safetensors", "value/model.safetensors"):
        a, b = load_file(tmp_path / "accum1" / name), load_file(tmp_path / "accum2" / name)
        assert a.keys() == b.keys() and all(float((a[k] - b[k]).abs().max()) <= 1e-6 for k in a)


def _poison_updates(monkeypatch, which):
    """PPO's clipped policy loss turns NaN in the minibatch updates numbered in `which` (1-based, over the run)."""
    real, calls = ppo.clipped_policy_loss, []

    def poisoned(*args, **kwargs):
        loss, metrics = real(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan") if len(calls) in which else loss), metrics

    monkeypatch.setattr(ppo, "clipped_policy_loss", poisoned)


def test_ppo_nan_loss_stops_naming_the_step(tiny_model_dir, tmp_path, monkeypatch, one_thread):
    from alignkit.train.loop import TrainingError

    _poison_updates(monkeypatch, {6})  # step 2 (4 updates per step), its second update
    expected = r"step 2, update 2 of 4: non-finite loss \(example ids \[.*\]\).*on_nan=skip"
    with pytest.raises(TrainingError, match=expected):
        ppo.run(_small_cfg(tiny_model_dir, prompts_file(tmp_path / "p.jsonl", n=16), tmp_path / "ppo", max_steps=2))


def test_ppo_nan_skip_drops_only_that_update_and_counts_it(tiny_model_dir, tmp_path, monkeypatch, one_thread):
    """on_nan skip: an update with a NaN loss leaves the weights (policy and critic backbone)
    bitwise unchanged; with one bad update of four the run trains on, finite, and counts it."""
    import torch
    from safetensors.torch import load_file

    data = prompts_file(tmp_path / "p.jsonl", n=8)
    _poison_updates(monkeypatch, set(range(1, 5)))  # every update of the one step
    result = ppo.run(_small_cfg(tiny_model_dir, data, tmp_path / "all", max_steps=1, on_nan="skip"))
    assert result.skipped_steps == 4 and result.history[-1]["train/skipped_updates"] == 4
    start = load_file(tiny_model_dir / "model.safetensors")
    policy, critic = load_file(tmp_path / "all/model.safetensors"), load_file(tmp_path / "all/value/model.safetensors")
    assert policy.keys() == start.keys() and all(torch.equal(policy[k], start[k]) for k in start)
    backbone = [k for k in critic if k in start]
    assert len(backbone) > 10 and all(torch.equal(critic[k], start[k]) for k in backbone)

    _poison_updates(monkeypatch, {2})  # the second of four
    result = ppo.run(_small_cfg(tiny_model_dir, data, tmp_path / "one", max_steps=1, on_nan="skip"))
    assert result.skipped_steps == 1 and result.history[-1]["train/skipped_updates"] == 1
    policy = load_file(tmp_path / "one/model.safetensors")
    assert all(torch.isfinite(v).all() for v in policy.values())
    assert any(not torch.equal(policy[k], start[k]) for k in start)  # the other three updates trained


def _greedy_reward(model_dir, records, max_new_tokens):
    """Mean `prompt_number_and_length` of each prompt's greedy completion, one prompt at a time,
    and the completions."""
    import torch
    from transformers import AutoModelForCausalLM

    from alignkit.data import tokenize_prompts
    from alignkit.models.load import load_tokenizer

    tok = load_tokenizer(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    examples, _ = tokenize_prompts(records, tok, 256)
    total, texts = 0.0, []
    for ex in examples:
        ids = torch.tensor([ex["input_ids"]])
        roll = sample(model, ids, torch.ones_like(ids), max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, temperature=0.0)
        text = tok.decode(roll.completion_ids[0][roll.completion_mask[0].bool()], skip_special_tokens=True)
        total += prompt_number_and_length([ex["prompt"]], [text])[0]
        texts.append(text)
    return total / len(examples), texts


@pytest.mark.parametrize("held_out", ["eval_fraction", "eval_data"])
def test_ppo_evaluates_greedy_reward_on_held_out_prompts(tiny_model_dir, tmp_path, held_out, one_thread):
    """eval_fraction 0.25 of 16 prompts (eval_steps 1), or an eval_data file (eval_steps 0): greedy
    completions of the held-out prompts scored at the start, every eval_steps and at the end, equal
    to scoring them one by one with the starting and the trained model; 12 prompts are trained on
    (6 per step, one epoch: 2 steps)."""
    from alignkit.data import load_records
    from alignkit.train.common import load_train_eval

    if held_out == "eval_fraction":
        keys = {"data": str(prompts_file(tmp_path / "p.jsonl", n=16)), "eval_fraction": 0.25, "eval_steps": 1}
        eval_at = [0, 1, 2]
    else:
        other = tmp_path / "e.jsonl"
        other.write_text("".join(json.dumps({"prompt": f"What is {a}+{a % 5}?"}) + "\n" for a in (20, 31, 42, 53)))
        keys, eval_at = {"data": str(prompts_file(tmp_path / "p.jsonl", n=12)), "eval_data": str(other)}, [0, 2]
    cfg = _small_cfg(tiny_model_dir, keys.pop("data"), tmp_path / "ppo", max_steps=0, epochs=1.0, rollout_batch_size=6,
                     batch_size=3, lr=5e-2, reward=["tests.train.test_ppo:prompt_number_and_length"], **keys)
    result = ppo.run(cfg)
    rows = [json.loads(line) for line in (tmp_path / "ppo/metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/reward" in r]
    assert [r["step"] for r in evals] == eval_at and [r["step"] for r in rows if "train/reward" in r] == [1, 2]
    held = load_train_eval(cfg, "prompts")[1] if held_out == "eval_fraction" else load_records(str(other), "prompts")
    (before, texts_before), (after, texts_after) = _greedy_reward(tiny_model_dir, held, 6), _greedy_reward(tmp_path / "ppo", held, 6)
    if held_out == "eval_fraction":  # the updates changed these greedy completions: "after" tests the final weights
        assert texts_before != texts_after
    assert evals[0]["eval/reward"] == pytest.approx(before, rel=1e-6)
    assert evals[-1]["eval/reward"] == pytest.approx(after, rel=1e-6)
    assert result.initial_eval_metrics["reward"] == evals[0]["eval/reward"]
    assert result.eval_metrics == {k[len("eval/"):]: v for k, v in evals[-1].items() if k != "step"}


def test_ppo_updates_run_without_dropout(tiny_model_dir, tmp_path, one_thread):
    """A policy (and critic) with attention dropout 0.5: every forward is in eval mode, so the first
    minibatch's ratio pi / pi_old is 1 within 1e-6 (in train mode dropout moves it by far more)."""
    import shutil

    model_dir = shutil.copytree(tiny_model_dir, tmp_path / "dropout")
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.5}))
    history = ppo.run(_small_cfg(model_dir, prompts_file(tmp_path / "p.jsonl", n=8), tmp_path / "ppo", max_steps=1)).history
    assert history[0]["train/first_minibatch_ratio_dev"] < 1e-6 and history[0]["train/first_minibatch_clipfrac"] == 0.0
