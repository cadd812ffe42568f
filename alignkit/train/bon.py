"""Rejection sampling ("iterative SFT", Touvron et al. 2023; RAFT, Dong et al. 2023).

    alignkit bon --model runs/demo/sft --data prompts.jsonl \\
        --reward alignkit.tasks.arithmetic:exact_match --num_samples 16 --rounds 3
    alignkit bon --config bon.yaml --keep threshold --threshold 0.5

Each round the CURRENT policy samples N = `num_samples` completions per prompt; every
completion is scored once by `reward`; the best of each prompt (`keep best`) or all
with reward >= `threshold` (`keep threshold`) are kept; the policy is fine-tuned on
them with the next-token loss on the completion tokens (the shared loop), and the next
round samples from the fine-tuned model. The training examples are the prompt ids and
the SAMPLED completion ids, never the decoded text re-encoded (text does not always
survive decode -> re-encode). Completions cut off at `max_new_tokens` are dropped and
counted (`require_eos`), or trained on without an EOS appended: they did not end.

Written under `output_dir`: round-{r}/selected.jsonl (what was kept), round-{r}/ (the
model after round r and its metrics.jsonl), rounds.jsonl (one report per round) and
the final model itself. `resume auto` skips finished rounds and resumes the unfinished
one from its latest checkpoint, after drawing the same samples again.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

from alignkit.config import require
from alignkit.rollout.best_of_n import Samples, sample_and_score
from alignkit.train.common import lm_count, lm_step, print_summary, say
from alignkit.train.loop import (
    TrainingError,
    TrainResult,
    latest_checkpoint,
    load_trainable_model,
    make_accelerator,
    resolve_resume,
    train,
    write_config,
)
from alignkit.train.online import OnlineConfig, greedy_reward, load_prompts, load_rewards

ROUND_DONE = "round.json"


@dataclass
class BoNConfig(OnlineConfig):
    """Rejection sampling: N samples per prompt, keep the best, fine-tune on them, repeat."""

    lr: float = 2e-4
    """Peak learning rate (AdamW) of each round's fine-tuning."""
    num_samples: int = 16
    """N: completions sampled per prompt in each round."""
    kl_budget: float = 0.0
    """Choose N for a KL budget instead: the largest N whose best-of-N bound log N - (N-1)/N is within it, in nats per round (keep best only; fine-tuning on the kept samples adds KL of its own; 0: use num_samples)."""
    rounds: int = 1
    """R: sample -> select -> fine-tune rounds, each sampling from the previous round's model."""
    keep: Literal["best", "threshold"] = "best"
    """best: the highest-reward completion of each prompt; threshold: every completion with reward >= threshold."""
    threshold: float = 0.0
    """Lowest reward kept when keep=threshold."""
    require_eos: bool = True
    """Drop (and count) completions that reached max_new_tokens without EOS."""
    generation_batch_size: int = 64
    """Completions per sampling call (batch_size is the fine-tuning micro-batch)."""
    eval_fraction: float = 0.1
    """Fraction of prompts held out for the greedy-reward evaluation when `eval_data` is empty."""


@dataclass
class RoundReport:
    """What one round sampled, kept and learned."""

    round: int
    samples: int
    sample_reward: float
    """Mean reward of all samples of the round."""
    kept: int
    kept_reward: float
    """Mean reward of the kept samples (nan when none)."""
    dropped_no_eos: int
    """Samples cut off at max_new_tokens, dropped because require_eos."""
    not_selected: int
    """Samples eligible but not kept (not the best of their prompt, or under the threshold)."""
    ended_fraction: float
    """Share of samples that emitted EOS."""
    steps: int = 0
    eval_reward_before: float | None = None
    """Mean held-out greedy reward before the round (None: no held-out prompts)."""
    eval_reward_after: float | None = None
    """Mean held-out greedy reward after the round."""

    def line(self) -> str:
        s = (f"round {self.round}: {self.samples} samples, mean reward {self.sample_reward:.4f}, "
             f"{self.ended_fraction:.0%} ended with EOS; kept {self.kept} (mean reward {self.kept_reward:.4f}), "
             f"dropped {self.dropped_no_eos} without EOS, {self.not_selected} not selected")
        s += f"; {self.steps} steps" if self.steps else ""
        if self.eval_reward_before is not None:
            s += f"; held-out greedy reward {self.eval_reward_before:.4f}"
            s += f" -> {self.eval_reward_after:.4f}" if self.eval_reward_after is not None else " before"
        return s


