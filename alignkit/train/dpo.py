"""Direct Preference Optimization (Rafailov et al. 2023), with IPO and conservative DPO.

    alignkit dpo --model runs/demo/sft --data prefs.jsonl --beta 0.1 --max_steps 200
    alignkit dpo --config dpo.yaml --loss_type ipo

With h = [log pi(y_w) - log pi_ref(y_w)] - [log pi(y_l) - log pi_ref(y_l)], the loss is
-log sigmoid(beta h) (see alignkit/losses/dpo.py). Chosen and rejected responses go
through ONE forward pass, by default as one row per pair, [prompt | chosen | rejected],
with a mask that hides chosen from rejected: the prompt is computed once (`share_prompt`;
the reference uses the same layout). The reference is `ref_model` (default: the starting
`model`) or, with LoRA, the policy with its adapters disabled; `precompute_ref` computes
its log-probs once before training, so only the policy stays in memory (on a run that
is not resumed, the policy before its first update gives them: no copy is ever loaded).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Literal

from alignkit.config import require
from alignkit.losses import dpo_loss
from alignkit.models.forward import sequence_logprobs
from alignkit.train.common import load_train_eval, print_summary, say
from alignkit.train.loop import TrainConfig, TrainResult, load_trainable_model, make_accelerator, resolve_resume, train
from alignkit.train.reference import make_reference, precompute_reference, reference_sequence_logprobs


@dataclass
class DPOConfig(TrainConfig):
    """Preference optimisation on prompt/chosen/rejected data, no reward model."""

    lr: float = 1e-5
    """Peak learning rate (AdamW)."""
    beta: float = 0.1
    """Strength of the implicit KL constraint to the reference (larger = closer to it)."""
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """sigmoid = DPO; ipo = IPO on length-normalised log-probs (Azar et al. 2023)."""
    label_smoothing: float = 0.0
    """Assumed fraction of flipped labels: conservative DPO (sigmoid only)."""
    ref_model: str = ""
    """Reference model (empty: the starting `model`; with LoRA, the policy with adapters disabled)."""
    precompute_ref: bool = False
    """Compute reference log-probs once before training, then free the reference model."""
    share_prompt: bool = True
    """One row per pair, [prompt | chosen | rejected]: the prompt goes through the model once."""


def make_dpo_step(cfg: DPOConfig, reference):
    def dpo_step(model, batch):
        logps, n_tokens = sequence_logprobs(model, batch)
        ref = batch["ref_logps"] if "ref_logps" in batch else reference_sequence_logprobs(reference, model, batch)
        if cfg.loss_type == "ipo":
            logps, ref = logps / n_tokens.clamp(min=1), ref / n_tokens.clamp(min=1)
        losses, metrics = dpo_loss(cfg.loss_type, logps[0::2], logps[1::2], ref[0::2], ref[1::2],
                                   cfg.beta, cfg.label_smoothing)
        return losses.sum(), {k: v.sum() for k, v in metrics.items()}
    return dpo_step


def pair_count(batch) -> int:
    return len(batch["ids"])


def run(cfg: DPOConfig) -> TrainResult:
    from alignkit.data import pad_groups, tokenize_responses
    from alignkit.data.tokenize import pad_shared_prompt
    from alignkit.models.load import load_tokenizer

    require(cfg, "model", "data")
    train_records, eval_records = load_train_eval(cfg, "preference")
    resume_from = resolve_resume(cfg)
    tokenizer = load_tokenizer(str(resume_from) if resume_from else cfg.model)
    examples, report = tokenize_responses(train_records, tokenizer, cfg.max_length, cfg.truncation)
    report.check_not_all_truncated(cfg.data, cfg.max_length)
    model = load_trainable_model(cfg, resume_from)
    eval_examples, _ = tokenize_responses(eval_records, tokenizer, cfg.max_length, cfg.truncation)
    pad = pad_shared_prompt if cfg.share_prompt else pad_groups
    collate = lambda b: pad(b, tokenizer.pad_token_id)  # noqa: E731

    accelerator = make_accelerator(cfg, "dpo")
    reference = make_reference(cfg.model, cfg.ref_model, cfg.lora_r > 0, accelerator.device, accelerator.autocast,
                               before_first_update=cfg.precompute_ref and resume_from is None)
    if cfg.precompute_ref:
        model.to(accelerator.device)
        for part in (examples, eval_examples):  # no gradients kept: 4x the training batch fits
            precompute_reference(reference, model, part, collate, 4 * cfg.batch_size, accelerator.device)
        reference = None  # drops the reference model: only the policy stays in memory
    say(f"dpo: {len(examples)} pairs, beta {cfg.beta}, loss {cfg.loss_type}, reference "
        f"{'precomputed' if cfg.precompute_ref else 'on the fly'}; {report}")
    result = train(cfg, model, tokenizer, examples, make_dpo_step(cfg, reference), pair_count, collate,
                   name="dpo", eval_examples=eval_examples, resume_from=resume_from, accelerator=accelerator)
    print_summary("dpo", result, [str(report)])
    return result


def main(argv: list[str] | None = None) -> TrainResult:
    from alignkit.config import parse_config

    return run(parse_config(DPOConfig, sys.argv[1:] if argv is None else argv, prog="alignkit dpo"))
