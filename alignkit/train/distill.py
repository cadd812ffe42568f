"""On-policy distillation (GKD, Agarwal et al. 2024): a student learns a teacher's token distributions.

    alignkit distill --model runs/demo/sft --teacher runs/demo/ppo --data runs/demo/data/sft.jsonl
    alignkit distill --config distill.yaml --divergence reverse_kl --lmbda 1.0   # on-policy only

Each step, with probability `lmbda` (seeded by the step), the student samples completions of the
batch's prompts and learns on those tokens (on-policy: the distribution it will be run on); otherwise
it learns on the dataset's completions. The loss at every completion token is a divergence between
the student's and the teacher's next-token distributions over the whole vocabulary
(alignkit/losses/distill.py): forward KL (classic KD), reverse KL (mode-seeking), or the generalised
JSD with `jsd_beta`. The teacher is frozen and may be stored in a lower precision (`teacher_dtype`);
the two models need one vocabulary. Data: SFT records (`prompt` + `completion`, or `messages`).
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from typing import Literal

import torch

from alignkit.config import require
from alignkit.losses.distill import distillation_loss
from alignkit.models.forward import forward_logprobs
from alignkit.train.common import lm_count, load_train_eval, print_summary, say
from alignkit.train.loop import (TrainConfig, TrainingError, TrainResult, load_trainable_model, make_accelerator,
                                 resolve_resume, train)


@dataclass
class DistillConfig(TrainConfig):
    """A student (`model`) distilled from a `teacher` on its own samples and the dataset's completions."""

    lr: float = 5e-5
    """Peak learning rate (AdamW)."""
    teacher: str = ""
    """The teacher: a `save_pretrained` directory or a Hub id, with the student's vocabulary."""
    teacher_dtype: str = "float32"
    """Storage dtype of the teacher (bfloat16 / float16: half its memory)."""
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "jsd"
    """forward_kl = KL(teacher || student); reverse_kl = KL(student || teacher); jsd = generalised JSD (jsd_beta)."""
    jsd_beta: float = 0.5
    """beta of the generalised JSD (0 and 1 give forward and reverse KL); read only with divergence jsd."""
    lmbda: float = 0.5
    """Fraction of steps on the student's own samples (on-policy); the rest on the dataset's completions."""
    temperature: float = 1.0
    """Temperature of both distributions in the loss, and of the student's sampling."""
    max_new_tokens: int = 64
    """Longest completion the student samples on an on-policy step."""

    def validate(self) -> None:
        from alignkit.config import ConfigError

        super().validate()
        if not 0.0 <= self.lmbda <= 1.0:
            raise ConfigError(f"lmbda must be in [0, 1], got {self.lmbda}")
        if not 0.0 <= self.jsd_beta <= 1.0:
            raise ConfigError(f"jsd_beta must be in [0, 1], got {self.jsd_beta}")
        if self.jsd_beta != 0.5 and self.divergence != "jsd":
            raise ConfigError(f"jsd_beta={self.jsd_beta} is read only with divergence jsd (got {self.divergence})")
        if self.temperature <= 0 or self.max_new_tokens < 1:
            raise ConfigError(f"temperature must be > 0 and max_new_tokens >= 1, got {self.temperature}, "
                              f"{self.max_new_tokens}")


def on_policy_step(cfg: DistillConfig, step: int) -> bool:
    """Whether `step` learns on the student's samples: a coin of probability lmbda seeded by (seed, step),
    so a resumed run makes the same choices and every process agrees."""
    return random.Random(f"{cfg.seed}-{step}").random() < cfg.lmbda


