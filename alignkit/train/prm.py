"""Process reward models: a score per reasoning step (Lightman et al. 2023, "Let's Verify Step by Step").

    alignkit prm --model runs/sft --data steps.jsonl --step_separator ";" --max_steps 300

Data (kind `steps`): `prompt`, `steps` (strings), `labels` (one per step: 0/1 from a step checker, or a
float in [0, 1] such as a Monte-Carlo estimate of P(a completion from this step reaches the answer)).
The row is [prompt | step_1 + sep | ... | step_K + sep]; the scalar head is read at the last token of each
piece, and the loss is the binary cross-entropy of sigmoid(z_k) against y_k, averaged over steps
(`losses.process.step_loss`). Held-out metrics: step accuracy, F1 on incorrect steps, and first-error
accuracy (the predicted first wrong step, or "none", equals the labelled one), with labels and predictions
read as correct at >= `label_threshold`.

The saved model is a plain `AutoModelForTokenClassification` directory with `step_separator` in its
config.json; `alignkit.models.process_reward.ProcessRewardModel.load` reads it back, and a PRM folder
works as a `reward` wherever a reward model does (its steps' scores aggregated, min by default).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from alignkit.config import ConfigError, require
from alignkit.losses.process import first_error, step_loss
from alignkit.models.process_reward import load_prm_backbone, step_logits
from alignkit.train.common import load_train_eval, print_summary, say
from alignkit.train.loop import TrainConfig, TrainResult, load_trainable_model, make_accelerator, resolve_resume, train


@dataclass
class PRMConfig(TrainConfig):
    """A process reward model trained on step-labelled solutions."""

    lr: float = 1e-4
    """Peak learning rate (AdamW)."""
    step_separator: str = "\n"
    """Text written after each step; the step's score is read at its last token. Saved with the model."""
    label_threshold: float = 0.5
    """A label or a predicted P(correct) at or above this reads as a correct step (metrics only; soft labels train as they are)."""


def prm_step(model, batch: dict, threshold: float = 0.5) -> tuple[torch.Tensor, dict]:
    """Summed step losses and metric sums over the batch's steps; first-error accuracy per solution."""
    logits = step_logits(model, batch)
    mask = batch["loss_mask"].bool()
    labels = batch["step_labels"][mask]
    losses, metrics = step_loss(logits, labels, threshold)
    predicted = torch.zeros_like(mask)
    predicted[mask] = torch.sigmoid(logits.detach()) >= threshold
    labelled = torch.zeros_like(mask)
    labelled[mask] = labels >= threshold
    same_first = (first_error(predicted, mask) == first_error(labelled, mask)).float()
    sums = {k: v.sum() for k, v in metrics.items()}
    sums["first_error_accuracy"] = (same_first.sum(), len(same_first))
    return losses.sum(), sums


def step_count(batch: dict) -> int:
    return int(batch["loss_mask"].sum())


def f1_incorrect(means: dict[str, float]) -> dict[str, float]:
    """F1 on incorrect steps, 2tp / (2tp + fp + fn), from the per-step rates of tp, fp and fn."""
    if "incorrect_tp" not in means:
        return {}
    tp, fp, fn = means["incorrect_tp"], means["incorrect_fp"], means["incorrect_fn"]
    return {"f1_incorrect": 2 * tp / max(2 * tp + fp + fn, 1e-12)}


def run(cfg: PRMConfig) -> TrainResult:
    from transformers import AutoConfig

    from alignkit.data.tokenize import pad_steps, tokenize_steps
    from alignkit.models.load import load_tokenizer

    require(cfg, "model", "data")
    if not cfg.step_separator:
        raise ConfigError("step_separator: empty; each step's score is read at its separator")
    if not 0 < cfg.label_threshold < 1:
        raise ConfigError(f"label_threshold: expected a number in (0, 1), got {cfg.label_threshold}")
    train_records, eval_records = load_train_eval(cfg, "steps")
    resume_from = resolve_resume(cfg)
    tokenizer = load_tokenizer(str(resume_from) if resume_from else cfg.model)
    model = load_trainable_model(cfg, resume_from, load_prm_backbone, task_type="TOKEN_CLS")
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.step_separator = cfg.step_separator  # saved with every checkpoint and the final model
    examples, report = tokenize_steps(train_records, tokenizer, cfg.max_length, cfg.step_separator, cfg.truncation)
    report.check_not_all_truncated(cfg.data, cfg.max_length)
    eval_examples, _ = tokenize_steps(eval_records, tokenizer, cfg.max_length, cfg.step_separator, cfg.truncation)
    steps = sum(len(ex["step_labels"]) for ex in examples)
    wrong = sum(y < cfg.label_threshold for ex in examples for y in ex["step_labels"])
    accelerator = make_accelerator(cfg, "prm")
    say(f"prm: {len(examples)} solutions, {steps} steps ({wrong} labelled incorrect); {report}")
    result = train(cfg, model, tokenizer, examples, lambda m, b: prm_step(m, b, cfg.label_threshold), step_count,
                   lambda b: pad_steps(b, tokenizer.pad_token_id), name="prm", eval_examples=eval_examples,
                   resume_from=resume_from, accelerator=accelerator, derived_metrics=f1_incorrect)
    saved = AutoConfig.from_pretrained(cfg.output_dir)
    if accelerator.is_main_process and getattr(saved, "step_separator", None) != cfg.step_separator:
        saved.step_separator = cfg.step_separator  # a LoRA merge writes its base model's config
        saved.save_pretrained(cfg.output_dir)
    print_summary("prm", result, [str(report)])
    return result


def main(argv: list[str] | None = None) -> TrainResult:
    from alignkit.config import parse_config

    return run(parse_config(PRMConfig, sys.argv[1:] if argv is None else argv, prog="alignkit prm"))
