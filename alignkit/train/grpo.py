"""GRPO (Shao et al. 2024) and RLOO: group-baseline policy gradient, no critic.

    alignkit grpo --model runs/demo/sft --data prompts.jsonl \\
        --reward alignkit.tasks.arithmetic:exact_match --num_generations 8 --max_steps 100
    alignkit rloo --config rloo.yaml

Each prompt is completed G = `num_generations` times by the policy; the rewards of a
group give each completion its advantage: (r - mean) / std (GRPO; `scale_rewards
false` is Dr. GRPO) or r - mean of the others (RLOO). The loss is the clipped
surrogate with ratio pi / pi_old, pi_old being the policy that sampled, plus
beta * KL to the reference (`kl_estimator`, k3 by default), aggregated per sequence
or per token (`loss_level`). With `num_iterations` mu = 1 (the default) each batch of
samples gets one update, so the ratio is exactly 1 and `clip_eps` is inert; with
mu > 1 the same samples get mu updates, pi_old is the sampler's log-probs, and the
clip bounds how far the later updates move (as in the GRPO paper and TRL); the
learning-rate schedule counts the updates. `batch_size` counts completions per
micro-batch, as in TRL: prompts per micro-batch = batch_size / num_generations; a group
is never split.

Where the KL goes decides what is optimised (`kl_in_reward`):
- in the reward (`kl_in_reward true`, RLOO's default; `kl_estimator auto` is k1 there): each
  completion's reward becomes r - beta * sum_t (log pi - log pi_ref)_t (k1, whose sum is
  an unbiased estimate of KL(pi || pi_ref)) before the group advantages, and the loss
  has no KL term. With `scale_rewards false` (or RLOO) and `loss_level token` this is a
  policy gradient of E[r] - beta KL(pi || pi_ref), whose maximiser is pi* ∝ pi_ref exp(r / beta):
  `alignkit rloo`'s defaults, and `grpo --kl_in_reward --scale_rewards
  false --loss_level token` for GRPO.
- in the loss (default): beta * k3, k3 = exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1,
  added per token. On-policy its expected gradient is that of the FORWARD KL(pi_ref || pi),
  not of the reverse KL in the objective, so the run does not converge to pi*.
Scaling advantages by the group's reward std (`scale_rewards true`) multiplies prompt x's
rewards by 1 / std_x: the effective beta becomes beta * std_x, different per prompt.
`loss_level sequence` divides each completion's log-prob gradient by its length: an exact
policy gradient only when lengths are equal (on alignkit/rl/exact.py's problem, beta 1,
the final TV to pi* was 0.012 with it against 0.011 with `token`).
`kl_budget K` makes beta a controller's output: after each step, with KL the step's mean
sum_t k1 over its completions, beta' = max(beta_0, beta (1 + clip(KL / K - 1, -0.2, 0.2) n / kl_horizon))
(PPO's adaptive controller, floored at the configured beta: a ceiling on the KL, not a target).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Literal

import torch

from alignkit.config import require
from alignkit.losses import aggregate, clipped_policy_loss, kl_penalty_loss
from alignkit.losses.policy import aggregation_units, sequence_level_logprobs
from alignkit.models.forward import token_stats
from alignkit.ops import adaptive_kl_beta, advantage_estimator, kl_k1, masked_sum, process_advantages
from alignkit.train.common import print_summary, say
from alignkit.train.loop import StepPlan, TrainResult, load_trainable_model, make_accelerator, resolve_resume, train
from alignkit.train.online import (OnlineConfig, ProcessRewardKeys, collate_prompts, greedy_reward, load_process_reward,
                                   load_prompts, load_rewards, process_step_rewards, sample_completions, sample_rows)
from alignkit.train.reference import make_reference


@dataclass
class GRPOConfig(ProcessRewardKeys, OnlineConfig):
    """Online RL with group baselines: G completions per prompt, scored by `reward`."""

    lr: float = 1e-5
    """Peak learning rate (AdamW)."""
    batch_size: int = 16
    """Completions per micro-batch (prompts per micro-batch = batch_size / num_generations)."""
    num_generations: int = 8
    """G: completions sampled per prompt."""
    reward_on_error: Literal["raise", "mask"] = "raise"
    """A None/NaN/raising reward stops the run, or masks that completion (advantage 0)."""
    missing_eos_penalty: float = 0.0
    """Subtracted from the reward of completions that hit max_new_tokens without EOS."""
    advantage: Literal["grpo", "rloo"] = "grpo"
    """grpo: (r - group mean) / group std; rloo: r - mean of the other completions."""
    scale_rewards: bool = True
    """Divide the advantages by the group's reward std (false: Dr. GRPO)."""
    loss_level: Literal["sequence", "token", "bnpo", "dr_grpo", "grpo", "dapo"] = "sequence"
    """Loss reduction (TRL's loss_type names too): sequence = grpo, each completion's token mean then the mean over
    completions; token = dapo, the mean over the step's tokens; bnpo, the token mean of each micro-batch; dr_grpo,
    the token sum over completions x max_new_tokens (a constant)."""
    beta: float = 0.04
    """KL coefficient: k3 in the loss, or k1 in the reward with `kl_in_reward` (0: no reference model)."""
    kl_in_reward: bool = False
    """Subtract beta * sum_t k1 from each completion's reward before the advantages (no KL in the loss)."""
    kl_estimator: Literal["auto", "k1", "k2", "k3"] = "auto"
    """Per-token KL estimate (alignkit.ops.kl); auto: k3 in the loss, k1 in the reward (`kl_in_reward`)."""
    kl_budget: float = 0.0
    """A ceiling on the KL per completion (sampled k1, nats): while a step's KL exceeds it, beta rises by PPO's controller (Ziegler et al. 2019), and it falls back while under it, never below `beta` (0: beta stays fixed)."""
    kl_horizon: float = 32.0
    """Horizon of the KL-budget controller, in completions: each step moves beta by at most 20% x completions / horizon."""
    clip_eps: float = 0.2
    """PPO clip range of the ratio pi / pi_old (acts only with num_iterations > 1)."""
    clip_eps_high: float = 0.0
    """Upper clip range, 1 + clip_eps_high, when larger than clip_eps: DAPO's clip-higher, TRL's epsilon_high
    (0: clip_eps on both sides; needs num_iterations > 1)."""
    importance_sampling_level: Literal["token", "sequence"] = "token"
    """The ratio pi / pi_old per token, or per sequence as GSPO ((pi(y)/pi_old(y))^(1/|y|) at every token;
    needs num_iterations > 1: at mu = 1 both give the same gradient)."""
    mask_truncated_completions: bool = False
    """Leave completions that hit max_new_tokens without EOS out of the loss (their rewards still enter the
    group's advantages), as DAPO."""
    entropy_coef: float = 0.0
    """Subtract entropy_coef x the policy's per-token entropy from the loss: an entropy bonus (0: none)."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling: drop the groups whose rewards are all equal (advantage 0: nothing to learn) and
    refill the micro-batch with groups of freshly drawn prompts; dropped groups and refills are logged."""
    share_prompt: bool = True
    """The policy's and the reference's forwards on one row per group, [prompt | c1 | ... | cG], each
    completion seeing the prompt and itself: the prompt computed once, not G times (sdpa or eager attention;
    other attention implementations fall back to a row per completion, said at the start)."""
    log_completions: int = 0
    """Every log_steps, show N of the step's sampled completions (prompt, completion, reward) on the console,
    in metrics.jsonl ("samples") and in the tracker (0: none)."""
    max_refills: int = 4
    """With dynamic_sampling: extra prompt batches drawn per micro-batch at most; short of groups after
    that, the step goes on with what it has."""
    num_iterations: int = 1
    """mu: optimiser updates on each batch of samples (a step), pi_old being the sampler (1: ratio exactly 1,
    clip inert); the learning-rate schedule counts updates (steps x mu)."""
    ref_model: str = ""
    """Reference model (empty: the starting `model`; with LoRA, the policy with adapters disabled)."""
    ref_dtype: str = "float32"
    """Storage dtype of a loaded reference copy (bfloat16 / float16: half its memory)."""
    eval_fraction: float = 0.1
    """Fraction of prompts held out for the greedy-reward evaluation when `eval_data` is empty."""
    max_flat_steps: int = 10
    """Stop with an error after this many steps in a row where every advantage is 0 (each group's
    rewards all equal: nothing to learn); 0: never stop."""

    def validate(self) -> None:
        from alignkit.config import ConfigError

        super().validate()
        self.validate_process_reward()
        if self.process_reward and self.advantage != "grpo":
            raise ConfigError("process_reward gives each token the group-normalised rewards of its step and the later "
                              "ones (process_advantages), in the place of the rloo baseline; use advantage grpo")
        if self.num_generations < 2:
            raise ConfigError(f"num_generations must be >= 2 (a group baseline needs two samples), "
                              f"got {self.num_generations}")
        if self.batch_size % self.num_generations:
            raise ConfigError(f"batch_size ({self.batch_size}) counts completions and must be a multiple "
                              f"of num_generations ({self.num_generations})")
        if self.max_refills < 0 or self.log_completions < 0:
            raise ConfigError(f"max_refills and log_completions must be >= 0, got {self.max_refills}, "
                              f"{self.log_completions}")
        if self.max_refills != 4 and not self.dynamic_sampling:
            raise ConfigError(f"max_refills={self.max_refills} is read only with dynamic_sampling on")
        if self.max_flat_steps < 0:
            raise ConfigError(f"max_flat_steps must be >= 0, got {self.max_flat_steps}")
        if self.num_iterations < 1:
            raise ConfigError(f"num_iterations must be >= 1, got {self.num_iterations}")
        if self.clip_eps_high < 0:
            raise ConfigError(f"clip_eps_high must be >= 0, got {self.clip_eps_high}")
        inert = [k for k, on in (("clip_eps_high", self.clip_eps_high > 0),
                                 ("importance_sampling_level sequence", self.importance_sampling_level == "sequence"))
                 if on]
        if inert and self.num_iterations == 1:
            raise ConfigError(f"{inert[0]} acts on the ratio pi / pi_old, which is exactly 1 with num_iterations 1 "
                              "(one update per batch of samples); set num_iterations > 1")
        if self.kl_budget < 0 or (self.kl_budget > 0 and (self.beta <= 0 or self.kl_horizon <= 0)):
            raise ConfigError(f"kl_budget needs beta > 0 (its least value; 0 loads no reference model) and "
                              f"kl_horizon > 0, got kl_budget {self.kl_budget}, beta {self.beta}, "
                              f"kl_horizon {self.kl_horizon}")
        if self.kl_estimator == "k1" and not self.kl_in_reward:
            raise ConfigError("kl_estimator k1 in the loss has zero expected gradient (E[grad log pi] = 0 on "
                              "samples from pi); use k2 or k3 in the loss, or --kl_in_reward for k1 in the reward")


