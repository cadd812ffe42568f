"""GRPO / RLOO options as TRL users set them: loss reductions, clip-higher, GSPO's sequence ratio,
truncated completions out of the loss, an entropy bonus."""

import pytest
import torch

from alignkit.config import ConfigError
from alignkit.losses import aggregate
from alignkit.models.forward import forward_logprobs
from alignkit.ops import entropy_from_logits
from alignkit.train import grpo
from tests.helpers import prompts_file
from tests.train.test_grpo import _cfg, _history, _weights


@pytest.fixture
def rollout(tiny_model_dir, tmp_path):
    """One step's prepared micro-batch (2 prompts x 4 completions) from the tiny model, and its policy."""
    from alignkit.data import tokenize_prompts
    from alignkit.models.load import load_causal_lm, load_tokenizer
    from alignkit.rollout.rewards import load_reward_fn
    from alignkit.train.loop import make_accelerator

    def make(**keys):
        cfg = _cfg(tiny_model_dir, "", tmp_path, **keys)
        tokenizer = load_tokenizer(str(tiny_model_dir))
        policy = load_causal_lm(str(tiny_model_dir))
        rollouts = grpo.Rollouts(cfg, tokenizer, [load_reward_fn("tests.helpers:digit_fraction")], [1.0], None,
                                 make_accelerator(cfg, "grpo"))
        examples, _ = tokenize_prompts([{"prompt": "What is 1+2?"}, {"prompt": "What is 3+4?"}], tokenizer, 64)
        ((batch, *_),) = rollouts(policy, [{**grpo.collate_prompts(examples, tokenizer.pad_token_id), "weight": 1.0}],
                                  step=0).updates[:1]
        return cfg, policy, batch
    return make


def test_truncated_completions_leave_the_loss(rollout):
    cfg, policy, batch = rollout(mask_truncated_completions=True)
    torch.testing.assert_close(batch["loss_mask"], batch["completion_mask"] * batch["ended"][:, None])
    # whatever the sampler did, rule two completions ended and the rest truncated: the loss (sequence level)
    # is the one of those two rows alone
    ended = torch.zeros_like(batch["ended"])
    ended[[1, 6]] = True
    batch = {**batch, "ended": ended, "loss_mask": batch["completion_mask"] * ended[:, None]}
    loss, metrics = grpo.make_policy_step(cfg)(policy, batch)
    rows = torch.tensor([1, 6])
    kept = {k: (v[rows] if torch.is_tensor(v) and v.dim() > 0 and len(v) == 8 and k != "columns" else v)
            for k, v in batch.items()}
    kept["loss_mask"] = kept["completion_mask"]
    kept.pop("shared")  # two rows of their own: also checks the shared rows' loss against separate ones
    plain = grpo.GRPOConfig(**{**cfg.__dict__, "mask_truncated_completions": False, "num_generations": 2})
    loss_kept, _ = grpo.make_policy_step(plain)(policy, kept)
    torch.testing.assert_close(loss, loss_kept, atol=1e-5, rtol=1e-5)
    assert metrics["truncated_masked"][0].item() == 6.0
    assert grpo.unit_count(cfg)(batch) == 2.0  # sequence level: two completions in the loss


def test_entropy_bonus_subtracts_the_aggregated_entropy(rollout):
    cfg, policy, batch = rollout(loss_level="token")
    bonus = grpo.GRPOConfig(**{**cfg.__dict__, "entropy_coef": 0.3})
    loss, _ = grpo.make_policy_step(cfg)(policy, batch)
    loss_bonus, metrics = grpo.make_policy_step(bonus)(policy, batch)
    with torch.no_grad():
        _, logits = forward_logprobs(policy, batch["input_ids"], batch["attention_mask"], cfg.temperature,
                                     columns=batch["columns"])
        entropy_sum, n = aggregate(entropy_from_logits(logits), batch["completion_mask"], "token")
    torch.testing.assert_close(loss_bonus, loss - 0.3 * entropy_sum)
    torch.testing.assert_close(metrics["entropy"][0] / metrics["entropy"][1], entropy_sum / n)


