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
    plain = grpo.GRPOConfig(**{**cfg.__dict__, "mask_truncated_completions": False, "num_generations": 2})
    loss_kept, _ = grpo.make_policy_step(plain)(policy, kept)
    torch.testing.assert_close(loss, loss_kept)
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