def resolved_kl_estimator(cfg: GRPOConfig) -> str:
    """`kl_estimator` with auto resolved: k1 in the reward (its sum's score-function gradient is
    that of KL(pi || pi_ref)), k3 in the loss (unbiased and >= 0, as the GRPO paper)."""
    if cfg.kl_estimator != "auto":
        return cfg.kl_estimator
    return "k1" if cfg.kl_in_reward else "k3"


def kl_penalised_rewards(rewards, logprobs, ref_logprobs, mask, beta: float, estimator: str = "k1"):
    """r - beta * sum_t m_t kl_t(log pi, log pi_ref): [N], [N, C], [N, C], [N, C] -> [N].

    With k1 (kl_t = log pi - log pi_ref) the per-sequence sum is an unbiased estimate of
    KL(pi || pi_ref) on samples from pi; k2 / k3 come from the same registry (alignkit.ops.kl).
    """
    from alignkit.ops.kl import kl_estimator

    return rewards - beta * masked_sum(kl_estimator(estimator)(logprobs, ref_logprobs), mask, dim=-1)


@dataclass
class RLOOConfig(GRPOConfig):
    """REINFORCE with a leave-one-out baseline (Ahmadian et al. 2024)."""

    advantage: Literal["grpo", "rloo"] = "rloo"
    """grpo: (r - group mean) / group std; rloo: r - mean of the other completions."""
    beta: float = 0.0
    """KL coefficient (0: no reference model); by default k1 in the reward, as Ahmadian et al."""
    kl_in_reward: bool = True
    """Subtract beta * sum_t kl_t (k1 by default) from each completion's reward before the advantages (false: KL in the loss)."""
    loss_level: Literal["sequence", "token", "bnpo", "dr_grpo", "grpo", "dapo"] = "token"
    """Loss reduction: token = dapo (the REINFORCE sum of log-probs over the step's tokens), sequence = grpo, bnpo,
    dr_grpo (see GRPOConfig)."""
    scale_rewards: bool = False
    """Divide the advantages by the group's reward std (RLOO's paper does not; with it the effective beta varies per prompt)."""


