"""Pieces the trainers share: the next-token step, data splits, the end-of-run summary."""

from __future__ import annotations

import os
import random

import torch

from alignkit.config import ConfigError
from alignkit.losses import sft_loss
from alignkit.models.forward import token_stats
from alignkit.train.loop import TrainConfig, TrainResult


def lm_step(model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Next-token loss on `loss_mask` tokens; metrics are sums over those tokens.

    The output head runs only on the columns where some row has a loss token: with SFT's
    prompt masked out, the columns every prompt covers are skipped (no logits, no softmax)."""
    mask = batch["loss_mask"][:, 1:]
    columns = None if bool(mask.all()) else mask.any(0).nonzero().squeeze(-1)
    stats = token_stats(model, batch["input_ids"], batch["attention_mask"], position_ids=batch.get("position_ids"),
                        columns=columns)
    targets = batch["input_ids"][:, 1:]
    if columns is not None:
        mask, targets = mask[:, columns], targets[:, columns]
    loss_sum, metrics = sft_loss(stats.logprobs, mask)
    correct = (stats.argmax == targets) & mask.bool()
    return loss_sum, {**metrics, "accuracy": correct.sum()}


def lm_count(batch: dict) -> int:
    """Loss tokens of a batch: the normaliser of `lm_step`'s sums."""
    return int(batch["loss_mask"][:, 1:].sum())


def load_train_eval(cfg: TrainConfig, kind: str) -> tuple[list[dict], list[dict]]:
    """Validated records of `cfg.data`, and of `cfg.eval_data` or a seeded `eval_fraction` of `data`.

    `data` and `eval_data` may name several sources separated by commas; every source loads as
    `kind`, and `split` / `dataset_config` apply to each. Training sources are concatenated, or
    with `data_weights` mixed by `alignkit.data.mixture.mix` (seeded by `seed`), and a one-line
    report names each source's rows. With several sources, `eval_fraction` holds out that
    fraction of each source before mixing, so that no held-out row is also drawn for training
    (a weighted mixture repeats rows of an up-weighted source). `eval_data` sources are
    concatenated, unweighted.
    """
    from alignkit.data import load_records
    from alignkit.data.formats import names_a_file
    from alignkit.data.mixture import describe, mix, split_sources, weights_problem

    if not cfg.data:
        raise ValueError("no training data: set `data` (a file or a datasets name)")
    sources, eval_sources = [], []
    for key, value, names in (("data", cfg.data, sources), ("eval_data", cfg.eval_data, eval_sources)):
        try:
            names += split_sources(value) if value else []
        except ValueError as e:
            raise ConfigError(f"{key} {e}") from None
    if not eval_sources and cfg.eval_split:
        eval_sources = sources
    weights = list(cfg.data_weights)
    problem = weights_problem(weights, len(sources))
    if problem:
        raise ConfigError(f"data_weights: {problem}")
    eval_split = cfg.eval_split or cfg.split
    for key, names, asked in (("split", sources, cfg.split != "train"), ("eval_split", eval_sources, cfg.eval_split),
                              ("dataset_config", sources, cfg.dataset_config)):
        for source in names if asked else ():
            if names_a_file(source):  # a key that would do nothing is refused, not ignored
                raise ConfigError(f"{key} applies to a `datasets` name or folder, and {source} is a file (it has no "
                                  "splits or configurations)")
    config_name = cfg.dataset_config or None

    def load(source: str, split: str) -> list[dict]:
        return drop_identical_pairs(load_records(source, kind, split=split, config_name=config_name), kind)

    parts = [load(source, cfg.split) for source in sources]
    held: list[list[dict]] = [[] for _ in parts]
    if eval_sources:
        eval_records = [record for source in eval_sources for record in load(source, eval_split)]
    elif cfg.eval_fraction > 0:
        rng = random.Random(cfg.seed)  # one source: the same rows held out as before mixtures existed
        for i, part in enumerate(parts):
            order = list(range(len(part)))
            rng.shuffle(order)
            out = set(order[:max(1, round(cfg.eval_fraction * len(part)))])
            held[i] = [r for j, r in enumerate(part) if j in out]
            parts[i] = [r for j, r in enumerate(part) if j not in out]
        eval_records = [record for part in held for record in part]
    else:
        eval_records = []
    if len(sources) == 1:
        return parts[0], eval_records
    for name, part, weight in zip(sources, parts, weights):
        if weight > 0 and not part:
            raise ConfigError(f"data source {name}: no rows left for training after eval_fraction {cfg.eval_fraction}")
    records, counts = mix(parts, weights, cfg.seed)
    line = describe(sources, counts, "mixture" if weights else "data (concatenated)")
    if any(held):
        line += "; held out for eval: " + ", ".join(f"{name} {len(h)}" for name, h in zip(sources, held))
    say(line)
    return records, eval_records


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
    if result.best:
        b = result.best
        stop = f"stopped early at step {b['stopped_at']} of {result.steps}; " if b.get("stopped_at") else ""
        lines.append(f"{stop}kept the best evaluation by {b['metric']}: {b['value']:.4f} at step {b['step']}"
                     " (the held-out numbers above are its)")
    if result.skipped_steps:
        lines.append(f"skipped optimiser updates (non-finite loss or gradient): {result.skipped_steps}")
    lines += notes
    lines.append(f"model saved to {result.output_dir}")
    print("\n".join(lines), flush=True)
