"""PPO for RLHF (Ouyang et al. 2022; "The N implementation details of RLHF with PPO").

    alignkit ppo --model runs/demo/sft --reward runs/rm --data prompts.jsonl --max_steps 100

Four models: the policy, the frozen reference, the reward, and a value model (the
critic, a reward-model-shaped checkpoint whose head reads every position; default:
initialised from the reward model when `reward` is a model directory, else from the
policy). `share_backbone` makes the critic a scalar head on the policy's own last
hidden state instead: one backbone fewer, and one forward gives log-probs and values.

One PPO step, top to bottom in `run`:
1. rollout: one completion per prompt for `rollout_batch_size` prompts, scored by `reward`;
2. rewards with KL: r_t = -beta kl_t (log pi, log pi_ref), plus the sequence reward on the last
   token; beta is fixed, or adapts toward `target_kl` (Ziegler et al. 2019);
3. GAE(gamma, lambda) advantages and returns from the critic's values;
4. advantages whitened over the whole rollout (all processes);
5. `ppo_epochs` passes over shuffled minibatches of `batch_size` completions: the clipped
   surrogate plus vf_coef times the clipped value loss, one optimiser update per minibatch,
   accumulated over `grad_accum` micro-batches (each micro-batch's token sum divided by the
   whole minibatch's token count: the update is the whole minibatch's, however it is split).
The learning-rate schedule (`lr_scheduler`, constant by default; `warmup_ratio`, `min_lr_ratio`) counts optimiser
updates, as the optimiser sees them: steps x ppo_epochs x minibatches per step. A non-finite
loss or gradient norm in an update stops the run, or with `on_nan skip` drops that update.
The policy and critic stay in eval mode for every forward (rollout, scoring and updates):
dropout is off, so the first minibatch's ratio pi / pi_old is exactly 1 (with dropout the
scoring pass and the update pass would drop different units and the ratio would move
before any update).

Held-out prompts (`eval_data`, or `eval_fraction` of `data`) get greedy completions scored by
the same `reward` at the start, every `eval_steps` steps and at the end: `eval/reward`,
`eval/completion_length`, `eval/ended_with_eos`, `eval/reward/<source>` in metrics.jsonl.

`save_steps` writes output_dir/checkpoint-N with the shared loop's `save_checkpoint`
(sealed by a sha256 manifest): the policy as a plain save_pretrained directory, the
critic in its `value/` subfolder, optimizer, scheduler, RNG, and beta in trainer_state.json.
`resume auto|PATH` continues exactly where an uninterrupted run would be: the step
alone fixes its prompts, its sampling generator and its minibatch order, and the
scheduler resumes at the saved update count.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from alignkit.config import require
from alignkit.losses import aggregate, clipped_policy_loss, clipped_value_loss
from alignkit.models.forward import forward_logprobs
from alignkit.models.reward import token_values
from alignkit.ops import adaptive_kl_beta, entropy_from_logits, gae, kl_estimator, masked_mean, masked_sum, masked_var, masked_whiten
from alignkit.train.common import load_train_eval, say
from alignkit.train.loop import (MetricLog, TrainingError, TrainResult, accumulate_gradients, data_fingerprint,
                                  load_trainable_model, make_accelerator, make_scheduler, plan_steps, position_warnings,
                                  resolve_resume, restore_training_state, save_checkpoint, save_model, save_weights,
                                  start_trackers, step_indices, write_config)
from alignkit.train.online import OnlineConfig, greedy_reward
from alignkit.train.reference import make_reference


@dataclass
class PPOConfig(OnlineConfig):
    """Online RL with a learned critic and a per-token KL penalty."""

    lr: float = 1e-5
    """Peak learning rate (AdamW) for policy and value model."""
    lr_scheduler: str = "constant"
    """A `transformers.get_scheduler` name over the optimiser updates: constant, cosine_with_min_lr, linear, ..."""
    batch_size: int = 8
    """Completions per PPO minibatch (one optimiser update each), over all processes together."""
    grad_accum: int = 1
    """Micro-batches each minibatch is processed in (less memory per forward), gradients accumulated:
    each micro-batch's token sum is divided by the whole minibatch's token count, so the update is
    the same as in one piece."""
    rollout_batch_size: int = 32
    """Prompts sampled per PPO step (one completion each), over all processes together."""
    ppo_epochs: int = 4
    """Passes over each rollout batch."""
    missing_eos_penalty: float = 0.0
    """Subtracted from the reward of completions that hit max_new_tokens without EOS."""
    value_model: str = ""
    """Critic initialisation (empty: the first reward model, else the policy `model`)."""
    share_backbone: bool = False
    """Critic = a scalar head on the policy's last hidden state (no second backbone; the value
    loss, weighted by vf_coef, also trains the policy's backbone)."""
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
    max_steps: int = 0
    """PPO steps to run, each a rollout then ppo_epochs x minibatches optimiser updates; 0 means
    `epochs` passes over the prompts."""
    log_steps: int = 10
    """Log training metrics every N PPO steps."""
    save_steps: int = 0
    """Save a resumable checkpoint every N PPO steps (0: only the final model)."""
    warmup_ratio: float = 0.0
    """Fraction of the optimiser updates (steps x ppo_epochs x minibatches per step) spent warming
    the learning rate up from 0 (not with lr_scheduler constant)."""
    eval_fraction: float = 0.0
    """Fraction of prompts held out for the greedy-reward evaluation when `eval_data` is empty."""
    eval_steps: int = 0
    """Greedy-reward evaluation of the held-out prompts every N PPO steps (0: at the start and the end only)."""
    on_nan: Literal["stop", "skip"] = "stop"
    """A non-finite loss or gradient norm in a minibatch update stops training, or skips that update
    (weights unchanged; counted as train/skipped_updates)."""

    def validate(self) -> None:
        from alignkit.config import ConfigError

        super().validate()
        if self.grad_accum > self.batch_size:
            raise ConfigError(f"grad_accum ({self.grad_accum}) must be <= batch_size ({self.batch_size}): "
                              "a minibatch of batch_size completions is split into grad_accum micro-batches")