class Rollouts:
    """Generates, scores and prepares the micro-batches of one step (the loop's `prepare`)."""

    def __init__(self, cfg: GRPOConfig, tokenizer, reward_fns, weights, reference, accelerator,
                 examples: list[dict] | None = None, prm=None):
        self.cfg, self.tokenizer, self.reward_fns, self.weights, self.reference = cfg, tokenizer, reward_fns, weights, reference
        self.examples = examples or []  # where dynamic sampling draws its refills from
        self.accelerator = accelerator
        self.advantages = advantage_estimator(cfg.advantage)
        self.flat_steps = 0  # steps in a row with every advantage 0
        self.kl = {"beta": cfg.beta}  # the KL coefficient, which kl_budget moves: checkpointed as the loop's `state`
        self.share_prompt = cfg.share_prompt  # `run` turns it off where the attention cannot take the mask
        self.prm = prm  # a ProcessRewardModel: step rewards and process advantages

    def generate(self, model, batch: dict, step: int, temperature: float):
        g = self.cfg.num_generations if temperature > 0 else 1
        return sample_completions(self.accelerator.unwrap_model(model), batch, self.cfg, self.tokenizer, step, g,
                                  temperature)

    def rewards(self, batch: dict, rollout, g: int):
        from alignkit.rollout.rewards import score_rollout

        rewards, valid, per_source, _ = score_rollout(
            rollout, self.tokenizer, self.reward_fns, self.weights, batch["prompts"], batch["fields"], g,
            on_error=self.cfg.reward_on_error, timeout=self.cfg.reward_timeout,
            missing_eos_penalty=self.cfg.missing_eos_penalty)
        return rewards.to(rollout.completion_ids.device), valid.to(rollout.completion_ids.device), per_source

    def __call__(self, model, batches: list[dict], step: int) -> StepPlan:
        cfg, beta = self.cfg, self.kl["beta"]
        prepared, kl, dynamic = [], [0.0, 0], [0.0, 0.0, 0.0]  # kl: sum, count; dropped, refills, short groups
        for batch in batches:
            out = self.prepare(model, batch, step, beta, kl)
            if cfg.dynamic_sampling and float(batch["weight"]) > 0:
                outs, counts = self.refill(model, out, batch, step, beta, kl)
                prepared += outs
                dynamic = [a + b for a, b in zip(dynamic, counts)]
            else:
                prepared.append(out)
        kl_sum, kl_count = kl
        self.check_learnable(prepared, step)
        if cfg.kl_budget > 0:  # the next step's beta from this step's sampled KL, alike on every process
            totals = torch.tensor([kl_sum, kl_count], dtype=torch.float64, device=prepared[0]["valid"].device)
            if self.accelerator.num_processes > 1:
                totals = self.accelerator.reduce(totals, "sum")
            # a ceiling, not a target: under budget beta only returns toward its configured value, so a run that
            # starts at KL 0 does not first shrink beta to nothing (Ziegler's two-sided controller does)
            self.kl["beta"] = max(cfg.beta, adaptive_kl_beta(beta, float(totals[0] / totals[1].clamp(min=1)),
                                                             cfg.kl_budget, cfg.kl_horizon, int(totals[1])))
        metrics = {}
        if cfg.dynamic_sampling:  # per step, summed over processes
            device = prepared[0]["valid"].device
            metrics = {f"dynamic/{k}": (torch.tensor(v, device=device), 1.0)
                       for k, v in zip(("dropped_groups", "refill_batches", "groups_short"), dynamic)}
        shown = []
        if cfg.log_completions:
            first = prepared[0]
            shown = sample_rows(first["input_ids"], first["attention_mask"], first["completion_mask"],
                                first["rewards"], self.tokenizer, cfg.log_completions)
        return StepPlan([prepared] * self.cfg.num_iterations, metrics, shown)  # mu updates on the same samples

    def refill(self, model, out: dict, batch: dict, step: int, beta: float, kl: list) -> tuple[list[dict], list]:
        """DAPO's dynamic sampling for one micro-batch: its groups with all rewards equal are dropped,
        and groups from prompts drawn afresh (seeded by seed, step, process and try) take their place,
        up to `max_refills` draws. Returns the micro-batches to train on (the kept groups of each draw)
        and (groups dropped, draws made, groups still missing)."""
        import random

        g, want, limit = self.cfg.num_generations, len(batch["ids"]), self.cfg.max_refills
        flat = flat_groups(out["rewards"], out["valid"], g)
        kept, have, dropped, draws = [], 0, int(flat.sum()), 0
        if (~flat).any():
            kept.append(select_groups(out, (~flat).nonzero().flatten(), g))
            have = int((~flat).sum())
        rng = random.Random(f"{self.cfg.seed}-{step}-{self.accelerator.process_index}")
        while have < want and draws < limit and self.examples:
            draws += 1
            chosen = [self.examples[i] for i in rng.sample(range(len(self.examples)), min(want, len(self.examples)))]
            extra = {**collate_prompts(chosen, self.tokenizer.pad_token_id), "weight": batch["weight"]}
            extra = {k: v.to(batch["input_ids"].device) if torch.is_tensor(v) else v for k, v in extra.items()}
            # its own generators: a prompt drawn again at this step does not repeat its samples
            o = self.prepare(model, extra, -(step * (limit + 1) + draws), beta, kl)
            f = flat_groups(o["rewards"], o["valid"], g)
            dropped += int(f.sum())
            take = (~f).nonzero().flatten()[: want - have]
            if len(take):
                kept.append(select_groups(o, take, g))
                have += len(take)
        # nothing learnable anywhere: train on the flat batch (its advantages are 0; check_learnable counts it)
        return kept or [out], [dropped, draws, want - have]

    def prepare(self, model, batch: dict, step: int, beta: float, kl: list) -> dict:
        """Sample, score and compute the advantages of one micro-batch of prompts; adds this batch's
        sampled KL to kl = [sum, count] (the KL-budget controller's input)."""
        cfg, g = self.cfg, self.cfg.num_generations
        rollout = self.generate(model, batch, step, cfg.temperature)
        rewards, valid, per_source = self.rewards(batch, rollout, g)
        columns = rollout.columns
        out = {
            "input_ids": rollout.input_ids, "attention_mask": rollout.attention_mask, "columns": columns,
            "completion_mask": rollout.completion_mask, "sampler_logprobs": rollout.logprobs,
            # what the loss reads: without the truncated completions when they are masked
            "loss_mask": rollout.completion_mask * rollout.ended[:, None] if cfg.mask_truncated_completions
            else rollout.completion_mask,
            "rewards": rewards, "valid": valid, "ended": rollout.ended,
            "ids": batch["ids"], "reward_sources": per_source, "weight": batch["weight"], "beta": beta,
        }
        if self.share_prompt and g > 1:
            out["shared"] = shared_rows(rollout, g, self.tokenizer.pad_token_id)
        if cfg.beta > 0:
            out["ref_logprobs"] = self.reference(model, lambda m: completion_token_stats(m, out, cfg.temperature)[0])
            # the sampler's log-probs are pi's at the sampling temperature: k1 of the sampled tokens
            kl[0] += float(masked_sum(rollout.logprobs - out["ref_logprobs"], rollout.completion_mask)
                           * batch["weight"])
            kl[1] += len(rewards) * int(batch["weight"] > 0)
        if cfg.beta > 0 and cfg.kl_in_reward:
            rewards = kl_penalised_rewards(rewards, rollout.logprobs, out["ref_logprobs"], rollout.completion_mask,
                                           beta, resolved_kl_estimator(cfg)).masked_fill(~valid, 0.0)
            out["rewards_with_kl"] = rewards
        if self.prm is None:
            out["advantages"] = self.advantages(rewards, g, scale_by_std=cfg.scale_rewards, valid=valid)
            return out
        # process supervision: w p_k at each step's last token, the outcome (with its KL) added at the last token
        prompts = [p for p in batch["prompts"] for _ in range(g)]
        step_rewards, steps = process_step_rewards(self.prm, rollout, self.tokenizer, prompts, cfg.process_reward_weight)
        out["process_reward"] = step_rewards.sum(-1)
        last = (rollout.completion_mask.sum(-1) - 1).clamp(min=0)
        rows = torch.arange(len(last), device=last.device)
        step_rewards[rows, last] += rewards
        steps[rows, last] = True
        steps &= valid[:, None]
        out["advantages"] = process_advantages(step_rewards, steps, g, scale_by_std=cfg.scale_rewards)
        return out

    def check_learnable(self, prepared: list[dict], step: int) -> None:
        """Stop a run that cannot learn: a step where every reward was invalid (all masked), or
        `max_flat_steps` steps in a row where every advantage is 0. Counted over all processes,
        so every process stops at the same step."""
        from alignkit.train.loop import TrainingError

        device = prepared[0]["valid"].device
        counts = torch.stack([
            sum(out["valid"].sum() for out in prepared).to(device, torch.float64),
            sum((out["advantages"] != 0).sum() for out in prepared).to(device, torch.float64),
        ])
        if self.accelerator.num_processes > 1:
            counts = self.accelerator.reduce(counts, "sum")
        valid, moving = int(counts[0]), int(counts[1])
        if valid == 0:
            raise TrainingError(
                f"step {step + 1}: every reward was invalid (reward_on_error mask masked all of them), so the step "
                "has nothing to learn from; check the reward function on a few completions (reward_on_error raise "
                "shows the first failure)")
        self.flat_steps = 0 if moving else self.flat_steps + 1
        if self.cfg.max_flat_steps and self.flat_steps >= self.cfg.max_flat_steps:
            raise TrainingError(
                f"step {step + 1}: every group's rewards were equal for {self.flat_steps} steps in a row, so every "
                "advantage was 0 and the policy learned nothing; the reward cannot tell this policy's completions "
                "apart (try more num_generations, a higher temperature, a graded reward; or max_flat_steps 0)")


