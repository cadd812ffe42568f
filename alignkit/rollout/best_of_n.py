"""Best-of-N at inference: sample N completions per prompt, score each once, keep the best.

    from alignkit.rollout.best_of_n import best_of_n
    from alignkit.rollout.rewards import load_reward_fn

    out = best_of_n(model, tokenizer, ["What is 2+3?"], n=16,
                    reward_fns=[load_reward_fn("runs/rm")], max_new_tokens=24, seed=0)
    out[0]["best"], out[0]["best_reward"], out[0]["rewards"]   # text, its reward, all 16 rewards

Best-of-N shows how much reward a small KL to the policy can buy (its KL is at most
log N - (N-1)/N nats), so it is the frontier trained policies are measured against.
The sampled token ids are kept next to the decoded text: text does not always survive
decode -> re-encode, so whoever trains on or re-scores a completion should use the ids.
A completion that reached `max_new_tokens` without EOS is kept and flagged (`ended`
False): it was cut off, not finished, and no EOS is appended to it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Samples:
    """n completions of each of P prompts, prompt-major: prompt i owns rows i*n .. i*n + n - 1.

    completion_ids: the sampled ids of each row, including the EOS that ended it (none if cut off).
    texts: each row decoded without special tokens; rewards: each row's weighted reward.
    ended: True when the row emitted EOS within max_new_tokens.
    """

    n: int
    completion_ids: list[list[int]]
    texts: list[str]
    rewards: list[float]
    ended: list[bool]

    def group(self, i: int) -> range:
        """The rows of prompt i."""
        return range(i * self.n, (i + 1) * self.n)


def best_of_n_kl_bound(n: int) -> float:
    """KL(best-of-n || pi) <= log n - (n - 1) / n nats (Beirami et al. 2024; exact for continuous rewards)."""
    return math.log(n) - (n - 1) / n


def best_of_n_for_kl(budget: float) -> int:
    """The largest n whose best-of-n KL bound log n - (n - 1) / n is within `budget` nats (n >= 1)."""
    if budget < 0:
        raise ValueError(f"a KL budget must be >= 0, got {budget}")
    n = 1
    while best_of_n_kl_bound(n + 1) <= budget:
        n += 1
    return n


def as_reward_fns(reward_fns, weights: list[float] | None, device=None,
                  dtype: str = "float32") -> tuple[list[Callable], list[float]]:
    """Reward sources as a list of callables (a `module:function` or reward-model path is loaded,
    onto `device` and stored as `dtype`) and their weights."""
    from alignkit.rollout.rewards import load_reward_fn

    fns = list(reward_fns) if isinstance(reward_fns, (list, tuple)) else [reward_fns]
    fns = [load_reward_fn(f, device, dtype) if isinstance(f, str) else f for f in fns]
    if not fns:
        raise ValueError("best-of-n needs at least one reward function")
    weights = list(weights) if weights else [1.0] * len(fns)
    if len(weights) != len(fns):
        raise ValueError(f"{len(weights)} reward weights for {len(fns)} reward functions")
    return fns, weights


@torch.no_grad()
def sample_and_score(model, tokenizer, examples: list[dict], n: int, reward_fns: list[Callable], weights: list[float],
                     *, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                     batch_size: int = 64, seed: int = 0, timeout: float | None = None) -> Samples:
    """Sample `n` completions of each prompt example (from `tokenize_prompts`) and score each once.

    `batch_size` counts completions per `sample` call: batch_size // n prompts (at least
    one), each prefilled once for its n completions; a prompt's group is never split.
    Completion k of the example with id i draws from its own generator seeded by (seed, i, k)
    (`completion_generators`): the samples do not depend on `batch_size` or on how the
    examples were shared out over processes. With no `reward_fns` every reward is 0: plain
    generation (the app's contestants).
    """
    from alignkit.data import pad_batch
    from alignkit.rollout.rewards import score_rollout
    from alignkit.rollout.sampler import completion_generators, sample

    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    device = next(model.parameters()).device
    per_call = max(1, batch_size // n)
    out = Samples(n=n, completion_ids=[], texts=[], rewards=[], ended=[])
    for start in range(0, len(examples), per_call):
        chunk = examples[start : start + per_call]
        batch = pad_batch(chunk, tokenizer.pad_token_id, side="left")
        rollout = sample(
            model, batch["input_ids"].to(device), batch["attention_mask"].to(device), num_samples=n,
            max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            temperature=temperature, top_k=top_k, top_p=top_p,
            generator=completion_generators(seed, [ex.get("id", start + j) for j, ex in enumerate(chunk)], n),
        )
        ids, mask = rollout.completion_ids.cpu(), rollout.completion_mask.cpu()
        fields = {k: [ex["fields"].get(k) for ex in chunk] for k in chunk[0].get("fields", {})}
        rewards, _, _, texts = score_rollout(rollout, tokenizer, reward_fns, weights, [ex["prompt"] for ex in chunk],
                                             fields, n, timeout=timeout)
        out.completion_ids += [row[m.bool()].tolist() for row, m in zip(ids, mask)]
        out.texts += texts
        out.rewards += rewards.tolist()
        out.ended += rollout.ended.cpu().tolist()
    return out


def best_of_n(model, tokenizer, prompts: list[str], n: int, reward_fns, weights: list[float] | None = None,
              fields: dict[str, list] | None = None, *, max_new_tokens: int, temperature: float = 1.0,
              top_k: int = 0, top_p: float = 1.0, batch_size: int = 64, seed: int = 0) -> list[dict]:
    """The highest-reward of `n` sampled completions of each prompt.

    reward_fns: callables `f(prompts, completions, **fields) -> list[float]` (or their
    `module:function` / reward-model specs), summed with `weights` (default 1 each).
    fields: extra per-prompt values for the reward functions, e.g. {"answer": [5, 7]}.
    Returns one dict per prompt: prompt, best (text), best_token_ids (the sampled ids,
    with the EOS if it ended), best_reward, rewards (all n, in sampling order) and
    ended (whether the best one emitted EOS). Ties go to the first sample.
    """
    from alignkit.data import tokenize_prompts

    fns, weights = as_reward_fns(reward_fns, weights)
    fields = fields or {}
    for k, v in fields.items():
        if len(v) != len(prompts):
            raise ValueError(f"field '{k}' has {len(v)} values for {len(prompts)} prompts")
    records = [{"prompt": p, **{k: v[i] for k, v in fields.items()}} for i, p in enumerate(prompts)]
    # No truncation: a prompt given here is continued as it is.
    examples, _ = tokenize_prompts(records, tokenizer, max_length=2**62)
    s = sample_and_score(model, tokenizer, examples, n, fns, weights, max_new_tokens=max_new_tokens,
                         temperature=temperature, top_k=top_k, top_p=top_p, batch_size=batch_size, seed=seed)
    results = []
    for i, ex in enumerate(examples):
        rows = s.group(i)
        rewards = [s.rewards[j] for j in rows]
        best = rows[max(range(n), key=rewards.__getitem__)]
        results.append({
            "prompt": ex["prompt"], "best": s.texts[best], "best_token_ids": s.completion_ids[best],
            "best_reward": s.rewards[best], "rewards": rewards, "ended": s.ended[best],
        })
    return results
