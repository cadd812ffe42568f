"""What the online trainers (grpo, rloo, ppo, bon) share: sampling and reward keys."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from alignkit.train.loop import TrainConfig


@dataclass
class OnlineConfig(TrainConfig):
    """Keys of every trainer that samples completions and scores them."""

    max_new_tokens: int = 32
    """Longest completion; one that reaches it without EOS did not end."""
    max_length: int = 256
    """Longest prompt in tokens (older prompt tokens are dropped, counted)."""
    temperature: float = 1.0
    """Sampling temperature; log-probs are recomputed at the same temperature."""
    top_k: int = 0
    """Sample from the k most likely tokens (0: all)."""
    top_p: float = 1.0
    """Nucleus sampling mass (1: all)."""
    reward: list[str] = field(default_factory=list)
    """Reward sources: reward-model directories and/or `module:function` callables."""
    reward_weights: list[float] = field(default_factory=list)
    """Weight of each reward source (default: 1 each)."""
    reward_timeout: float = 300.0
    """Seconds a reward call may take before it counts as failed."""
    reward_dtype: str = "float32"
    """Storage dtype of reward-model checkpoints among `reward` (bfloat16 / float16: half their memory)."""
    reward_uncertainty_penalty: float = 0.0
    """lambda of an ensemble's uncertainty penalty: the sources with a non-zero weight (e.g. reward models
    trained with different seeds) score sum_k w_k r_k - lambda * std_k r_k (0: no penalty)."""

    def validate(self) -> None:
        """TrainConfig's checks, then each reward source resolved (imported, or its folder checked)
        and the weights matched to it, before any model loads."""
        from alignkit.config import ConfigError
        from alignkit.rollout.rewards import check_reward_spec

        super().validate()
        for spec in self.reward:
            check_reward_spec(spec)
        if self.reward_weights and len(self.reward_weights) != len(self.reward):
            raise ConfigError(f"reward_weights has {len(self.reward_weights)} values for {len(self.reward)} "
                              "reward sources; give one weight per source, in order")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.reward_uncertainty_penalty < 0:
            raise ConfigError(f"reward_uncertainty_penalty must be >= 0, got {self.reward_uncertainty_penalty}")
        weighted = sum(w != 0 for w in (self.reward_weights or [1.0] * len(self.reward)))
        if self.reward_uncertainty_penalty > 0 and weighted < 2:
            raise ConfigError(f"reward_uncertainty_penalty needs an ensemble: at least 2 reward sources with a "
                              f"non-zero weight, got {weighted}")


@dataclass
class ProcessRewardKeys:
    """Step rewards from a process reward model (`alignkit prm`), for PPO and GRPO / RLOO."""

    process_reward: str = ""
    """A PRM folder: each step of a completion is scored (p_k = P(step k correct)) and rewarded at its last token,
    beside the outcome reward of `reward` at the end (weight it 0 to train on steps alone). Empty: outcome only."""
    process_reward_weight: float = 1.0
    """Scale w of the step rewards."""

    def validate_process_reward(self) -> None:
        from alignkit.config import ConfigError
        from alignkit.models.process_reward import is_process_reward_model

        if self.process_reward and not is_process_reward_model(self.process_reward):
            raise ConfigError(f"process_reward: {self.process_reward} is not a process reward model folder "
                              "(`alignkit prm` writes one: its config.json has step_separator)")


def load_process_reward(cfg: ProcessRewardKeys, device, dtype: str = "float32"):
    """The ProcessRewardModel of `cfg.process_reward` on `device`, or None."""
    if not cfg.process_reward:
        return None
    from alignkit.models.process_reward import ProcessRewardModel

    return ProcessRewardModel.load(cfg.process_reward, device=device, dtype=dtype)


@torch.no_grad()
def process_step_rewards(prm, rollout, tokenizer, prompts: list, weight: float = 1.0,
                         mode: str = "score") -> tuple[torch.Tensor, torch.Tensor]:
    """Each completion's step rewards at its steps' last tokens: (rewards [N, C] float32, step_mask [N, C] bool).

    mode "score": r_k = w p_k, the PRM's score of step k (Lightman et al. 2023; DeepSeekMath's process
    supervision). mode "delta": r_k = w (p_k - p_{k-1}), p_0 = 0, potential-based shaping (Ng et al. 1999)
    whose sum over a completion is w p_K: dense credit without rewarding more steps. `prompts` holds one
    prompt per completion. A completion's tokens are decoded one by one to find where each step ends
    (`step_end_columns`); a step the PRM could not score (cut by its max_length) gets nothing."""
    ids, mask = rollout.completion_ids.cpu(), rollout.completion_mask.cpu().bool()
    vocab = sorted(set(ids[mask].tolist()))
    text_of = dict(zip(vocab, tokenizer.batch_decode([[i] for i in vocab], skip_special_tokens=True)))
    token_texts = [[text_of[t] for t in row[m].tolist()] for row, m in zip(ids, mask)]
    rewards = torch.zeros(ids.shape, dtype=torch.float32)
    steps = torch.zeros(ids.shape, dtype=torch.bool)
    for row, scored in enumerate(prm.completion_step_scores(prompts, token_texts)):
        previous = 0.0
        for column, p in scored:
            rewards[row, column] += weight * (p - previous if mode == "delta" else p)
            steps[row, column] = True
            previous = p
    device = rollout.completion_ids.device
    return rewards.to(device), steps.to(device)


def load_rewards(cfg: OnlineConfig, device) -> tuple[list, list[float]]:
    """The reward callables of `cfg.reward` (reward models on `device`) and their weights; with
    `reward_uncertainty_penalty` the weighted sources become one `PenalisedEnsemble` (weight 1)
    and the weight-0 ones (watched, never optimised) stay as they are."""
    from alignkit.rollout.best_of_n import as_reward_fns
    from alignkit.rollout.rewards import PenalisedEnsemble

    fns, weights = as_reward_fns(cfg.reward, cfg.reward_weights, device, cfg.reward_dtype)
    if cfg.reward_uncertainty_penalty > 0:
        members = [(f, w) for f, w in zip(fns, weights) if w != 0]
        ensemble = PenalisedEnsemble([f for f, _ in members], [w for _, w in members], cfg.reward_uncertainty_penalty)
        watched = [f for f, w in zip(fns, weights) if w == 0]
        fns, weights = [ensemble, *watched], [1.0] + [0.0] * len(watched)
    return fns, weights


def load_prompts(cfg: OnlineConfig, tokenizer_from: str):
    """(training prompts, held-out prompts, truncation report, tokenizer) of an online run, tokenised
    with the tokenizer at `tokenizer_from` (the resumed checkpoint's, else the model's); a run whose
    every prompt was truncated stops here."""
    from alignkit.data import tokenize_prompts
    from alignkit.models.load import load_tokenizer
    from alignkit.train.common import load_train_eval

    records, eval_records = load_train_eval(cfg, "prompts")
    tokenizer = load_tokenizer(tokenizer_from)
    examples, report = tokenize_prompts(records, tokenizer, cfg.max_length, cfg.truncation)
    report.check_not_all_truncated(cfg.data, cfg.max_length)
    eval_examples, _ = tokenize_prompts(eval_records, tokenizer, cfg.max_length, cfg.truncation)
    return examples, eval_examples, report, tokenizer


@torch.no_grad()
def greedy_reward(policy, examples: list[dict], tokenizer, reward_fns, weights: list[float], cfg: OnlineConfig,
                  batch_size: int, device) -> dict[str, float]:
    """Mean reward of greedy completions of `examples` (as in training: the weighted sources minus
    missing_eos_penalty; a failed reward counts 0 under `reward_on_error mask`), their length and
    EOS rate, and each source's mean. Every process scores all of them (a held-out set is small),
    so every process logs the same numbers."""
    from alignkit.data import pad_batch
    from alignkit.rollout.rewards import score_rollout
    from alignkit.rollout.sampler import sample

    sums: dict[str, float] = {}
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        prompts = pad_batch(chunk, tokenizer.pad_token_id, side="left")
        roll = sample(policy, prompts["input_ids"].to(device), prompts["attention_mask"].to(device),
                      max_new_tokens=cfg.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, temperature=0.0)
        fields = {k: [ex["fields"].get(k) for ex in chunk] for k in chunk[0]["fields"]}
        rewards, _, per_source, _ = score_rollout(roll, tokenizer, reward_fns, weights, [ex["prompt"] for ex in chunk],
                                                  fields, on_error=getattr(cfg, "reward_on_error", "raise"),
                                                  timeout=cfg.reward_timeout,
                                                  missing_eos_penalty=getattr(cfg, "missing_eos_penalty", 0.0))
        for k, v in {"reward": float(rewards.sum()), "completion_length": float(roll.completion_mask.sum()),
                     "ended_with_eos": float(roll.ended.sum()),
                     **{f"reward/{name}": mean * len(chunk) for name, mean in per_source.items()}}.items():
            sums[k] = sums.get(k, 0.0) + v
    return {k: v / len(examples) for k, v in sums.items()}


def sample_rows(input_ids, attention_mask, completion_mask, rewards, tokenizer, n: int) -> list[dict]:
    """The first n rows of a rollout as {prompt, completion, reward} text, for log_completions."""
    c = completion_mask.shape[1]
    rows = []
    for i in range(min(n, len(input_ids))):
        prompt = input_ids[i, :-c][attention_mask[i, :-c].bool()] if c else input_ids[i][attention_mask[i].bool()]
        completion = input_ids[i, -c:][completion_mask[i].bool()] if c else input_ids[i, :0]
        rows.append({"prompt": tokenizer.decode(prompt, skip_special_tokens=True),
                     "completion": tokenizer.decode(completion, skip_special_tokens=True),
                     "reward": round(float(rewards[i]), 4)})
    return rows


def collate_prompts(examples: list[dict], pad_token_id: int) -> dict:
    from alignkit.data import pad_batch

    batch = pad_batch(examples, pad_token_id, side="left")
    batch["prompts"] = [ex["prompt"] for ex in examples]
    batch["fields"] = {k: [ex["fields"].get(k) for ex in examples] for k in examples[0]["fields"]}
    return batch


def sample_completions(policy, batch: dict, cfg: OnlineConfig, tokenizer, step: int, n: int, temperature: float):
    """n completions of each prompt of a collated `batch` (prompt-major), at `temperature`.

    Completion k of prompt i at step s draws from its own generator, seeded by (seed, s, i, k):
    the samples are the same however the prompts are split over processes and micro-batches,
    and a resumed run draws exactly what an uninterrupted one would. Each distinct prompt is
    prefilled once for its n completions (`sample(num_samples=n)`); the rollout's prompt_ids
    are [B * n, P], prompt-major."""
    from alignkit.rollout.sampler import completion_generators, sample

    return sample(policy, batch["input_ids"], batch["attention_mask"], num_samples=n,
                  max_new_tokens=cfg.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, temperature=temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                  generator=completion_generators(cfg.seed * 1_000_003 + step, batch["ids"].tolist(), n))


def whiten_over_processes(x, mask, accelerator):
    """`masked_whiten` with the mean and (unbiased) variance over every process's tokens."""
    from alignkit.ops import masked_whiten

    if accelerator.num_processes == 1:
        return masked_whiten(x, mask)
    m = mask.to(x.dtype)
    n, total = accelerator.reduce(torch.stack([m.sum(), (x * m).sum()]), "sum")
    mean = total / n
    var = accelerator.reduce(((x - mean) ** 2 * m).sum(), "sum") / (n - 1)
    return torch.where(mask.bool(), (x - mean) * torch.rsqrt(var + 1e-8), 0.0)