@dataclass
class BoNResult(TrainResult):
    rounds: list[RoundReport] = field(default_factory=list)


def select(samples: Samples, keep: str, threshold: float, require_eos: bool) -> tuple[list[int], dict[str, int]]:
    """Rows of `samples` to train on, and counts of what was dropped.

    Eligible rows: all, or with require_eos only those that ended. keep="best": each
    prompt's highest-reward eligible row (ties: the first); keep="threshold": every
    eligible row with reward >= threshold.
    """
    if keep not in ("best", "threshold"):
        raise ValueError(f"keep must be 'best' or 'threshold', got {keep!r}")
    kept: list[int] = []
    no_eos = 0
    for i in range(len(samples.rewards) // samples.n):
        eligible = [j for j in samples.group(i) if samples.ended[j] or not require_eos]
        no_eos += samples.n - len(eligible)
        if keep == "best":
            kept += [max(eligible, key=samples.rewards.__getitem__)] if eligible else []
        else:
            kept += [j for j in eligible if samples.rewards[j] >= threshold]
    return kept, {"dropped_no_eos": no_eos, "not_selected": len(samples.rewards) - len(kept) - no_eos}


def sft_examples(prompt_examples: list[dict], samples: Samples, rows: list[int]) -> list[dict]:
    """SFT examples of the kept rows: prompt ids + SAMPLED completion ids, loss on the completion.

    The completion keeps the EOS it sampled (trained on: the model learns to stop); a
    cut-off completion gets none appended.
    """
    examples = []
    for k, j in enumerate(rows):
        prompt, completion = prompt_examples[j // samples.n]["input_ids"], samples.completion_ids[j]
        examples.append({"id": k, "input_ids": list(prompt) + list(completion),
                         "loss_mask": [0] * len(prompt) + [1] * len(completion)})
    return examples


def _sample(cfg: BoNConfig, model, tokenizer, examples, reward_fns, weights, accelerator, *, n: int,
            temperature: float, seed: int) -> Samples:
    """`sample_and_score` over every prompt, the prompts shared out over the processes and the
    samples gathered back, so every process holds the same samples in the same order. Each
    completion draws from its own (seed, prompt id, k) generator: the samples are those of a
    1-process run."""
    rank, world = accelerator.process_index, accelerator.num_processes
    with accelerator.autocast():
        mine = sample_and_score(
            model, tokenizer, examples[rank::world], n, reward_fns, weights, max_new_tokens=cfg.max_new_tokens,
            temperature=temperature, top_k=cfg.top_k, top_p=cfg.top_p, batch_size=cfg.generation_batch_size,
            seed=seed, timeout=cfg.reward_timeout,
        )
    if world == 1:
        return mine
    from accelerate.utils import gather_object

    groups = [(rank + i * world, [(mine.completion_ids[j], mine.texts[j], mine.rewards[j], mine.ended[j])
                                  for j in mine.group(i)]) for i in range(len(mine.rewards) // n)]
    rows = [row for _, group in sorted(gather_object(groups)) for row in group]
    ids, texts, rewards, ended = (list(col) for col in zip(*rows)) if rows else ([], [], [], [])
    return Samples(n=n, completion_ids=ids, texts=texts, rewards=rewards, ended=ended)


def finished_rounds(out: Path, rounds: int, resume: str, model: str) -> tuple[list[dict], str]:
    """With resume auto: the reports (round.json) of the rounds under `out` that finished, in order, and the model
    the next round starts from (the last finished round's, else `model`)."""
    done: list[dict] = []
    while resume == "auto" and len(done) < rounds and (out / f"round-{len(done)}" / ROUND_DONE).exists():
        done.append(json.loads((out / f"round-{len(done)}" / ROUND_DONE).read_text()))
    return done, str(out / f"round-{len(done) - 1}") if done else model


def held_out_reward(cfg, model, tokenizer, examples, reward_fns, weights, accelerator) -> float | None:
    """Mean reward of greedy completions of the held-out prompts (`online.greedy_reward`; None: there are none)."""
    if not examples:
        return None
    metrics = greedy_reward(model, examples, tokenizer, reward_fns, weights, cfg, cfg.generation_batch_size,
                            accelerator.device)
    return metrics["reward"]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def run(cfg: BoNConfig) -> BoNResult:
    from alignkit.data import pad_batch
    from alignkit.models.load import load_causal_lm

    require(cfg, "model", "reward", "data")
    if cfg.kl_budget < 0 or (cfg.kl_budget > 0 and cfg.keep != "best"):
        raise ValueError(f"bon: kl_budget ({cfg.kl_budget}) must be >= 0, and sets N for keep best only")
    if cfg.kl_budget > 0:
        from alignkit.rollout.best_of_n import best_of_n_for_kl

        cfg = replace(cfg, num_samples=best_of_n_for_kl(cfg.kl_budget))
    if cfg.num_samples < 1 or cfg.rounds < 1:
        raise ValueError(f"bon: num_samples ({cfg.num_samples}) and rounds ({cfg.rounds}) must be at least 1")
    if cfg.resume not in ("", "auto"):
        raise ValueError("bon: resume takes 'auto' (finished rounds are skipped, the unfinished one resumes "
                         "from its latest checkpoint); a single checkpoint path does not say which round")
    if not cfg.resume:
        resolve_resume(cfg)  # claims output_dir: refuses another run's outputs, or clears them with overwrite
    examples, eval_examples, report, tokenizer = load_prompts(cfg, cfg.model)
    out = Path(cfg.output_dir)
    accelerator = make_accelerator(cfg, "bon")
    reward_fns, weights = load_rewards(cfg, accelerator.device)

    if accelerator.is_main_process:
        write_config(cfg, out)

    # resume=auto: the rounds that finished are read back, and the next one starts from
    # the last finished model. Sampling depends only on that model and (seed, round).
    done, start_model = finished_rounds(out, cfg.rounds, cfg.resume, cfg.model)
    reports = [RoundReport(**r) for r in done]
    if reports:
        say(f"bon: resuming after round {len(reports) - 1} ({start_model})")
    say(f"bon: {len(examples)} prompts x {cfg.num_samples} samples"
        + (f" (the most within KL budget {cfg.kl_budget:g})" if cfg.kl_budget > 0 else "")
        + f", {cfg.rounds} rounds, keep {cfg.keep}"
        f"{f' >= {cfg.threshold}' if cfg.keep == 'threshold' else ''}; {report}")

    model = load_trainable_model(replace(cfg, model=start_model), None).to(accelerator.device)
    eval_before = reports[-1].eval_reward_after if reports else held_out_reward(
        cfg, model, tokenizer, eval_examples, reward_fns, weights, accelerator)
    history, skipped, seconds = [], 0, 0.0
    for r in range(len(reports), cfg.rounds):
        round_dir = out / f"round-{r}"
        samples = _sample(cfg, model, tokenizer, examples, reward_fns, weights, accelerator,
                          n=cfg.num_samples, temperature=cfg.temperature, seed=cfg.seed * 1_000_003 + r)
        rows, counts = select(samples, cfg.keep, cfg.threshold, cfg.require_eos)
        kept_rewards = [samples.rewards[j] for j in rows]
        rep = RoundReport(
            round=r, samples=len(samples.rewards), sample_reward=sum(samples.rewards) / max(len(samples.rewards), 1),
            kept=len(rows), kept_reward=sum(kept_rewards) / len(rows) if rows else float("nan"),
            ended_fraction=sum(samples.ended) / max(len(samples.ended), 1), eval_reward_before=eval_before, **counts,
        )
        if accelerator.is_main_process:
            _write_jsonl(round_dir / "selected.jsonl", [
                {"prompt": examples[j // samples.n]["prompt"], "completion": samples.texts[j],
                 "reward": samples.rewards[j], "ended": samples.ended[j], "completion_ids": samples.completion_ids[j]}
                for j in rows])
        say(f"bon {rep.line()}")
        if not rows:
            best = max(samples.rewards, default=float("nan"))
            raise TrainingError(
                f"bon round {r}: 0 of {rep.samples} completions kept ({rep.dropped_no_eos} dropped without EOS, "
                f"{rep.not_selected} not selected; highest reward {best:.4f}"
                f"{f', threshold {cfg.threshold}' if cfg.keep == 'threshold' else ''}): nothing to fine-tune on. "
                "Lower `threshold`, raise `max_new_tokens`, or set `require_eos false`.")

        round_cfg = replace(cfg, output_dir=str(round_dir), model=start_model)
        resume_from = latest_checkpoint(round_dir) if cfg.resume == "auto" else None
        if resume_from is not None:  # the samples came from the round's start model; the weights from the checkpoint
            model = load_trainable_model(round_cfg, resume_from)
        trained = train(
            round_cfg, model, tokenizer, sft_examples(examples, samples, rows), lm_step, lm_count,
            lambda b: pad_batch(b, tokenizer.pad_token_id), name=f"bon-round-{r}", resume_from=resume_from,
            # eval_steps > 0: the held-out greedy reward during the round too (before and after are in the report)
            eval_examples=eval_examples if cfg.eval_steps > 0 else None,
            eval_fn=lambda m: greedy_reward(accelerator.unwrap_model(m), eval_examples, tokenizer, reward_fns, weights, cfg,
                                            cfg.generation_batch_size, accelerator.device),
        )
        # The next round samples from the model just saved: with LoRA that is the merged
        # model, which gets fresh adapters.
        start_model = str(round_dir)
        model = load_trainable_model(replace(cfg, model=start_model), None).to(accelerator.device)
        rep.steps = trained.steps
        rep.eval_reward_after = eval_before = held_out_reward(cfg, model, tokenizer, eval_examples, reward_fns, weights,
                                                              accelerator)
        history += [{"round": r, **h} for h in trained.history]
        skipped, seconds = skipped + trained.skipped_steps, seconds + trained.train_seconds
        if accelerator.is_main_process:
            (round_dir / ROUND_DONE).write_text(json.dumps(asdict(rep), indent=1))
        accelerator.wait_for_everyone()
        reports.append(rep)

    if accelerator.is_main_process:
        final = load_causal_lm(start_model)
        final.save_pretrained(out)
        tokenizer.save_pretrained(out)
        _write_jsonl(out / "rounds.jsonl", [asdict(rep) for rep in reports])
    accelerator.wait_for_everyone()
    result = BoNResult(
        output_dir=out, steps=sum(rep.steps for rep in reports), history=history,
        skipped_steps=skipped, train_seconds=seconds,
        device=str(accelerator.device), precision=accelerator.mixed_precision, rounds=reports,
    )
    if reports[0].eval_reward_before is not None:
        result.initial_eval_metrics = {"greedy_reward": reports[0].eval_reward_before}
        result.eval_metrics = {"greedy_reward": reports[-1].eval_reward_after}
    if accelerator.is_main_process:
        from alignkit.models.card import write_model_card
        from alignkit.train.loop import config_dict

        write_model_card(out, "bon", cfg, config_dict(cfg), result.eval_metrics, result.initial_eval_metrics)
        print_summary("bon", result, [str(report)] + [rep.line() for rep in reports])
    return result


def main(argv: list[str] | None = None) -> BoNResult:
    from alignkit.config import parse_config

    return run(parse_config(BoNConfig, sys.argv[1:] if argv is None else argv, prog="alignkit bon"))
