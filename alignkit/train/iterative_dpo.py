"""Iterative (online) DPO: the policy samples its own pairs, a reward labels them, DPO learns, repeat.

    alignkit iterative-dpo --model runs/demo/sft --data prompts.jsonl --reward runs/demo/rm \\
        --rounds 3 --num_samples 4 --beta 0.1
    alignkit iterative-dpo --config idpo.yaml --reward alignkit.tasks.annotators:...   # any reward source

Offline DPO learns from pairs some other policy wrote; its gains stop where those pairs
stop being informative about the current policy. Iterative DPO (Xu et al. 2023, "Some
things are more CRINGE than others"; Xiong et al. 2024, "Iterative preference learning
from human feedback"; Guo et al. 2024, online AI feedback) draws fresh pairs each round
from the policy being trained. Each round r:

1. the CURRENT policy (round r-1's model; the starting model for r = 0) samples K =
   `num_samples` completions of every prompt, each scored once by `reward` (reward-model
   directories and/or `module:function`, as the online trainers take);
2. each prompt gives one pair: its highest-reward completion as chosen, its lowest as
   rejected; a prompt whose best and worst differ by no more than `min_reward_gap` (a tie)
   is skipped and counted, as are completions cut off at max_new_tokens (`require_eos`);
3. DPO on the round's pairs (-log sigmoid(beta h), h the chosen-minus-rejected log-ratio to
   the reference; alignkit/losses/dpo.py), trained on the SAMPLED ids, against the starting
   model (`reference initial`: every round's KL is to it) or the round's start model
   (`reference previous`: each round a trust region around the last).

Written under `output_dir`: round-{r}/pairs.jsonl (a dpo file: prompt, chosen, rejected,
plus each side's reward, ids and log-prob under the policy that sampled it), round-{r}/
(the model after round r), rounds.jsonl and the final model. `resume auto` skips finished
rounds, and resumes the unfinished one from its latest checkpoint after drawing the same
samples again (sampling depends only on the round's start model and (seed, round)).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

from alignkit.config import require
from alignkit.rollout.best_of_n import Samples
from alignkit.train.bon import ROUND_DONE, _sample, _write_jsonl, finished_rounds, held_out_reward
from alignkit.train.common import print_summary, say
from alignkit.losses.preference import needs_reference
from alignkit.train.dpo import PreferenceLossKeys, make_dpo_step, pair_count
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
from alignkit.train.reference import make_reference


@dataclass
class IterativeDPOConfig(PreferenceLossKeys, OnlineConfig):
    """Iterative DPO: pairs sampled from the current policy, labelled by a reward, DPO on them, repeat."""

    lr: float = 5e-5
    """Peak learning rate (AdamW) of each round's DPO."""
    rounds: int = 3
    """R: sample -> label -> DPO rounds, each sampling from the previous round's model."""
    num_samples: int = 4
    """K: completions sampled per prompt; the pair is the best and the worst of them by reward."""
    reference: Literal["initial", "previous"] = "initial"
    """DPO's reference: the starting model in every round, or the round's start model (the previous round's)."""
    min_reward_gap: float = 0.0
    """Skip (and count) a prompt whose best and worst completions differ in reward by no more than this."""
    require_eos: bool = True
    """Pair only completions that emitted EOS (the others are dropped and counted)."""
    share_prompt: bool = True
    """One row per pair, [prompt | chosen | rejected]: the prompt goes through the model once."""
    generation_batch_size: int = 64
    """Completions per sampling call (batch_size counts pairs per micro-batch)."""
    eval_fraction: float = 0.1
    """Fraction of prompts held out for the greedy-reward evaluation when `eval_data` is empty."""

    def validate(self) -> None:
        from alignkit.config import ConfigError

        super().validate()
        self.check_loss_keys()
        if self.num_samples < 2 or self.rounds < 1:
            raise ConfigError(f"num_samples must be >= 2 (a pair) and rounds >= 1, got {self.num_samples} and "
                              f"{self.rounds}")
        if self.min_reward_gap < 0:
            raise ConfigError(f"min_reward_gap must be >= 0, got {self.min_reward_gap}")


@dataclass
class RoundReport:
    """What one round sampled, paired and learned."""

    round: int
    samples: int
    sample_reward: float
    """Mean reward of all samples of the round."""
    pairs: int
    chosen_reward: float
    """Mean reward of the chosen completions (nan when no pair)."""
    rejected_reward: float
    dropped_no_eos: int
    """Samples cut off at max_new_tokens, dropped because require_eos."""
    skipped_ties: int
    """Prompts whose best and worst differ by no more than min_reward_gap."""
    skipped_few: int
    """Prompts with fewer than 2 completions left after dropping."""
    ended_fraction: float
    steps: int = 0
    eval_reward_before: float | None = None
    eval_reward_after: float | None = None

    def line(self) -> str:
        s = (f"round {self.round}: {self.samples} samples, mean reward {self.sample_reward:.4f}, "
             f"{self.ended_fraction:.0%} ended with EOS; {self.pairs} pairs (chosen {self.chosen_reward:.4f}, "
             f"rejected {self.rejected_reward:.4f}); skipped {self.skipped_ties} ties, {self.skipped_few} prompts "
             f"with fewer than 2 completions, dropped {self.dropped_no_eos} without EOS")
        s += f"; {self.steps} steps" if self.steps else ""
        if self.eval_reward_before is not None:
            s += f"; held-out greedy reward {self.eval_reward_before:.4f}"
            s += f" -> {self.eval_reward_after:.4f}" if self.eval_reward_after is not None else " before"
        return s


