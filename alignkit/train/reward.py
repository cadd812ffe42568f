"""Bradley–Terry reward models (Ouyang et al. 2022).

    alignkit rm --model runs/demo/sft --data prefs.jsonl --max_steps 200
    alignkit rm --config rm.yaml --data_kind ranking

P(y_w > y_l) = sigmoid(r(x, y_w) - r(x, y_l)); loss -log sigmoid(r_w - r_l - margin),
with the margin taken from a preference record's `margin` field when it has one.
Ranking data with K responses contributes all K(K-1)/2 pairs of a prompt, in the
same forward pass. After training, the reward's mean and std over the held-out
(or training) responses are stored in config.json for normalised scoring.

With `lora_r > 0` the backbone trains LoRA adapters and the fresh scalar head (`score`)
is trained in full; the saved model is merged, a plain sequence-classification directory.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Literal

import torch

from alignkit.config import require
from alignkit.losses import bradley_terry_loss, ranking_pairs
from alignkit.models.reward import batch_rewards, load_reward_backbone
from alignkit.train.common import load_train_eval, print_summary, say
from alignkit.train.loop import TrainConfig, TrainResult, load_trainable_model, make_accelerator, resolve_resume, train
from alignkit.train.sharding import gathered


@dataclass
class RewardConfig(TrainConfig):
    """A scalar reward model trained on preference or ranking data."""

    lr: float = 1e-4
    """Peak learning rate (AdamW)."""
    data_kind: Literal["preference", "ranking"] = "preference"
    """preference = prompt/chosen/rejected; ranking = prompt/responses (best first) or + scores."""
    normalize: bool = True
    """Store the reward mean and std over held-out responses in the checkpoint for scoring."""
    share_prompt: bool = True
    """One row per prompt, [prompt | response 1 | ... | response K]: the prompt goes through the model once."""


def collate_pairs(examples: list[dict], pad_token_id: int, share_prompt: bool = False) -> dict:
    """`pad_groups` (or `pad_shared_prompt`) plus the (better, worse) indices of every pair among
    the batch's responses, and per-pair margins."""
    from alignkit.data import pad_groups
    from alignkit.data.tokenize import pad_shared_prompt

    batch = (pad_shared_prompt if share_prompt else pad_groups)(examples, pad_token_id)
    better, worse, margins, offset = [], [], [], 0
    for ex in examples:
        i, j = ranking_pairs(len(ex["sequences"]))
        better.append(i + offset)
        worse.append(j + offset)
        margins += [float(ex.get("margin", 0.0))] * len(i)
        offset += len(ex["sequences"])
    batch.update(better=torch.cat(better), worse=torch.cat(worse), margin=torch.tensor(margins))
    return batch


def rm_step(model, batch):
    rewards = batch_rewards(model, batch)
    r_w, r_l = rewards[batch["better"]], rewards[batch["worse"]]
    losses, metrics = bradley_terry_loss(r_w, r_l, batch["margin"])
    metrics = {**metrics, "rewards/chosen": r_w.detach(), "rewards/rejected": r_l.detach()}
    return losses.sum(), {k: v.sum() for k, v in metrics.items()}


def pair_count(batch) -> int:
    return len(batch["better"])


@torch.no_grad()
def reward_stats(model, examples: list[dict], collate, batch_size: int, device) -> tuple[float, float]:
    """Mean and std of the reward over every response of `examples`."""
    model.eval()
    values = []
    for i in range(0, len(examples), batch_size):
        b = collate(examples[i : i + batch_size])
        values.append(batch_rewards(model, {k: v.to(device) for k, v in b.items()}))
    v = torch.cat(values)
    return float(v.mean()), float(v.std().clamp(min=1e-6))


def run(cfg: RewardConfig) -> TrainResult:
    from alignkit.data import tokenize_responses
    from alignkit.models.load import load_tokenizer

    require(cfg, "model", "data")
    train_records, eval_records = load_train_eval(cfg, cfg.data_kind)
    resume_from = resolve_resume(cfg)
    tokenizer = load_tokenizer(str(resume_from) if resume_from else cfg.model)
    # seeded: the fresh scalar head (and LoRA adapters) start the same in every run; with LoRA the
    # head is trained in full beside the adapters, and a checkpoint is the base plus its adapter/
    model = load_trainable_model(cfg, resume_from, load_reward_backbone, task_type="SEQ_CLS")
    model.config.pad_token_id = tokenizer.pad_token_id
    examples, report = tokenize_responses(train_records, tokenizer, cfg.max_length, cfg.truncation)
    report.check_not_all_truncated(cfg.data, cfg.max_length)
    eval_examples, _ = tokenize_responses(eval_records, tokenizer, cfg.max_length, cfg.truncation)
    for ex, rec in zip(examples + eval_examples, train_records + eval_records):
        if "margin" in rec:
            ex["margin"] = float(rec["margin"])
    collate = lambda b: collate_pairs(b, tokenizer.pad_token_id, cfg.share_prompt)  # noqa: E731
    accelerator = make_accelerator(cfg, "rm")
    n_pairs = sum(len(ex["sequences"]) * (len(ex["sequences"]) - 1) // 2 for ex in examples)
    say(f"rm: {len(examples)} prompts, {n_pairs} pairs; {report}")
    result = train(cfg, model, tokenizer, examples, rm_step, pair_count, collate, name="rm",
                   eval_examples=eval_examples, resume_from=resume_from, accelerator=accelerator)
    notes = [str(report)]
    if cfg.normalize:
        with gathered(model):  # sharded: every process gathers the weights, the main one scores alone
            if accelerator.is_main_process:
                from transformers import AutoConfig

                mean, std = reward_stats(accelerator.unwrap_model(model), eval_examples or examples, collate,
                                         cfg.batch_size, accelerator.device)
                # added to the config.json the final save wrote (with LoRA, the merged model's: its
                # architectures name the sequence-classification class, the unmerged wrapper's do not)
                saved = AutoConfig.from_pretrained(cfg.output_dir)
                saved.reward_mean, saved.reward_std = mean, std
                saved.save_pretrained(cfg.output_dir)
                notes.append(f"reward over {'held-out' if eval_examples else 'training'} responses: "
                             f"mean {mean:.3f}, std {std:.3f} (stored for normalised scoring)")
    print_summary("rm", result, notes)
    return result


def main(argv: list[str] | None = None) -> TrainResult:
    from alignkit.config import parse_config

    return run(parse_config(RewardConfig, sys.argv[1:] if argv is None else argv, prog="alignkit rm"))