class ValueHead(torch.nn.Module):
    """V(s_t) = w^T h_t + b on the policy's own last hidden state h_t (`share_backbone`).

    Zero at initialisation, so the first value gradients do not reach the policy's backbone."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.score = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.score.weight)
        torch.nn.init.zeros_(self.score.bias)


VALUE_HEAD_FILE = "value_head.safetensors"


class PolicyAndValue(torch.nn.Module):
    """Holds the two trained models so one optimiser, one clip, one prepare and one save cover both."""

    def __init__(self, policy, value):
        super().__init__()
        self.policy, self.value = policy, value

    def forward(self, ids, attn, temperature: float, columns):
        """`logprobs_and_values`. Training passes go through here, i.e. through the DDP wrapper's
        forward: DDP averages the gradients of a backward only after its own forward ran."""
        return self.logprobs_and_values(ids, attn, temperature, columns)

    def logprobs_and_values(self, ids, attn, temperature: float, columns):
        """log pi, the logits and V at `columns`: [N, C], [N, C, V], [N, C] float32."""
        if isinstance(self.value, ValueHead):  # one forward through the shared backbone
            logprobs, logits, hidden = forward_logprobs(self.policy, ids, attn, temperature, columns=columns, with_hidden=True)
            return logprobs, logits, self.value.score(hidden).squeeze(-1).float()
        logprobs, logits = forward_logprobs(self.policy, ids, attn, temperature, columns=columns)
        return logprobs, logits, token_values(self.value, ids, attn, columns)

    def save_pretrained(self, path):
        """The policy at `path`, loadable by plain transformers (with LoRA: merged, the adapter
        alone in path/adapter, as `load_trainable_model` resumes it); the critic in path/value,
        or a shared backbone's value head in path/value_head.safetensors."""
        save_weights(self.policy, path)
        if isinstance(self.value, ValueHead):
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in self.value.state_dict().items()}, Path(path) / VALUE_HEAD_FILE)
        else:
            self.value.save_pretrained(Path(path) / "value")


def load_critic(cfg, policy, resume_from: Path | None):
    """The value model: a head on the policy (`share_backbone`) or a reward-model-shaped
    checkpoint; from the checkpoint when resuming. Returns (critic, where it came from)."""
    from alignkit.models.reward import load_reward_backbone

    if cfg.share_backbone:
        head = ValueHead(getattr(policy, "module", policy).config.hidden_size)
        if resume_from:
            from safetensors.torch import load_file

            head.load_state_dict(load_file(resume_from / VALUE_HEAD_FILE))
        return head, "a head on the policy's backbone"
    if resume_from:
        source = str(resume_from / "value")
    else:
        source = cfg.value_model or next((s for s in cfg.reward if Path(s).is_dir()), cfg.model)
    return load_reward_backbone(source), source


