"""PPO for RLHF (Ouyang et al. 2022; "The N implementation details of RLHF with PPO").

    alignkit ppo --model runs/demo/sft --reward runs/rm --data prompts.jsonl --max_steps 100

Four models: the policy, the frozen reference, the reward, and a critic (`models/value.py`:
a reward-model-shaped checkpoint read at every position, initialised from the first reward
model directory, else the policy; or with `share_backbone` a head on the policy's backbone).

One PPO step is the shared loop's step (`loop.train`) with `prepare` = `plan_step` below:
1. rollout: one completion per prompt for `rollout_batch_size` prompts, scored by `reward`;
2. rewards with KL: r_t = -beta kl_t(log pi, log pi_ref), plus the sequence reward on the
   last token; beta is fixed, or adapts toward `target_kl` (Ziegler et al. 2019);
3. GAE(gamma, lambda) advantages and returns from the critic's values;
4. advantages whitened over the whole rollout (all processes);
5. `ppo_epochs` passes over shuffled minibatches of `batch_size` completions: each one
   optimiser update of the clipped surrogate plus vf_coef x the clipped value loss,
   accumulated over `grad_accum` micro-batches, divided by the minibatch's token count.
The loop does the rest as for every trainer: the lr schedule over the optimiser updates,
`on_nan`, greedy-reward evaluation of held-out prompts every `eval_steps`, checkpoints that
resume exactly (beta included). Every forward runs in eval mode: no dropout, so the first
minibatch's ratio pi / pi_old is exactly 1.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from alignkit.config import require
from alignkit.losses import aggregate, clipped_policy_loss, clipped_value_loss
from alignkit.models.forward import token_stats
from alignkit.models.value import VALUE_HEAD_FILE, PolicyAndValue, load_critic
from alignkit.ops import adaptive_kl_beta, explained_variance, gae, kl_estimator, masked_sum
from alignkit.train.common import print_summary, say
from alignkit.train.loop import (StepPlan, TrainResult, load_trainable_model, make_accelerator, resolve_resume,
                                  step_indices, train)
from alignkit.train.online import (OnlineConfig, ProcessRewardKeys, collate_prompts, greedy_reward, load_process_reward,
                                   load_prompts, load_rewards, process_step_rewards, sample_completions, sample_rows,
                                   whiten_over_processes)
from alignkit.train.reference import make_reference


@dataclass
class PPOConfig(ProcessRewardKeys, OnlineConfig):
    """Online RL with a learned critic and a per-token KL penalty."""

    lr: float = 1e-5
    """Peak learning rate (AdamW) for policy and value model."""
    lr_scheduler: str = "constant"
    """A `transformers.get_scheduler` name over the optimiser updates (steps x ppo_epochs x minibatches)."""
    warmup_ratio: float = 0.0
    """Fraction of the optimiser updates spent warming the learning rate up from 0 (not with constant)."""
    log_completions: int = 0
    """Every log_steps, show N of the step's sampled completions (prompt, completion, reward) on the console,
    in metrics.jsonl ("samples") and in the tracker (0: none)."""
    batch_size: int = 8
    """Completions per PPO minibatch (one optimiser update each), over all processes together."""
    grad_accum: int = 1
    """Micro-batches each minibatch is processed in (less memory per forward); the update is the same."""
    rollout_batch_size: int = 32
    """Prompts sampled per PPO step (one completion each), over all processes together."""
    max_steps: int = 0
    """PPO steps (each a rollout, then ppo_epochs x minibatches updates); 0 means `epochs` passes over the prompts."""
    ppo_epochs: int = 4
    """Passes over each rollout batch."""
    missing_eos_penalty: float = 0.0
    """Subtracted from the reward of completions that hit max_new_tokens without EOS."""
    value_model: str = ""
    """Critic initialisation (empty: the first reward model directory, else the policy `model`)."""
    share_backbone: bool = False
    """Critic = a scalar head on the policy's last hidden state (the value loss also trains the backbone)."""
    beta: float = 0.05
    """Initial KL coefficient of the per-token reward penalty -beta * kl_t."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token KL estimate kl_t (alignkit.ops.kl): k1 = log pi - log pi_ref, whose sum is unbiased; k2; k3."""
    target_kl: float = 0.0
    """KL per completion that the adaptive controller aims for (0: beta stays fixed)."""
    kl_horizon: float = 10000.0
    """Horizon of the adaptive KL controller, in completions."""
    gamma: float = 1.0
    """Discount over completion tokens."""
    lam: float = 0.95
    """GAE lambda."""
    clip_eps: float = 0.2
    """Clip range of the ratio pi / pi_old."""
    vf_clip: float = 0.2
    """Clip range of the value prediction around its rollout-time value."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    ref_model: str = ""
    """Reference model (empty: the starting `model`; with LoRA, the policy with adapters disabled)."""
    ref_dtype: str = "float32"
    """Storage dtype of a loaded reference copy (bfloat16 / float16: half its memory)."""
    process_reward_mode: Literal["delta", "score"] = "delta"
    """Step rewards of `process_reward`: delta = w (p_k - p_{k-1}) (potential-based: they sum to w p_K, so more
    steps earn nothing); score = w p_k at every step."""

    def validate(self) -> None:
        from alignkit.config import ConfigError

        super().validate()
        self.validate_process_reward()
        if self.gradient_checkpointing:  # transformers checkpoints only in training mode
            raise ConfigError("gradient_checkpointing: PPO runs its policy in eval mode (no dropout, so that the "
                              "recomputed log-probs equal the sampler's), where transformers does not checkpoint")
        if self.grad_accum > self.batch_size:
            raise ConfigError(f"grad_accum ({self.grad_accum}) must be <= batch_size ({self.batch_size}): "
                              "a minibatch of batch_size completions is split into grad_accum micro-batches")


def ppo_loss(cfg: PPOConfig, autocast):
    """The loop's `step_fn`: clipped surrogate + vf_coef x clipped value loss of one micro-batch
    (sum over its completion tokens, metric sums over them). The model (a PolicyAndValue,
    through its DDP wrapper) recomputes log pi and V; the batch holds the rollout's tensors.
    On the step's first update pi == pi_old: `first_minibatch_ratio_dev` (mean |ratio - 1|) must be 0."""
    def step(model, batch):
        m = batch["completion_mask"]
        with autocast():  # the precision pi_old was computed at
            logprobs, _, values = model(batch["input_ids"], batch["attention_mask"], cfg.temperature, batch["columns"])
        pg, pg_metrics = clipped_policy_loss(logprobs, batch["old_logprobs"], batch["advantages"], m, cfg.clip_eps)
        vf, vf_metrics = clipped_value_loss(values, batch["old_values"], batch["returns"], cfg.vf_clip, mask=m)
        loss_sum, _ = aggregate(pg + cfg.vf_coef * vf, m, "token")
        metrics = {"policy_loss": masked_sum(pg.detach(), m), "value_loss": masked_sum(vf.detach(), m),
                   "clipfrac": masked_sum(pg_metrics["clipfrac"], m), "approx_kl": masked_sum(pg_metrics["approx_kl"], m),
                   "vf_clipfrac": masked_sum(vf_metrics["vf_clipfrac"], m)}
        if batch["first"]:
            n_tok = m.sum()
            metrics["first_minibatch_ratio_dev"] = (masked_sum((pg_metrics["ratio"] - 1).abs(), m), n_tok)
            metrics["first_minibatch_clipfrac"] = (metrics["clipfrac"], n_tok)
        return loss_sum, metrics
    return step