def test_unit_counts_follow_the_loss_level(rollout):
    cfg, _, batch = rollout()
    mask = batch["loss_mask"]
    counts = {level: grpo.unit_count(grpo.GRPOConfig(**{**cfg.__dict__, "loss_level": level}))(batch)
              for level in ("sequence", "grpo", "token", "dapo", "bnpo", "dr_grpo")}
    assert counts == {"sequence": 8.0, "grpo": 8.0, "token": float(mask.sum()), "dapo": float(mask.sum()),
                      "bnpo": 1.0, "dr_grpo": 8.0 * cfg.max_new_tokens}


@pytest.mark.parametrize("level", ["bnpo", "dr_grpo"])
def test_the_new_loss_levels_train(tiny_model_dir, tmp_path, one_thread, level):
    data = prompts_file(tmp_path / "p.jsonl", n=16)
    grpo.run(_cfg(tiny_model_dir, data, tmp_path / level, max_steps=2, loss_level=level))
    rows = [h for h in _history(tmp_path / level) if "train/loss" in h]
    assert len(rows) == 2 and all(r["train/grad_norm"] > 0 for r in rows)


def test_clip_higher_and_sequence_ratio_act_with_mu_above_1(tiny_model_dir, tmp_path, one_thread):
    """mu = 2, clip_eps 0.05: the second update clips. clip_eps_high 10 lifts the upper bound, so fewer tokens
    clip; GSPO's sequence ratio clips whole sequences (another clipfrac, other weights)."""
    data = prompts_file(tmp_path / "p.jsonl", n=8)
    runs = {}
    for name, keys in {"symmetric": {}, "clip_higher": {"clip_eps_high": 10.0},
                       "sequence": {"importance_sampling_level": "sequence"}}.items():
        out = tmp_path / name
        grpo.run(_cfg(tiny_model_dir, data, out, max_steps=1, num_iterations=2, clip_eps=0.05, lr=5e-2,
                      max_grad_norm=0.0, **keys))
        runs[name] = (_history(out)[0]["train/clipfrac"], _weights(out))
    assert runs["symmetric"][0] > 0.05
    assert runs["clip_higher"][0] < runs["symmetric"][0]
    assert runs["sequence"][0] != runs["symmetric"][0]
    for name in ("clip_higher", "sequence"):
        assert any(not torch.equal(runs[name][1][k], runs["symmetric"][1][k]) for k in runs[name][1])


def test_ratio_options_refused_where_the_ratio_is_1():
    for keys in ({"clip_eps_high": 0.28}, {"importance_sampling_level": "sequence"}):
        with pytest.raises(ConfigError, match="exactly 1 with num_iterations 1"):
            grpo.GRPOConfig(model="m", data="p.jsonl", reward=["tests.helpers:digit_fraction"], **keys).validate()
    grpo.GRPOConfig(model="m", data="p.jsonl", reward=["tests.helpers:digit_fraction"], clip_eps_high=0.28,
                    num_iterations=2).validate()


def half_flat(prompts, completions, **_):
    """A reward that cannot tell completions of an even-numbered prompt apart (all 0.5), and can for
    the others (the completion's length)."""
    return [0.5 if int(p.split()[2].split("+")[0]) % 2 == 0 else float(len(c)) for p, c in zip(prompts, completions)]


def test_flat_groups_and_select_groups_by_hand():
    rewards = torch.tensor([1.0, 1.0, 0.0, 2.0, 3.0, 3.0])
    valid = torch.tensor([True, True, True, True, True, False])
    # groups of 2: [1, 1] equal; [0, 2] differ; [3, (masked)] fewer than 2 valid
    assert grpo.flat_groups(rewards, valid, 2).tolist() == [True, False, True]
    out = {"rewards": rewards, "ids": torch.tensor([7, 8, 9]), "columns": torch.arange(6), "weight": 1.0}
    picked = grpo.select_groups(out, torch.tensor([1, 2]), 2)
    assert picked["rewards"].tolist() == [0.0, 2.0, 3.0, 3.0] and picked["ids"].tolist() == [8, 9]
    assert picked["columns"].tolist() == list(range(6)) and picked["weight"] == 1.0