def whiten_over_processes(x, mask, accelerator):
    """`masked_whiten` with the mean and (unbiased) variance over every process's tokens."""
    if accelerator.num_processes == 1:
        return masked_whiten(x, mask)
    m = mask.to(x.dtype)
    n, total = accelerator.reduce(torch.stack([m.sum(), (x * m).sum()]), "sum")
    mean = total / n
    var = accelerator.reduce(((x - mean) ** 2 * m).sum(), "sum") / (n - 1)
    return torch.where(mask.bool(), (x - mean) * torch.rsqrt(var + 1e-8), 0.0)


def explained_variance(values, returns, mask) -> float:
    """1 - Var[R - V] / Var[R] over the completion tokens: 1 is a perfect critic, 0 a constant one."""
    var_r = masked_var(returns, mask, unbiased=False)
    return float(1 - masked_var(returns - values, mask, unbiased=False) / var_r.clamp(min=1e-8))


def updates_per_step(cfg: PPOConfig, n_prompts: int, steps_per_epoch: int, step: int) -> int:
    """Optimiser updates in PPO step `step`: ppo_epochs x its minibatches (an epoch's last step may be short)."""
    prompts = min(cfg.rollout_batch_size, n_prompts - (step % steps_per_epoch) * cfg.rollout_batch_size)
    return cfg.ppo_epochs * math.ceil(prompts / cfg.batch_size)


def ppo_loss(model, batch: dict, cfg: PPOConfig, autocast):
    """Clipped surrogate + vf_coef * clipped value loss of one micro-batch, the loop's `step_fn`:
    (sum over its completion tokens, metric sums over them). `model` (a PolicyAndValue, through
    its DDP wrapper) recomputes log pi and V; batch holds the rollout's [n, C] tensors."""
    m = batch["completion_mask"]
    with autocast():  # the precision pi_old was computed at
        logprobs, _, values = model(batch["input_ids"], batch["attention_mask"], cfg.temperature, batch["columns"])
    pg, pg_metrics = clipped_policy_loss(logprobs, batch["old_logprobs"], batch["advantages"], m, cfg.clip_eps)
    vf, vf_metrics = clipped_value_loss(values, batch["old_values"], batch["returns"], cfg.vf_clip, mask=m)
    loss_sum, _ = aggregate(pg + cfg.vf_coef * vf, m, "token")
    # read back for the first update of a step, where pi == pi_old: the ratio must be 1
    batch["ratio_dev"] = float(((pg_metrics["ratio"] - 1).abs() * m).max())
    return loss_sum, {"policy_loss": masked_sum(pg.detach(), m), "value_loss": masked_sum(vf.detach(), m),
                      "clipfrac": masked_sum(pg_metrics["clipfrac"], m),
                      "approx_kl": masked_sum(pg_metrics["approx_kl"], m),
                      "vf_clipfrac": masked_sum(vf_metrics["vf_clipfrac"], m)}