def plan_step(cfg: PPOConfig, tokenizer, reward_fns, weights, reference, accelerator, kl: dict, step_ids, prm=None):
    """The loop's `prepare`: steps 1-4 on this process's prompts (the loop hands them as one
    micro-batch), then step 5's updates. `step_ids(step)` are the ids of the step's prompts on
    all processes, in order: a minibatch is a set of them, so it is the same on any process count."""
    from alignkit.rollout.rewards import score_rollout


    def prepare(model, batches: list[dict], step: int) -> StepPlan:
        both, (batch,), device = accelerator.unwrap_model(model), batches, accelerator.device
        real = float(batch["weight"])  # 0: a stand-in (no prompt of this step here)
        # --- 1. rollout: sample, score, and the no-grad passes of pi_old, V_old and pi_ref ---
        roll = sample_completions(both.policy, batch, cfg, tokenizer, step, 1, cfg.temperature)
        ids, attn, mask, columns = roll.input_ids, roll.attention_mask, roll.completion_mask, roll.columns
        scores, _, per_source, _ = score_rollout(roll, tokenizer, reward_fns, weights, batch["prompts"], batch["fields"],
                                                 timeout=cfg.reward_timeout, missing_eos_penalty=cfg.missing_eos_penalty)
        scores = scores.to(device)
        with torch.no_grad(), accelerator.autocast():
            old_logprobs, entropy, old_values = both.logprobs_and_values(ids, attn, cfg.temperature, columns, entropy=True)
            entropy = masked_sum(entropy, mask)
        ref_logprobs = reference(both.policy, lambda m: token_stats(m, ids, attn, cfg.temperature, columns=columns).logprobs)

        # --- 2. rewards with KL: -beta kl_t per token, the sequence reward on the last token, each step's
        # process reward (if any) on the step's last token ---
        kl_t = torch.where(mask.bool(), kl_estimator(cfg.kl_estimator)(old_logprobs, ref_logprobs), 0.0)
        rewards = -kl["beta"] * kl_t
        last = mask.sum(-1) - 1
        rewards[torch.arange(len(last), device=device), last] += scores
        if prm is not None:
            step_rewards, step_mask = process_step_rewards(prm, roll, tokenizer, batch["prompts"],
                                                           cfg.process_reward_weight, cfg.process_reward_mode)
            rewards += step_rewards
        # --- 3. GAE, 4. whitening over every process's tokens (a stand-in's count none) ---
        advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
        advantages = whiten_over_processes(advantages, mask if real else torch.zeros_like(mask), accelerator)

        # --- 5. ppo_epochs passes over shuffled minibatches of the step's prompts, one update each ---
        rollout = {"input_ids": ids, "attention_mask": attn, "completion_mask": mask, "old_logprobs": old_logprobs,
                   "old_values": old_values, "advantages": advantages, "returns": returns, "ids": batch["ids"]}
        row_of = {i: r for r, i in enumerate(batch["ids"].tolist())} if real else {}
        everyone = step_ids(step)
        order = torch.Generator().manual_seed(cfg.seed * 7919 + step)
        updates = []
        for _ in range(cfg.ppo_epochs):
            for members in torch.randperm(len(everyone), generator=order).split(cfg.batch_size):
                rows = torch.tensor([row_of[everyone[j]] for j in members.tolist() if everyone[j] in row_of],
                                    dtype=torch.long, device=device)
                # an empty part (none of the minibatch here) joins the all-reduce with weight 0 on row 0
                updates.append([{**{k: v[part if len(part) else rows.new_zeros(1)] for k, v in rollout.items()},
                                 "columns": columns, "weight": 1.0 if len(part) else 0.0, "first": not updates}
                                for part in rows.tensor_split(cfg.grad_accum)])

        n = len(mask) * real
        totals = torch.stack([kl_t.sum() * real, torch.tensor(n, device=device)])
        totals = accelerator.reduce(totals, "sum") if accelerator.num_processes > 1 else totals
        beta = kl["beta"]
        if cfg.target_kl > 0:  # the next step's beta, alike on every process
            kl["beta"] = adaptive_kl_beta(beta, float(totals[0] / totals[1]), cfg.target_kl, cfg.kl_horizon, int(totals[1]))
        tokens = mask.sum() * real
        metrics = {"reward": (scores.sum() * real, n), "reward_with_kl": ((scores.sum() - beta * kl_t.sum()) * real, n),
                   "kl_per_completion": (kl_t.sum() * real, n), "kl_per_token": (kl_t.sum() * real, tokens),
                   "entropy": (entropy * real, tokens), "completion_length": (tokens, n),
                   "ended_with_eos": (roll.ended.float().sum() * real, n), "beta": (beta * real, real),
                   "explained_variance": (explained_variance(old_values, returns, mask) * real, real),
                   # each source's mean; one with weight 0 is watched, not optimised (e.g. a gold reward)
                   **{f"reward/{k}": (v * n, n) for k, v in per_source.items()}}
        if prm is not None:
            metrics["process_reward"] = (step_rewards.sum() * real, n)
            metrics["steps_per_completion"] = (step_mask.sum() * real, n)
        shown = sample_rows(ids, attn, mask, scores, tokenizer, cfg.log_completions) if cfg.log_completions else []
        return StepPlan(updates, metrics, shown)
    return prepare