def test_dynamic_sampling_refills_with_learnable_groups(tiny_model_dir, tmp_path):
    from alignkit.data import tokenize_prompts
    from alignkit.models.load import load_causal_lm, load_tokenizer
    from alignkit.rollout.rewards import load_reward_fn
    from alignkit.train.loop import make_accelerator

    tokenizer = load_tokenizer(str(tiny_model_dir))
    policy = load_causal_lm(str(tiny_model_dir))
    records = [{"prompt": f"What is {a}+1?"} for a in range(16)]
    examples, _ = tokenize_prompts(records, tokenizer, 64)
    cfg = _cfg(tiny_model_dir, "", tmp_path, dynamic_sampling=True, num_generations=4)
    rollouts = grpo.Rollouts(cfg, tokenizer, [load_reward_fn("tests.train.test_grpo_options:half_flat")], [1.0], None,
                             make_accelerator(cfg, "grpo"), examples)
    batch = {**grpo.collate_prompts(examples[:4], tokenizer.pad_token_id), "weight": 1.0}  # prompts 0-3: 2 flat
    plan = rollouts(policy, [batch], step=0)
    kept = plan.updates[0]
    groups = sum(len(b["ids"]) for b in kept)
    assert groups == 4  # the micro-batch is full again
    for b in kept:  # only groups with something to learn, each from an odd prompt
        assert not grpo.flat_groups(b["rewards"], b["valid"], 4).any()
        assert all(int(i) % 2 == 1 for i in b["ids"])
    assert plan.metrics["dynamic/dropped_groups"][0].item() >= 2
    assert plan.metrics["dynamic/groups_short"][0].item() == 0


def test_dynamic_sampling_trains(tiny_model_dir, tmp_path, one_thread):
    data = tmp_path / "p.jsonl"
    data.write_text("".join(f'{{"prompt": "What is {a}+1?"}}\n' for a in range(16)))
    grpo.run(_cfg(tiny_model_dir, data, tmp_path / "o", max_steps=2, dynamic_sampling=True,
                  reward=["tests.train.test_grpo_options:half_flat"]))
    rows = [h for h in _history(tmp_path / "o") if "train/loss" in h]
    assert len(rows) == 2 and all(r["train/dynamic/dropped_groups"] > 0 for r in rows)


@pytest.mark.parametrize("trainer", ["grpo", "ppo"])
def test_log_completions_shows_what_the_policy_writes(tiny_model_dir, tmp_path, one_thread, trainer, capsys):
    import json

    from alignkit.train import ppo

    data = prompts_file(tmp_path / "p.jsonl", n=16)
    if trainer == "grpo":
        cfg = _cfg(tiny_model_dir, data, tmp_path / "o", max_steps=2, log_steps=2, log_completions=3)
        grpo.run(cfg)
    else:
        ppo.run(ppo.PPOConfig(model=str(tiny_model_dir), data=str(data), output_dir=str(tmp_path / "o"),
                              reward=["tests.helpers:digit_fraction"], rollout_batch_size=4, batch_size=4,
                              ppo_epochs=1, max_new_tokens=6, max_steps=2, log_steps=2, log_completions=3,
                              eval_fraction=0.0))
    rows = [json.loads(line) for line in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    shown = [r["samples"] for r in rows if "samples" in r]
    assert len(shown) == 1 and len(shown[0]) == 3  # one log step, three completions
    assert all(s["prompt"].startswith("What is") and isinstance(s["reward"], float) for s in shown[0])
    captured = capsys.readouterr()
    assert "sampled completions:" in captured.out + captured.err