def run(cfg: PPOConfig) -> TrainResult:
    from alignkit.progress import progress

    from alignkit.data import pad_batch, tokenize_prompts
    from alignkit.models.load import load_tokenizer
    from alignkit.rollout.rewards import load_reward_fn, score_rollout
    from alignkit.rollout.sampler import sample

    require(cfg, "model", "reward", "data")
    weights = cfg.reward_weights or [1.0] * len(cfg.reward)
    records, eval_records = load_train_eval(cfg, "prompts")
    resume_from = resolve_resume(cfg)  # a corrupt or half-written checkpoint stops here, before any loading
    tokenizer = load_tokenizer(str(resume_from) if resume_from else cfg.model)
    examples, report = tokenize_prompts(records, tokenizer, cfg.max_length, cfg.truncation)
    report.check_not_all_truncated(cfg.data, cfg.max_length)
    eval_examples, _ = tokenize_prompts(eval_records, tokenizer, cfg.max_length, cfg.truncation)
    accelerator = make_accelerator(cfg, "ppo")
    reward_fns = [load_reward_fn(spec, accelerator.device, cfg.reward_dtype) for spec in cfg.reward]
    policy = load_trainable_model(cfg, resume_from)  # seeds first: new weights (LoRA, the critic's head) repeat
    critic, critic_source = load_critic(cfg, policy, resume_from)
    for warning in position_warnings(policy, [len(ex["input_ids"]) for ex in examples], cfg.max_new_tokens):
        say(warning)
    if not cfg.share_backbone:
        critic.config.pad_token_id = tokenizer.pad_token_id
    both = PolicyAndValue(policy, critic)
    reference = make_reference(cfg.model, cfg.ref_model, cfg.lora_r > 0, accelerator.device, accelerator.autocast,
                               dtype=cfg.ref_dtype)
    # rollout_batch_size counts the prompts of a step over ALL processes (each samples its share),
    # so an epoch is the same number of steps on any process count
    _, steps_per_epoch, total_steps = plan_steps(
        len(examples), dataclasses.replace(cfg, batch_size=cfg.rollout_batch_size, grad_accum=1), world_size=1)
    # the schedule moves once per optimiser update, as the optimiser does; a skipped update moves it too
    total_updates = sum(updates_per_step(cfg, len(examples), steps_per_epoch, s) for s in range(total_steps))
    trainable = [p for p in both.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = make_scheduler(cfg, optimizer, total_updates)
    both, optimizer = accelerator.prepare(both, optimizer)
    model = accelerator.unwrap_model(both)
    # eval mode for every forward, the updates included: no dropout, so pi == pi_old before the first update
    both.eval()
    # rollout_batch_size is the loop's global batch: a resume that changes it (or the data) would replay other prompts
    meta = {"total_steps": total_steps, "steps_per_epoch": steps_per_epoch, "data_fingerprint": data_fingerprint(examples),
            "world_size": accelerator.num_processes, "batch_size": cfg.rollout_batch_size, "grad_accum": cfg.grad_accum,
            "config": dataclasses.asdict(cfg)}
    start_step, beta = 0, cfg.beta
    if resume_from:
        saved = restore_training_state(resume_from, meta, optimizer, scheduler, accelerator.process_index,
                                       cfg.allow_resume_mismatch)
        start_step, beta = saved["step"], saved["beta"]
    out = Path(cfg.output_dir)
    if accelerator.is_main_process:
        write_config(cfg, out)
    accelerator.wait_for_everyone()
    start_trackers(cfg, accelerator, "ppo")
    result = TrainResult(output_dir=out, steps=total_steps, device=str(accelerator.device),
                         precision=accelerator.mixed_precision)
    log = MetricLog(accelerator, out / "metrics.jsonl", result.history, start_step)
    say(f"ppo: {len(examples)} prompts, {cfg.rollout_batch_size} per step, {cfg.ppo_epochs} epochs of "
        f"minibatches of {cfg.batch_size} ({total_updates} optimiser updates, lr schedule {cfg.lr_scheduler}); "
        f"critic from {critic_source}; {len(eval_examples)} held-out prompts; {report}"
        + (f"; resumed from {resume_from} at step {start_step}" if resume_from else ""))

    def evaluate(step: int) -> dict[str, float]:
        metrics = greedy_reward(model.policy, eval_examples, tokenizer, reward_fns, cfg, cfg.rollout_batch_size,
                                accelerator.device)
        log({"step": step, **{f"eval/{k}": v for k, v in metrics.items()}})
        return metrics

    if eval_examples and start_step == 0:
        result.initial_eval_metrics = evaluate(0)
    bar = progress(range(start_step, total_steps), initial=start_step, total=total_steps, desc="ppo", unit="step",
               disable=not accelerator.is_main_process, dynamic_ncols=True)
    world, rank = accelerator.num_processes, accelerator.process_index
    stop_on_nan = cfg.on_nan == "stop"
    for step in bar:
        step_start = time.perf_counter()
        step_idx = step_indices(step, len(examples), cfg.rollout_batch_size, steps_per_epoch, cfg.seed)
        idx = step_idx[rank::world]  # this process's prompts: global positions rank, rank + world, ...
        chunk = [examples[i] for i in idx]
        prompts = pad_batch(chunk, tokenizer.pad_token_id, side="left")
        device = accelerator.device
        # one generator per prompt, seeded by (seed, step, prompt id): the same samples on any process count
        generator = [torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * 1_000_033 + ex["id"]) for ex in chunk]

        # --- 1. rollout: sample, score, and the no-grad passes of pi_old, V_old and pi_ref ---
        roll = sample(model.policy, prompts["input_ids"].to(device), prompts["attention_mask"].to(device),
                      max_new_tokens=cfg.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, temperature=cfg.temperature, top_k=cfg.top_k,
                      top_p=cfg.top_p, generator=generator)
        ids, attn, mask = roll.input_ids, roll.attention_mask, roll.completion_mask
        p = roll.prompt_ids.shape[1]
        columns = torch.arange(p - 1, p - 1 + mask.shape[1], device=device)
        fields = {k: [ex["fields"].get(k) for ex in chunk] for k in chunk[0]["fields"]}
        scores, _, per_source, _ = score_rollout(roll, tokenizer, reward_fns, weights, [ex["prompt"] for ex in chunk],
                                                 fields, timeout=cfg.reward_timeout,
                                                 missing_eos_penalty=cfg.missing_eos_penalty)
        scores = scores.to(device)
        with torch.no_grad(), accelerator.autocast():
            old_logprobs, logits, old_values = model.logprobs_and_values(ids, attn, cfg.temperature, columns)
            entropy = masked_mean(entropy_from_logits(logits), mask)
            del logits
        ref_logprobs = reference(model.policy, lambda m: forward_logprobs(m, ids, attn, cfg.temperature, columns=columns)[0])

        # --- 2. rewards with KL: -beta kl_t per token, the sequence reward on the last token ---
        kl = torch.where(mask.bool(), kl_estimator(cfg.kl_estimator)(old_logprobs, ref_logprobs), 0.0)
        rewards = -beta * kl
        last = mask.sum(-1) - 1
        rewards[torch.arange(len(last), device=device), last] += scores
        # --- 3. GAE, 4. whitening over every process's tokens ---
        advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
        advantages = whiten_over_processes(advantages, mask, accelerator)

        # --- 5. ppo_epochs passes over shuffled minibatches, one optimiser update each ---
        rollout = {"input_ids": ids, "attention_mask": attn, "completion_mask": mask, "old_logprobs": old_logprobs,
                   "old_values": old_values, "advantages": advantages, "returns": returns,
                   "ids": torch.tensor([ex["id"] for ex in chunk], device=device)}
        stats: dict[str, float] = {}
        first: dict[str, float] = {}
        n_updates = n_applied = 0
        order_gen = torch.Generator().manual_seed(cfg.seed * 7919 + step)
        for _ in range(cfg.ppo_epochs):
            # minibatches of the step's global positions; each process trains on its own members
            for global_mb in torch.randperm(len(step_idx), generator=order_gen).split(cfg.batch_size):
                mb = (global_mb[global_mb % world == rank] // world).to(device)
                # grad_accum micro-batches; an empty one (none of the minibatch here) joins the
                # all-reduce with weight 0 on a stand-in row
                parts = mb.tensor_split(cfg.grad_accum)
                batches = [{**{k: v[j if len(j) else mb.new_zeros(1)] for k, v in rollout.items()}, "columns": columns}
                           for j in parts]
                micro_weights = [1.0 if len(j) else 0.0 for j in parts]
                sums, _, bad_ids = accumulate_gradients(both, batches, micro_weights,
                                                        lambda m_, b: ppo_loss(m_, b, cfg, accelerator.autocast),
                                                        lambda b: b["completion_mask"].sum(), accelerator)
                if cfg.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(both.parameters(), cfg.max_grad_norm)
                else:
                    grad_norm = torch.linalg.vector_norm(
                        torch.stack([q.grad.norm() for q in trainable if q.grad is not None]))
                flags = torch.tensor([float(bool(bad_ids)), float(not torch.isfinite(grad_norm))], device=device)
                flags = accelerator.reduce(flags, "sum") if world > 1 else flags
                n_updates += 1
                count = max(sum(w * float(b["completion_mask"].sum()) for w, b in zip(micro_weights, batches)), 1.0)
                if n_updates == 1:  # before any update pi == pi_old: the ratio must be 1, nothing clipped
                    first = {"first_minibatch_ratio_dev": max(b["ratio_dev"] for b in batches),
                             "first_minibatch_clipfrac": sums["clipfrac"] / count}
                if float(flags.sum()) > 0:
                    what = "loss" if float(flags[0]) > 0 else "gradient norm"
                    if stop_on_nan:
                        raise TrainingError(
                            f"step {step + 1}: non-finite {what} in minibatch update {n_updates} (prompt ids "
                            f"{sorted(set(bad_ids)) or [ex['id'] for ex in chunk]}); stopped so that no NaN is "
                            "averaged into the weights. Set on_nan=skip to skip such updates.")
                    optimizer.zero_grad(set_to_none=True)  # the update is dropped: weights and optimizer state unchanged
                    result.skipped_steps += 1  # PPO counts skipped minibatch updates here
                    scheduler.step()
                    continue
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                for k in ("policy_loss", "value_loss", "clipfrac", "approx_kl", "vf_clipfrac"):
                    stats[k] = stats.get(k, 0.0) + sums[k] / count
                n_applied += 1
        result.train_seconds += time.perf_counter() - step_start

        totals = torch.stack([kl.sum(), scores.sum(), torch.tensor(float(len(idx)), device=device)])
        totals = accelerator.reduce(totals, "sum") if world > 1 else totals
        kl_per_completion = float(totals[0] / totals[2])  # over all processes: every one adapts beta alike
        if cfg.target_kl > 0:
            beta = adaptive_kl_beta(beta, kl_per_completion, cfg.target_kl, cfg.kl_horizon, int(totals[2]))
        record = {"step": step + 1, **{f"train/{k}": v / max(n_applied, 1) for k, v in stats.items()},
                  "train/reward": float(totals[1] / totals[2]), "train/reward_with_kl": float(totals[1] / totals[2]) - beta * kl_per_completion,
                  "train/kl_per_completion": kl_per_completion, "train/kl_per_token": float(masked_mean(kl, mask)),
                  "train/entropy": float(entropy), "train/explained_variance": explained_variance(old_values, returns, mask),
                  "train/completion_length": float(mask.sum(-1).float().mean()),
                  "train/ended_with_eos": float(roll.ended.float().mean()), "train/beta": beta,
                  **{f"train/{k}": v for k, v in first.items()},
                  "train/lr": scheduler.get_last_lr()[0],  # for the next update, as the shared loop logs it
                  "train/skipped_updates": result.skipped_steps,
                  # each reward source's mean; one with weight 0 is watched, not optimised (e.g. a gold reward)
                  **{f"train/reward/{k}": v for k, v in per_source.items()}}
        if (step + 1) % cfg.log_steps == 0 or step + 1 == total_steps:
            log(record)
        bar.set_postfix(reward=f"{record['train/reward']:.3f}", kl=f"{kl_per_completion:.2f}", refresh=False)
        if eval_examples and cfg.eval_steps > 0 and (step + 1) % cfg.eval_steps == 0 and step + 1 != total_steps:
            evaluate(step + 1)
        if cfg.save_steps > 0 and ((step + 1) % cfg.save_steps == 0 or step + 1 == total_steps):
            save_checkpoint(cfg, accelerator, both, tokenizer, optimizer, scheduler, step + 1, {**meta, "beta": beta})

    if eval_examples:
        result.eval_metrics = evaluate(total_steps)
    if accelerator.is_main_process:
        save_model(both, tokenizer, out, accelerator)  # the policy at `out`, the critic in out/value
    accelerator.wait_for_everyone()
    if cfg.logging != "none":
        accelerator.end_training()
    trained = [h for h in result.history if "train/reward" in h]
    trend = (f"reward {trained[0]['train/reward']:.3f} (step {trained[0]['step']}) -> {trained[-1]['train/reward']:.3f} "
             f"(step {trained[-1]['step']}), KL per completion {trained[-1]['train/kl_per_completion']:.3f}, "
             if trained else "")
    held_out = (f"held-out greedy reward {result.initial_eval_metrics['reward']:.3f} -> {result.eval_metrics['reward']:.3f}\n"
                if result.initial_eval_metrics and result.eval_metrics else "")
    skipped = (f"skipped minibatch updates (non-finite loss or gradient): {result.skipped_steps}\n"
               if result.skipped_steps else "")
    say(f"== ppo finished: {total_steps - start_step} steps in {result.train_seconds:.0f} s of training ==\n"
        f"{trend}beta {beta:.4f}\n{held_out}{skipped}{report}\npolicy saved to {out}, critic to "
        f"{out / (VALUE_HEAD_FILE if cfg.share_backbone else 'value')}")
    return result


def main(argv: list[str] | None = None) -> TrainResult:
    from alignkit.config import parse_config

    return run(parse_config(PPOConfig, sys.argv[1:] if argv is None else argv, prog="alignkit ppo"))