def run(cfg: PPOConfig) -> TrainResult:

    require(cfg, "model", "reward", "data")
    if cfg.gradient_checkpointing:  # also from Python, where validate() is not called
        raise ValueError("ppo: gradient_checkpointing has no effect on PPO's policy, run in eval mode (no "
                         "dropout) where transformers does not checkpoint; leave it off")
    resume_from = resolve_resume(cfg)  # a corrupt or half-written checkpoint stops here, before any loading
    examples, eval_examples, report, tokenizer = load_prompts(cfg, str(resume_from or cfg.model))
    accelerator = make_accelerator(cfg, "ppo")
    world = accelerator.num_processes
    if cfg.rollout_batch_size % world:
        raise ValueError(f"ppo: rollout_batch_size ({cfg.rollout_batch_size}) counts the prompts of a step over all "
                         f"processes and must be a multiple of the process count ({world})")
    reward_fns, weights = load_rewards(cfg, accelerator.device)
    prm = load_process_reward(cfg, accelerator.device, cfg.reward_dtype)
    policy = load_trainable_model(cfg, resume_from)  # seeds first: new weights (LoRA, the critic's head) repeat
    critic, critic_source = load_critic(policy, cfg.share_backbone, cfg.value_model or next(
        (s for s in cfg.reward if Path(s).is_dir()), cfg.model), resume_from, tokenizer.pad_token_id)
    reference = make_reference(cfg.model, cfg.ref_model, cfg.lora_r > 0, accelerator.device, accelerator.autocast,
                               dtype=cfg.ref_dtype)
    # rollout_batch_size counts a step's prompts over ALL processes (each samples its share):
    # an epoch is the same number of steps, and a minibatch the same prompts, on any process count
    per_process = cfg.rollout_batch_size // world
    steps_per_epoch = -(-len(examples) // cfg.rollout_batch_size)

    def step_ids(step: int) -> list[int]:
        return [examples[i]["id"] for i in step_indices(step, len(examples), cfg.rollout_batch_size, steps_per_epoch, cfg.seed)]

    def updates_per_step(step: int) -> int:  # ppo_epochs x the minibatches of this step's prompts (an epoch's last may be short)
        prompts = min(cfg.rollout_batch_size, len(examples) - (step % steps_per_epoch) * cfg.rollout_batch_size)
        return cfg.ppo_epochs * -(-prompts // cfg.batch_size)

    kl = {"beta": cfg.beta}  # the KL coefficient, which target_kl moves: checkpointed as the loop's `state`
    say(f"ppo: {len(examples)} prompts, {cfg.rollout_batch_size} per step, {cfg.ppo_epochs} epochs of minibatches of "
        f"{cfg.batch_size}; critic from {critic_source}; {len(eval_examples)} held-out prompts; {report}")
    result = train(
        cfg, PolicyAndValue(policy, critic), tokenizer, examples, ppo_loss(cfg, accelerator.autocast),
        lambda b: b["completion_mask"].sum(), lambda b: collate_prompts(b, tokenizer.pad_token_id), name="ppo",
        batch_size=per_process, resume_from=resume_from, accelerator=accelerator, dropout=False, state=kl,
        prepare=plan_step(cfg, tokenizer, reward_fns, weights, reference, accelerator, kl, step_ids, prm),
        updates_per_step=updates_per_step, eval_examples=eval_examples,
        eval_fn=lambda m: greedy_reward(accelerator.unwrap_model(m).policy, eval_examples, tokenizer, reward_fns, weights, cfg,
                                        cfg.rollout_batch_size, accelerator.device))
    print_summary("ppo", result, [f"beta {kl['beta']:.4f}", str(report), "critic saved to " + str(
        Path(cfg.output_dir) / (VALUE_HEAD_FILE if cfg.share_backbone else "value"))])
    return result


def main(argv: list[str] | None = None) -> TrainResult:
    from alignkit.config import parse_config

    return run(parse_config(PPOConfig, sys.argv[1:] if argv is None else argv, prog="alignkit ppo"))
