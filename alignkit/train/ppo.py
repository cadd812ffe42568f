"""PPO for RLHF (Ouyang et al. 2022; "The N implementation details of RLHF with PPO").

    alignkit ppo --model runs/demo/sft --reward runs/rm --data prompts.jsonl --max_steps 100

Four models: the policy, the frozen reference, the reward, and a value model (the
critic, a reward-model-shaped checkpoint whose head reads every position; default:
initialised from the reward model when `reward` is a model directory, else from the
policy). `share_backbone` makes the critic a scalar head on the policy's own last
hidden state instead: one backbone fewer, and one forward gives log-probs and values.
Each step samples one completion per prompt, then with r_t = -beta (log pi -
log pi_ref)_t plus the sequence reward on the last token: GAE(gamma, lambda)
advantages (whitened), and `ppo_epochs` passes over minibatches of the clipped
surrogate plus vf_coef times the clipped value loss. beta is fixed, or adapts
toward `target_kl` (Ziegler et al. 2019). Dropout is off in every pass.

`save_steps` writes output_dir/checkpoint-N with the shared loop's `save_checkpoint`
(sealed by a sha256 manifest): the policy as a plain save_pretrained directory, the
critic in its `value/` subfolder, optimizer, RNG, and beta in trainer_state.json.
`resume auto|PATH` continues exactly where an uninterrupted run would be: the step
alone fixes its prompts, its sampling generator and its minibatch order.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from alignkit.config import require
from alignkit.losses import aggregate, clipped_policy_loss, clipped_value_loss
from alignkit.models.forward import forward_logprobs
from alignkit.models.reward import token_values
from alignkit.ops import adaptive_kl_beta, entropy_from_logits, gae, masked_mean, masked_sum, masked_var, masked_whiten
from alignkit.train.common import load_train_eval, say
from alignkit.train.loop import (MetricLog, data_fingerprint, load_trainable_model, make_accelerator, plan_steps,
                                  position_warnings, resolve_resume, restore_training_state, save_checkpoint,
                                  save_model, save_weights, start_trackers, step_indices, write_config)
from alignkit.train.online import OnlineConfig
from alignkit.train.reference import make_reference


@dataclass
class PPOConfig(OnlineConfig):
    """Online RL with a learned critic and a per-token KL penalty."""

    lr: float = 1e-5
    """Peak learning rate (AdamW) for policy and value model."""
    batch_size: int = 8
    """Completions per PPO minibatch (one optimiser step each), over all processes together."""
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
    """Initial KL coefficient of the per-token penalty -beta * (log pi - log pi_ref)."""
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


def run(cfg: PPOConfig):
    from alignkit.progress import progress

    from alignkit.data import pad_batch, tokenize_prompts
    from alignkit.models.load import load_tokenizer
    from alignkit.rollout.rewards import load_reward_fn, score
    from alignkit.rollout.sampler import sample
    from transformers import get_scheduler

    require(cfg, "model", "reward", "data")
    weights = cfg.reward_weights or [1.0] * len(cfg.reward)
    records, _ = load_train_eval(dataclasses.replace(cfg, eval_fraction=0.0), "prompts")
    resume_from = resolve_resume(cfg)  # a corrupt or half-written checkpoint stops here, before any loading
    tokenizer = load_tokenizer(str(resume_from) if resume_from else cfg.model)
    examples, report = tokenize_prompts(records, tokenizer, cfg.max_length, cfg.truncation)
    report.check_not_all_truncated(cfg.data, cfg.max_length)
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
    optimizer = torch.optim.AdamW([p for p in both.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    scheduler = get_scheduler("constant", optimizer)  # PPO's lr is constant; the checkpoint keeps the shared layout
    both, optimizer = accelerator.prepare(both, optimizer)
    model = accelerator.unwrap_model(both)
    # rollout_batch_size is the loop's global batch: a resume that changes it (or the data) would replay other prompts
    meta = {"total_steps": total_steps, "steps_per_epoch": steps_per_epoch, "data_fingerprint": data_fingerprint(examples),
            "world_size": accelerator.num_processes, "batch_size": cfg.rollout_batch_size, "grad_accum": 1,
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
    history: list[dict] = []
    log = MetricLog(accelerator, out / "metrics.jsonl", history, start_step)
    say(f"ppo: {len(examples)} prompts, {cfg.rollout_batch_size} per step, {cfg.ppo_epochs} epochs of "
        f"minibatches of {cfg.batch_size}; critic from {critic_source}; {report}"
        + (f"; resumed from {resume_from} at step {start_step}" if resume_from else ""))

    start = time.perf_counter()
    bar = progress(range(start_step, total_steps), initial=start_step, total=total_steps, desc="ppo", unit="step",
               disable=not accelerator.is_main_process, dynamic_ncols=True)
    world, rank = accelerator.num_processes, accelerator.process_index
    for step in bar:
        step_idx = step_indices(step, len(examples), cfg.rollout_batch_size, steps_per_epoch, cfg.seed)
        idx = step_idx[rank::world]  # this process's prompts: global positions rank, rank + world, ...
        chunk = [examples[i] for i in idx]
        prompts = pad_batch(chunk, tokenizer.pad_token_id, side="left")
        device = accelerator.device
        # one generator per prompt, seeded by (seed, step, prompt id): the same samples on any process count
        generator = [torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * 1_000_033 + ex["id"]) for ex in chunk]

        # --- rollout: sample, score, and the no-grad passes (dropout off) ---
        model.eval()
        roll = sample(model.policy, prompts["input_ids"].to(device), prompts["attention_mask"].to(device),
                      max_new_tokens=cfg.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, temperature=cfg.temperature, top_k=cfg.top_k,
                      top_p=cfg.top_p, generator=generator)
        ids, attn, mask = roll.input_ids, roll.attention_mask, roll.completion_mask
        p = roll.prompt_ids.shape[1]
        columns = torch.arange(p - 1, p - 1 + mask.shape[1], device=device)
        texts = tokenizer.batch_decode(roll.completion_ids.masked_fill(mask == 0, tokenizer.pad_token_id),
                                       skip_special_tokens=True)
        fields = {k: [ex["fields"].get(k) for ex in chunk] for k in chunk[0]["fields"]}
        scores, _, per_source = score(reward_fns, weights, [ex["prompt"] for ex in chunk], texts, fields,
                             timeout=cfg.reward_timeout)
        scores = (scores - cfg.missing_eos_penalty * (~roll.ended.cpu()).float()).to(device)
        with torch.no_grad(), accelerator.autocast():
            old_logprobs, logits, old_values = model.logprobs_and_values(ids, attn, cfg.temperature, columns)
            entropy = masked_mean(entropy_from_logits(logits), mask)
            del logits
        ref_logprobs = reference(model.policy, lambda m: forward_logprobs(m, ids, attn, cfg.temperature, columns=columns)[0])
        kl = torch.where(mask.bool(), old_logprobs - ref_logprobs, 0.0)  # k1 per token: its sum is unbiased
        rewards = -beta * kl
        last = mask.sum(-1) - 1
        rewards[torch.arange(len(last), device=device), last] += scores
        advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
        advantages = whiten_over_processes(advantages, mask, accelerator)

        # --- update: ppo_epochs passes over shuffled minibatches ---
        model.train()
        stats: dict[str, float] = {}
        n_updates = 0
        order_gen = torch.Generator().manual_seed(cfg.seed * 7919 + step)
        for _ in range(cfg.ppo_epochs):
            # minibatches of the step's global positions; each process trains on its own members
            for global_mb in torch.randperm(len(step_idx), generator=order_gen).split(cfg.batch_size):
                mb = (global_mb[global_mb % world == rank] // world).to(device)
                weight = 1.0 if len(mb) else 0.0  # none here: join the all-reduce with a zero loss
                mb = mb if len(mb) else torch.zeros(1, dtype=torch.long, device=device)
                m = mask[mb]
                with accelerator.autocast():  # the precision pi_old was computed at
                    logprobs, _, values = both(ids[mb], attn[mb], cfg.temperature, columns)
                pg, pg_metrics = clipped_policy_loss(logprobs, old_logprobs[mb], advantages[mb], m, cfg.clip_eps)
                vf, vf_metrics = clipped_value_loss(values, old_values[mb], returns[mb], cfg.vf_clip, mask=m)
                loss_sum, count = aggregate(pg + cfg.vf_coef * vf, m, "token")
                # mean over the minibatch's tokens on all processes (DDP averages, hence * world)
                global_count = accelerator.reduce(weight * count.detach().float(), "sum") if world > 1 else count
                accelerator.backward(weight * loss_sum * world / global_count)
                if cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(both.parameters(), cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                n_tok = m.sum().clamp(min=1)
                if n_updates == 0:  # before any update pi == pi_old: the ratio must be 1, nothing clipped
                    first_ratio_dev = float(((pg_metrics["ratio"] - 1).abs() * m).max())
                    first_clipfrac = float(masked_sum(pg_metrics["clipfrac"], m) / n_tok)
                for k, v in {"policy_loss": masked_sum(pg.detach(), m) / n_tok, "value_loss": masked_sum(vf.detach(), m) / n_tok,
                             "clipfrac": masked_sum(pg_metrics["clipfrac"], m) / n_tok,
                             "approx_kl": masked_sum(pg_metrics["approx_kl"], m) / n_tok,
                             "vf_clipfrac": masked_sum(vf_metrics["vf_clipfrac"], m) / n_tok}.items():
                    stats[k] = stats.get(k, 0.0) + float(v)
                n_updates += 1

        totals = torch.stack([kl.sum(), scores.sum(), torch.tensor(float(len(idx)), device=device)])
        totals = accelerator.reduce(totals, "sum") if world > 1 else totals
        kl_per_completion = float(totals[0] / totals[2])  # over all processes: every one adapts beta alike
        if cfg.target_kl > 0:
            beta = adaptive_kl_beta(beta, kl_per_completion, cfg.target_kl, cfg.kl_horizon, int(totals[2]))
        record = {"step": step + 1, **{f"train/{k}": v / n_updates for k, v in stats.items()},
                  "train/reward": float(totals[1] / totals[2]), "train/reward_with_kl": float(totals[1] / totals[2]) - beta * kl_per_completion,
                  "train/kl_per_completion": kl_per_completion, "train/kl_per_token": float(masked_mean(kl, mask)),
                  "train/entropy": float(entropy), "train/explained_variance": explained_variance(old_values, returns, mask),
                  "train/completion_length": float(mask.sum(-1).float().mean()),
                  "train/ended_with_eos": float(roll.ended.float().mean()), "train/beta": beta,
                  "train/first_minibatch_ratio_dev": first_ratio_dev, "train/first_minibatch_clipfrac": first_clipfrac,
                  # each reward source's mean; one with weight 0 is watched, not optimised (e.g. a gold reward)
                  **{f"train/reward/{k}": v for k, v in per_source.items()}}
        if (step + 1) % cfg.log_steps == 0 or step + 1 == total_steps:
            log(record)
        bar.set_postfix(reward=f"{record['train/reward']:.3f}", kl=f"{kl_per_completion:.2f}", refresh=False)
        scheduler.step()
        if cfg.save_steps > 0 and ((step + 1) % cfg.save_steps == 0 or step + 1 == total_steps):
            save_checkpoint(cfg, accelerator, both, tokenizer, optimizer, scheduler, step + 1, {**meta, "beta": beta})

    if accelerator.is_main_process:
        save_model(both, tokenizer, out, accelerator)  # the policy at `out`, the critic in out/value
    accelerator.wait_for_everyone()
    if cfg.logging != "none":
        accelerator.end_training()
    rewards = [h["train/reward"] for h in history]
    trend = (f"reward {rewards[0]:.3f} (step {history[0]['step']}) -> {rewards[-1]:.3f} (step {history[-1]['step']}), "
             f"KL per completion {history[-1]['train/kl_per_completion']:.3f}, " if history else "")
    say(f"== ppo finished: {total_steps - start_step} steps in {time.perf_counter() - start:.0f} s ==\n"
        f"{trend}beta {beta:.4f}\n{report}\npolicy saved to {out}, critic to "
        f"{out / (VALUE_HEAD_FILE if cfg.share_backbone else 'value')}")
    return history


def main(argv: list[str] | None = None):
    from alignkit.config import parse_config

    return run(parse_config(PPOConfig, sys.argv[1:] if argv is None else argv, prog="alignkit ppo"))
