"""Pieces the trainers share: the next-token step, data splits, the end-of-run summary."""

from __future__ import annotations

import os
import random

import torch

from alignkit.config import ConfigError
from alignkit.losses import sft_loss
from alignkit.models.forward import forward_logprobs
from alignkit.train.loop import TrainConfig, TrainResult


def lm_step(model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Next-token loss on `loss_mask` tokens; metrics are sums over those tokens.

    The output head runs only on the columns where some row has a loss token: with SFT's
    prompt masked out, the columns every prompt covers are skipped (no logits, no softmax)."""
    mask = batch["loss_mask"][:, 1:]
    columns = None if bool(mask.all()) else mask.any(0).nonzero().squeeze(-1)
    logprobs, logits = forward_logprobs(model, batch["input_ids"], batch["attention_mask"],
                                        position_ids=batch.get("position_ids"), columns=columns)
    targets = batch["input_ids"][:, 1:]
    if columns is not None:
        mask, targets = mask[:, columns], targets[:, columns]
    loss_sum, metrics = sft_loss(logprobs, mask)
    correct = (logits.argmax(-1) == targets) & mask.bool()
    return loss_sum, {**metrics, "accuracy": correct.sum()}


def lm_count(batch: dict) -> int:
    """Loss tokens of a batch: the normaliser of `lm_step`'s sums."""
    return int(batch["loss_mask"][:, 1:].sum())


def load_train_eval(cfg: TrainConfig, kind: str) -> tuple[list[dict], list[dict]]:
    """Validated records of `cfg.data`, and of `cfg.eval_data` or a seeded `eval_fraction` of `data`."""
    from alignkit.data import load_records
    from alignkit.data.formats import names_a_file

    if not cfg.data:
        raise ValueError("no training data: set `data` (a file or a datasets name)")
    eval_source = cfg.eval_data or (cfg.data if cfg.eval_split else "")
    eval_split = cfg.eval_split or cfg.split
    for key, source, asked in (("split", cfg.data, cfg.split != "train"), ("eval_split", eval_source, cfg.eval_split),
                               ("dataset_config", cfg.data, cfg.dataset_config)):
        if asked and names_a_file(source):  # a key that would do nothing is refused, not ignored
            raise ConfigError(f"{key} applies to a `datasets` name or folder, and {source} is a file (it has no "
                              "splits or configurations)")
    config_name = cfg.dataset_config or None
    records = drop_identical_pairs(load_records(cfg.data, kind, split=cfg.split, config_name=config_name), kind)
    if eval_source:
        return records, drop_identical_pairs(
            load_records(eval_source, kind, split=eval_split, config_name=config_name), kind)
    if cfg.eval_fraction <= 0:
        return records, []
    order = list(range(len(records)))
    random.Random(cfg.seed).shuffle(order)
    n_eval = max(1, round(cfg.eval_fraction * len(records)))
    held = set(order[:n_eval])
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


def drop_identical_pairs(records: list[dict], kind: str) -> list[dict]:
    """Preference records without those whose chosen equals rejected, counted and reported:
    such a pair carries no preference (its DPO / Bradley-Terry gradient is exactly 0)."""
    from alignkit.data import DataError, identical_pairs

    if kind != "preference":
        return records
    same = set(identical_pairs(records))
    if not same:
        return records
    kept = [r for r in records if r["_where"] not in same]
    if not kept:
        raise DataError(records[0]["_where"].rsplit(":", 1)[0], None,
                        f"every one of the {len(records)} pairs has chosen == rejected: nothing to learn from")
    first = [r["_where"] for r in records if r["_where"] in same][:3]
    say(f"dropped {len(same)} of {len(records)} pairs whose chosen equals rejected (they carry no preference): "
        f"{', '.join(first)}{', ...' if len(same) > 3 else ''}")
    return kept


def say(message: str) -> None:
    """print on the main process only: RANK 0 under torchrun / accelerate launch (RANK is set
    before any process group exists, so this works before the Accelerator is made)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(message, flush=True)


def print_summary(name: str, result: TrainResult, notes: list[str]) -> None:
    """One screen at the end of a run: what was trained, how the loss moved, where it is.
    Printed by the main process only (rank 0 under torchrun / accelerate launch)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    lines = [f"== {name} finished: {result.steps} steps on {result.device}, mixed precision {result.precision} =="]
    for key in ("loss", "reward", "kl_per_completion"):  # the online trainers log a reward and a KL
        rows = [h for h in result.history if f"train/{key}" in h]
        if rows:
            lines.append(f"train {key.replace('_', ' ')} {rows[0][f'train/{key}']:.4f} (step {rows[0]['step']}) -> "
                         f"{rows[-1][f'train/{key}']:.4f} (step {rows[-1]['step']})")
    if result.eval_metrics:
        before = result.initial_eval_metrics
        lines.append("held-out " + ", ".join(
            (f"{k} {before[k]:.4f} -> {v:.4f}" if k in before else f"{k} {v:.4f}") for k, v in sorted(result.eval_metrics.items())))
    if result.skipped_steps:
        lines.append(f"skipped optimiser updates (non-finite loss or gradient): {result.skipped_steps}")
    lines += notes
    lines.append(f"model saved to {result.output_dir}")
    print("\n".join(lines), flush=True)