def student_samples(cfg: DistillConfig, model, batch: dict, tokenizer, step: int) -> dict:
    """The batch's prompts (the tokens before each row's first loss token), completed by the student:
    a batch of [prompt | sampled completion] rows with the loss on the sampled tokens."""
    from alignkit.data import pad_batch
    from alignkit.data.tokenize import prompt_length
    from alignkit.rollout.sampler import completion_generators, sample

    rows = []
    for i, ids, loss_mask in zip(batch["ids"].tolist(), batch["input_ids"], batch["loss_mask"]):
        prompt = ids[:prompt_length(loss_mask.tolist())].tolist()  # rows are right padded: the prompt comes first
        if not prompt:
            raise TrainingError(f"distill: example {i} has an empty prompt; the student has nothing to continue")
        rows.append({"id": i, "input_ids": prompt, "loss_mask": [0] * len(prompt)})
    prompts = pad_batch(rows, tokenizer.pad_token_id, side="left")
    device = batch["input_ids"].device
    with torch.no_grad():
        roll = sample(model, prompts["input_ids"].to(device), prompts["attention_mask"].to(device),
                      max_new_tokens=cfg.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, temperature=cfg.temperature,
                      generator=completion_generators(cfg.seed * 1_000_003 + step, batch["ids"].tolist(), 1))
    zeros = torch.zeros_like(roll.prompt_mask)
    return {"input_ids": roll.input_ids, "attention_mask": roll.attention_mask, "ids": batch["ids"],
            "loss_mask": torch.cat([zeros, roll.completion_mask], dim=1), "weight": batch["weight"],
            "on_policy": 1.0}


def make_distill_step(cfg: DistillConfig, teacher):
    def distill_step(model, batch):
        mask = batch["loss_mask"][:, 1:]
        columns = mask.any(0).nonzero().squeeze(-1)
        _, student = forward_logprobs(model, batch["input_ids"], batch["attention_mask"], columns=columns)
        with torch.no_grad():
            _, teacher_logits = forward_logprobs(teacher, batch["input_ids"], batch["attention_mask"], columns=columns)
        loss_sum, n = distillation_loss(student, teacher_logits, mask[:, columns], cfg.divergence, cfg.jsd_beta,
                                        cfg.temperature)
        if not model.training:  # held-out evaluation: the dataset's completions only
            return loss_sum, {}
        rows = float(len(batch["input_ids"]))
        return loss_sum, {"on_policy": (torch.tensor(batch.get("on_policy", 0.0) * rows), rows)}
    return distill_step


def run(cfg: DistillConfig) -> TrainResult:
    from alignkit.data import pad_batch, tokenize_sft
    from alignkit.models.load import load_causal_lm, load_tokenizer

    require(cfg, "model", "teacher", "data")
    train_records, eval_records = load_train_eval(cfg, "sft")
    resume_from = resolve_resume(cfg)
    tokenizer = load_tokenizer(str(resume_from) if resume_from else cfg.model)
    examples, report = tokenize_sft(train_records, tokenizer, cfg.max_length, cfg.truncation)
    report.check_not_all_truncated(cfg.data, cfg.max_length)
    eval_examples, _ = tokenize_sft(eval_records, tokenizer, cfg.max_length, cfg.truncation)
    model = load_trainable_model(cfg, resume_from)
    accelerator = make_accelerator(cfg, "distill")
    teacher = load_causal_lm(cfg.teacher, dtype=cfg.teacher_dtype).eval().requires_grad_(False).to(accelerator.device)
    if teacher.config.vocab_size != model.config.vocab_size:
        raise TrainingError(f"teacher {cfg.teacher} has a vocabulary of {teacher.config.vocab_size} tokens and the "
                            f"student {cfg.model} {model.config.vocab_size}: distillation compares their "
                            "distributions token by token and needs one vocabulary")
    model.to(accelerator.device)

    def prepare(model, batches, step):
        if not on_policy_step(cfg, step):
            return batches
        student = accelerator.unwrap_model(model)
        return [student_samples(cfg, student, b, tokenizer, step) for b in batches]

    say(f"distill: {len(examples)} examples, teacher {cfg.teacher} ({cfg.teacher_dtype}), {cfg.divergence}"
        f"{f' beta {cfg.jsd_beta}' if cfg.divergence == 'jsd' else ''}, {cfg.lmbda:.0%} of steps on the "
        f"student's samples; {report}")
    result = train(cfg, model, tokenizer, examples, make_distill_step(cfg, teacher), lm_count,
                   lambda b: pad_batch(b, tokenizer.pad_token_id), name="distill", eval_examples=eval_examples,
                   resume_from=resume_from, accelerator=accelerator, prepare=prepare)
    print_summary("distill", result, [str(report)])
    return result


def main(argv: list[str] | None = None) -> TrainResult:
    from alignkit.config import parse_config

    return run(parse_config(DistillConfig, sys.argv[1:] if argv is None else argv, prog="alignkit distill"))