@dataclass
class IterativeDPOResult(TrainResult):
    rounds: list[RoundReport] = field(default_factory=list)


def best_worst_pairs(samples: Samples, require_eos: bool, min_gap: float) -> tuple[list[tuple[int, int]], dict]:
    """Per prompt, (chosen, rejected) = the rows of its highest and lowest reward among its eligible rows
    (all, or those that ended with require_eos; ties broken by the first row). A prompt with fewer than
    2 eligible rows, or whose best - worst <= min_gap, gives no pair; each is counted."""
    pairs, counts = [], {"dropped_no_eos": 0, "skipped_ties": 0, "skipped_few": 0}
    for i in range(len(samples.rewards) // samples.n):
        eligible = [j for j in samples.group(i) if samples.ended[j] or not require_eos]
        counts["dropped_no_eos"] += samples.n - len(eligible)
        if len(eligible) < 2:
            counts["skipped_few"] += 1
            continue
        best = max(eligible, key=samples.rewards.__getitem__)
        worst = min(eligible, key=samples.rewards.__getitem__)
        if samples.rewards[best] - samples.rewards[worst] <= min_gap:
            counts["skipped_ties"] += 1
            continue
        pairs.append((best, worst))
    return pairs, counts


def pair_examples(prompt_examples: list[dict], samples: Samples, pairs: list[tuple[int, int]]) -> list[dict]:
    """DPO examples (tokenize_responses' layout) of the pairs from the prompt ids and the SAMPLED completion
    ids, chosen first; the loss mask covers each completion (with the EOS it sampled, none if cut off)."""
    examples = []
    for k, (chosen, rejected) in enumerate(pairs):
        prompt = list(prompt_examples[chosen // samples.n]["input_ids"])
        sequences = [prompt + list(samples.completion_ids[j]) for j in (chosen, rejected)]
        masks = [[0] * len(prompt) + [1] * len(samples.completion_ids[j]) for j in (chosen, rejected)]
        examples.append({"id": k, "sequences": sequences, "loss_masks": masks,
                         "input_ids": sequences[0] + sequences[1]})
    return examples


def _sampler_logprobs(model, prompt_examples, samples: Samples, rows: list[int], pad: int, batch_size: int,
                      temperature: float) -> list[float]:
    """sum_t log pi(y_t | x, y_<t) of each row under `model` at the sampling temperature: recorded with the pairs,
    so that anyone can check which policy wrote them."""
    from alignkit.evaluate.policies import completion_logprobs

    return completion_logprobs(model, [prompt_examples[j // samples.n] for j in rows],
                               [samples.completion_ids[j] for j in rows], 1, pad, batch_size, temperature)[0]


def run(cfg: IterativeDPOConfig) -> IterativeDPOResult:
    from alignkit.data import pad_groups
    from alignkit.data.tokenize import pad_shared_prompt
    from alignkit.models.load import load_causal_lm

    require(cfg, "model", "reward", "data")
    cfg.validate()
    if cfg.resume not in ("", "auto"):
        raise ValueError("iterative-dpo: resume takes 'auto' (finished rounds are skipped, the unfinished one "
                         "resumes from its latest checkpoint); a single checkpoint path does not say which round")
    if not cfg.resume:
        resolve_resume(cfg)  # claims output_dir: refuses another run's outputs, or clears them with overwrite
    examples, eval_examples, report, tokenizer = load_prompts(cfg, cfg.model)
    out = Path(cfg.output_dir)
    accelerator = make_accelerator(cfg, "iterative-dpo")
    reward_fns, weights = load_rewards(cfg, accelerator.device)
    if accelerator.is_main_process:
        write_config(cfg, out)
    done, start_model = finished_rounds(out, cfg.rounds, cfg.resume, cfg.model)
    reports = [RoundReport(**r) for r in done]
    if reports:
        say(f"iterative-dpo: resuming after round {len(reports) - 1} ({start_model})")
    say(f"iterative-dpo: {len(examples)} prompts x {cfg.num_samples} samples, {cfg.rounds} rounds, beta {cfg.beta}, "
        f"reference {cfg.reference}; {report}")
    pad = pad_shared_prompt if cfg.share_prompt else pad_groups
    collate = lambda b: pad(b, tokenizer.pad_token_id)  # noqa: E731

    model = load_trainable_model(replace(cfg, model=start_model), None).to(accelerator.device)
    eval_before = reports[-1].eval_reward_after if reports else held_out_reward(
        cfg, model, tokenizer, eval_examples, reward_fns, weights, accelerator)
    history, skipped, seconds = [], 0, 0.0
    for r in range(len(reports), cfg.rounds):
        round_dir = out / f"round-{r}"
        model.eval()
        samples = _sample(cfg, model, tokenizer, examples, reward_fns, weights, accelerator,
                          n=cfg.num_samples, temperature=cfg.temperature, seed=cfg.seed * 1_000_003 + r)
        pairs, counts = best_worst_pairs(samples, cfg.require_eos, cfg.min_reward_gap)
        chosen, rejected = [samples.rewards[c] for c, _ in pairs], [samples.rewards[j] for _, j in pairs]
        rep = RoundReport(
            round=r, samples=len(samples.rewards), sample_reward=sum(samples.rewards) / max(len(samples.rewards), 1),
            pairs=len(pairs), chosen_reward=sum(chosen) / len(pairs) if pairs else float("nan"),
            rejected_reward=sum(rejected) / len(pairs) if pairs else float("nan"),
            ended_fraction=sum(samples.ended) / max(len(samples.ended), 1), eval_reward_before=eval_before, **counts)
        say(f"iterative-dpo {rep.line()}")
        if not pairs:
            raise TrainingError(
                f"iterative-dpo round {r}: no pair from {len(examples)} prompts ({rep.skipped_ties} ties within "
                f"min_reward_gap {cfg.min_reward_gap}, {rep.skipped_few} with fewer than 2 completions, "
                f"{rep.dropped_no_eos} completions without EOS): nothing to learn from. Raise num_samples or "
                "max_new_tokens, lower min_reward_gap, or set require_eos false.")
        if accelerator.is_main_process:
            rows = [j for pair in pairs for j in pair]
            logps = _sampler_logprobs(accelerator.unwrap_model(model), examples, samples, rows,
                                      tokenizer.pad_token_id, cfg.generation_batch_size, cfg.temperature)
            _write_jsonl(round_dir / "pairs.jsonl", [
                {"prompt": examples[c // samples.n]["prompt"], "chosen": samples.texts[c], "rejected": samples.texts[j],
                 "chosen_reward": samples.rewards[c], "rejected_reward": samples.rewards[j], "round": r,
                 "chosen_ids": samples.completion_ids[c], "rejected_ids": samples.completion_ids[j],
                 "chosen_logp": logps[2 * k], "rejected_logp": logps[2 * k + 1]}
                for k, (c, j) in enumerate(pairs)])

        round_cfg = replace(cfg, output_dir=str(round_dir), model=start_model)
        resume_from = latest_checkpoint(round_dir) if cfg.resume == "auto" else None
        if resume_from is not None:  # the samples came from the round's start model; the weights from the checkpoint
            model = load_trainable_model(round_cfg, resume_from).to(accelerator.device)
        # initial: the starting model (loaded as a copy, also under LoRA: the adapters merge each round)
        reference = make_reference(start_model, cfg.model if cfg.reference == "initial" else "", cfg.lora_r > 0,
                                   accelerator.device, accelerator.autocast) if needs_reference(cfg.loss_type) else None
        trained = train(
            round_cfg, model, tokenizer, pair_examples(examples, samples, pairs), make_dpo_step(cfg, reference),
            pair_count, collate, name=f"iterative-dpo-round-{r}", resume_from=resume_from, accelerator=accelerator,
            # eval_steps > 0: the held-out greedy reward during the round too (before and after are in the report)
            eval_examples=eval_examples if cfg.eval_steps > 0 else None,
            eval_fn=lambda m: greedy_reward(accelerator.unwrap_model(m), eval_examples, tokenizer, reward_fns, weights, cfg,
                                            cfg.generation_batch_size, accelerator.device))
        del reference
        start_model = str(round_dir)  # the next round samples from the model just saved (LoRA: merged)
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
        load_causal_lm(start_model).save_pretrained(out)
        tokenizer.save_pretrained(out)
        _write_jsonl(out / "rounds.jsonl", [asdict(rep) for rep in reports])
    accelerator.wait_for_everyone()
    result = IterativeDPOResult(
        output_dir=out, steps=sum(rep.steps for rep in reports), history=history, skipped_steps=skipped,
        train_seconds=seconds, device=str(accelerator.device), precision=accelerator.mixed_precision, rounds=reports)
    if reports[0].eval_reward_before is not None:
        result.initial_eval_metrics = {"greedy_reward": reports[0].eval_reward_before}
        result.eval_metrics = {"greedy_reward": reports[-1].eval_reward_after}
    if accelerator.is_main_process:
        from alignkit.models.card import write_model_card
        from alignkit.train.loop import config_dict

        write_model_card(out, "iterative-dpo", cfg, config_dict(cfg), result.eval_metrics, result.initial_eval_metrics)
        print_summary("iterative-dpo", result, [str(report)] + [rep.line() for rep in reports])
    return result


def main(argv: list[str] | None = None) -> IterativeDPOResult:
    from alignkit.config import parse_config

    return run(parse_config(IterativeDPOConfig, sys.argv[1:] if argv is None else argv,
                            prog="alignkit iterative-dpo"))