def shared_rows(rollout, g: int, pad_token_id: int) -> dict:
    """A rollout of G completions per prompt as one row per group, [prompt | c1 | ... | cG]
    (`pad_shared_prompt`: each completion sees the prompt and itself, its positions continue
    the prompt's), on the rollout's device."""
    from alignkit.data.tokenize import pad_shared_prompt

    prompts, masks = rollout.prompt_ids.tolist(), rollout.prompt_mask.tolist()
    completions, kept = rollout.completion_ids.tolist(), rollout.completion_mask.tolist()
    examples = []
    for i in range(len(prompts) // g):
        prompt = [t for t, m in zip(prompts[i * g], masks[i * g]) if m]
        rows = [[t for t, m in zip(completions[i * g + k], kept[i * g + k]) if m] for k in range(g)]
        examples.append({"id": i, "sequences": [prompt + c for c in rows],
                         "loss_masks": [[0] * len(prompt) + [1] * len(c) for c in rows]})
    device = rollout.completion_ids.device
    return {k: v.to(device) for k, v in pad_shared_prompt(examples, pad_token_id).items()}


def completion_token_stats(model, batch: dict, temperature: float, entropy: bool = False):
    """(log-probs, entropies or None) [N, C] of a prepared micro-batch's completion tokens: from its
    shared rows when it has them, else from a row per completion (`token_stats` at `columns`)."""
    import torch.nn.functional as F

    from alignkit.models.forward import shared_prompt_token_stats

    if "shared" not in batch:
        stats = token_stats(model, batch["input_ids"], batch["attention_mask"], temperature,
                            columns=batch["columns"], entropy=entropy)
        return stats.logprobs, stats.entropy
    width = batch["completion_mask"].shape[1]
    lp, ent = shared_prompt_token_stats(model, batch["shared"], temperature, entropy)
    fit = lambda x: None if x is None else F.pad(x, (0, width - x.shape[1]))  # noqa: E731 - blocks <= C wide
    return fit(lp), fit(ent)


def flat_groups(rewards, valid, g: int):
    """[N] rewards (and validity) of N / g groups -> [N / g] bool: True where every valid reward of
    the group is equal (or fewer than 2 are valid), so its advantages are all 0: nothing to learn."""
    r = rewards.view(-1, g)
    v = valid.view(-1, g)
    high = torch.where(v, r, -torch.inf).max(-1).values
    low = torch.where(v, r, torch.inf).min(-1).values
    return (v.sum(-1) < 2) | (high == low)


def select_groups(out: dict, groups, g: int) -> dict:
    """The prepared micro-batch `out` restricted to the given groups (indices of prompts): per-completion
    tensors keep those groups' rows, per-prompt `ids` those prompts; shared entries stay."""
    rows = (groups[:, None] * g + torch.arange(g, device=groups.device)).flatten()
    n = len(out["rewards"])
    picked = {}
    for k, v in out.items():
        if k == "ids":
            picked[k] = v[groups.to(v.device)]
        elif k == "shared":  # one row per group
            picked[k] = {name: t[groups.to(t.device)] for name, t in v.items()}
        elif torch.is_tensor(v) and v.dim() > 0 and len(v) == n and k != "columns":
            picked[k] = v[rows.to(v.device)]
        else:
            picked[k] = v
    return picked


def make_policy_step(cfg: GRPOConfig):
    def policy_step(model, batch):
        mask, loss_mask = batch["completion_mask"], batch["loss_mask"]
        logprobs, entropy = completion_token_stats(model, batch, cfg.temperature, bool(cfg.entropy_coef))
        # pi_old is the policy that sampled. With one update per batch of samples that is these
        # very weights: the ratio is exactly 1 and the clip is inert. With mu > 1 it is the
        # sampler's log-probs, and from the second update on the ratio moves and the clip acts.
        old = batch["sampler_logprobs"] if cfg.num_iterations > 1 else logprobs.detach()
        ratio_logprobs = (sequence_level_logprobs(logprobs, old, loss_mask)
                          if cfg.importance_sampling_level == "sequence" else logprobs)
        per_token, m = clipped_policy_loss(ratio_logprobs, old, batch["advantages"], loss_mask, cfg.clip_eps,
                                           cfg.clip_eps_high or None)
        n_seq, n_tok = float(len(mask)), mask.sum()
        metrics = {
            "reward": (batch["rewards"].sum(), n_seq),
            "reward_std_in_group": (batch["rewards"].view(-1, cfg.num_generations).std(-1).sum() if cfg.num_generations > 1 else torch.tensor(0.0), n_seq / cfg.num_generations),
            "valid_fraction": (batch["valid"].float().sum(), n_seq),
            "completion_length": (n_tok, n_seq),
            "ended_with_eos": (batch["ended"].float().sum(), n_seq),
            "clipfrac": (masked_sum(m["clipfrac"], loss_mask), loss_mask.sum()),
            "sampler_logprob_gap": (masked_sum((logprobs.detach() - batch["sampler_logprobs"]).abs(), mask), n_tok),
        }
        if "ref_logprobs" in batch and cfg.kl_in_reward:  # the KL is already in the advantages
            kl = kl_k1(logprobs.detach(), batch["ref_logprobs"]) * mask
            metrics["kl_per_token"] = (masked_sum(kl, mask), n_tok)
            metrics["kl_per_completion"] = (masked_sum(kl, mask), n_seq)
            metrics["reward_with_kl"] = (batch["rewards_with_kl"].sum(), n_seq)
        elif "ref_logprobs" in batch:
            kl = kl_penalty_loss(logprobs, batch["ref_logprobs"], mask, resolved_kl_estimator(cfg))
            per_token = per_token + batch["beta"] * kl
            metrics["kl_per_token"] = (masked_sum(kl.detach(), mask), n_tok)
            metrics["kl_per_completion"] = (masked_sum(kl.detach(), mask), n_seq)
        if cfg.entropy_coef:
            per_token = per_token - cfg.entropy_coef * torch.where(loss_mask.bool(), entropy, 0)
            metrics["entropy"] = (masked_sum(entropy.detach(), mask), n_tok)
        if "process_reward" in batch:
            metrics["process_reward"] = (batch["process_reward"].sum(), n_seq)
        if cfg.mask_truncated_completions:
            metrics["truncated_masked"] = ((~batch["ended"]).float().sum(), n_seq)
        if "ref_logprobs" in batch:
            metrics["beta"] = (torch.tensor(batch["beta"] * n_seq), n_seq)
        for name, value in batch["reward_sources"].items():
            metrics[f"reward/{name}"] = (torch.tensor(value * n_seq), n_seq)
        loss_sum, _ = aggregate(per_token, loss_mask, cfg.loss_level, cfg.max_new_tokens)
        return loss_sum, metrics
    return policy_step


def unit_count(cfg: GRPOConfig):
    """The loop's count of loss units in a micro-batch: `aggregate`'s denominator."""
    def count(batch) -> float:
        return aggregation_units(batch["loss_mask"], cfg.loss_level, cfg.max_new_tokens)
    return count


def run(cfg: GRPOConfig) -> TrainResult:

    name = "rloo" if isinstance(cfg, RLOOConfig) else "grpo"
    require(cfg, "model", "reward", "data")
    if cfg.batch_size % cfg.num_generations:
        raise ValueError(f"{name}: batch_size ({cfg.batch_size}) counts completions and must be a multiple "
                         f"of num_generations ({cfg.num_generations})")
    if cfg.reward_weights and len(cfg.reward_weights) != len(cfg.reward):
        raise ValueError(f"{name}: {len(cfg.reward_weights)} reward_weights for {len(cfg.reward)} rewards")
    resume_from = resolve_resume(cfg)  # a corrupt or half-written checkpoint stops here, before any loading
    examples, eval_examples, report, tokenizer = load_prompts(cfg, str(resume_from or cfg.model))
    model = load_trainable_model(cfg, resume_from)

    accelerator = make_accelerator(cfg, name)
    reward_fns, weights = load_rewards(cfg, accelerator.device)
    reference = make_reference(cfg.model, cfg.ref_model, cfg.lora_r > 0, accelerator.device, accelerator.autocast,
                               dtype=cfg.ref_dtype) if cfg.beta > 0 else None
    rollouts = Rollouts(cfg, tokenizer, reward_fns, weights, reference, accelerator, examples,
                        load_process_reward(cfg, accelerator.device, cfg.reward_dtype))
    attention = getattr(model.config, "_attn_implementation", None) or "eager"
    if cfg.share_prompt and attention not in ("sdpa", "eager"):
        rollouts.share_prompt = False  # the shared rows need a custom 4-D mask, which this attention cannot take
        say(f"{name}: share_prompt falls back to a row per completion for every step: {attention} attention "
            "takes no custom 4-D mask (sdpa and eager do)")
    model.to(accelerator.device)
    prompts_per_batch = cfg.batch_size // cfg.num_generations
    say(f"{name}: {len(examples)} prompts x {cfg.num_generations} completions, {prompts_per_batch} prompts per "
        f"micro-batch, beta {cfg.beta}, loss per {cfg.loss_level}; {report}")
    result = train(
        cfg, model, tokenizer, examples, make_policy_step(cfg),
        unit_count(cfg), lambda b: collate_prompts(b, tokenizer.pad_token_id), name=name,
        batch_size=prompts_per_batch, resume_from=resume_from, accelerator=accelerator, prepare=rollouts,
        state=rollouts.kl,
        updates_per_step=cfg.num_iterations,
        # held-out prompts: the reward of greedy completions, before, every eval_steps, after
        eval_examples=eval_examples,
        eval_fn=lambda m: greedy_reward(accelerator.unwrap_model(m), eval_examples, tokenizer, reward_fns, weights, cfg,
                                        cfg.batch_size, accelerator.device),
    )
    print_summary(name, result, ([f"beta {rollouts.kl['beta']:.4f}"] if cfg.kl_budget > 0 else []) + [str(report)])
    return result


def main(argv: list[str] | None = None, config_class=GRPOConfig) -> TrainResult:
    from alignkit.config import parse_config

    name = "rloo" if config_class is RLOOConfig else "grpo"
    return run(parse_config(config_class, sys.argv[1:] if argv is None else argv, prog=f"alignkit {name}"))


def main_rloo(argv: list[str] | None = None) -> TrainResult:
    return main(argv, RLOOConfig)
