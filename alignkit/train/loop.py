"""The shared training loop, on `accelerate.Accelerator`.

A trainer hands over a model, tokenised examples and two functions:

    step_fn(model, batch)  -> (loss_sum, metric_sums)   # sums over the batch's units
    count_fn(batch)        -> int                       # its units: loss tokens, pairs, ...

One optimiser step takes `batch_size * grad_accum * world_size` examples. The loss of
every micro-batch is divided by the number of units in the WHOLE step (all
micro-batches, all processes), so accumulation and data parallelism give the
gradient of one big batch, not a mean of means. The data order is a seeded
permutation per epoch, so the step number alone fixes the data position and a
resumed run replays exactly the batches an uninterrupted run would see.

A step is one optimiser update unless the trainer's `prepare` plans several on the step's
data (a `StepPlan`: PPO's epochs of minibatches, GRPO's num_iterations); the learning-rate
schedule counts updates.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import hashlib
import importlib.util
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from alignkit.train.sharding import (SHARDED_DIR, full_state_dict, full_tensor, gathered, is_sharded,
                                     load_full_state_dict, load_sharded, local_fraction, no_gradient_sync,
                                     save_sharded, shard_model)

CHECKPOINT_PREFIX = "checkpoint-"
BEST_WEIGHTS = "best_eval.pt"  # the weights of the best evaluation by `best_metric`, while a run lasts


@dataclass
class TrainConfig:
    """Keys shared by every trainer."""

    model: str = ""
    """Model to train: a local `save_pretrained` directory or a Hub id."""
    data: str = ""
    """Training data: a .jsonl/.json/.parquet/.csv file or a `datasets` name; several, comma-separated, mix."""
    data_weights: list[float] = field(default_factory=list)
    """One weight per `data` source: a seeded mixture of as many rows as all sources (empty: concatenation)."""
    eval_data: str = ""
    """Held-out data in the same format (empty: hold out `eval_fraction` of `data`)."""
    split: str = "train"
    """Split of `data` when it is a `datasets` name or folder (e.g. train_prefs); files have none."""
    eval_split: str = ""
    """Split for held-out data: of `eval_data`, or with `eval_data` empty of `data` (e.g. test_prefs; empty: none)."""
    dataset_config: str = ""
    """Configuration of a `datasets` name (load_dataset's second argument), for `data` and `eval_data`."""
    eval_fraction: float = 0.0
    """Fraction of `data` held out for evaluation when `eval_data` is empty."""
    output_dir: str = "runs/out"
    """Where the trained model, checkpoints and metrics.jsonl are written."""
    max_steps: int = 0
    """Optimiser steps to run; 0 means `epochs` passes over the data."""
    epochs: float = 1.0
    """Passes over the data when `max_steps` is 0."""
    batch_size: int = 8
    """Examples per micro-batch on each process."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimiser step."""
    lr: float = 1e-4
    """Peak learning rate (AdamW)."""
    lr_scheduler: str = "cosine_with_min_lr"
    """A `transformers.get_scheduler` name: cosine_with_min_lr, linear, constant_with_warmup, ..."""
    min_lr_ratio: float = 0.1
    """Floor of cosine_with_min_lr as a fraction of `lr` (a schedule that decays to 0 hides late collapse)."""
    warmup_ratio: float = 0.05
    """Fraction of the optimiser updates (the steps, unless a trainer says otherwise) spent warming the
    learning rate up from 0."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""
    max_length: int = 512
    """Longest sequence in tokens; longer examples are truncated and counted."""
    truncation: Literal["left", "error"] = "left"
    """An over-long row loses its oldest prompt tokens first (left), or stops the run naming it (error)."""
    seed: int = 0
    """Seed for data order, initialisation and sampling."""
    precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """Mixed precision: auto = bf16 on a GPU that supports it, none on CPU."""
    lora_r: int = 0
    """LoRA rank (0: train all weights)."""
    lora_alpha: float = 0.0
    """LoRA scaling numerator (0: 2 * lora_r)."""
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Layers that get adapters: module names (q_proj v_proj; a name matches itself or a dotted suffix, as in
    peft), all-linear (every linear layer but the output head), or one regex matched against full module names."""
    lora_dropout: float = 0.0
    """Dropout on the input of each adapter during training."""
    use_rslora: bool = False
    """Rank-stabilised LoRA: scale the adapters by lora_alpha / sqrt(lora_r) instead of lora_alpha / lora_r."""
    use_dora: bool = False
    """DoRA: weight-decomposed LoRA, a trained magnitude per output feature beside the low-rank direction update."""
    logging: Literal["none", "tensorboard", "wandb", "trackio"] = "none"
    """Where metrics go besides the console and metrics.jsonl."""
    log_steps: int = 10
    """Log training metrics every N optimiser steps."""
    eval_steps: int = 0
    """Evaluate every N optimiser steps (0: only at the end)."""
    save_steps: int = 0
    """Save a resumable checkpoint every N optimiser steps (0: only the final model)."""
    save_total_limit: int = 0
    """Keep only the newest N checkpoints, deleting older ones after each save (0: keep all)."""
    resume: str = ""
    """'auto' = the latest complete checkpoint in output_dir, or a checkpoint path."""
    overwrite: bool = False
    """Clear an output_dir that holds an earlier run's outputs (refused if it holds files a run never writes)."""
    allow_resume_mismatch: bool = False
    """Resume even if the data, process count or batch geometry changed."""
    on_nan: Literal["stop", "skip"] = "stop"
    """A non-finite loss or gradient stops training, or skips that optimiser update leaving weights unchanged."""
    distributed: Literal["ddp", "fsdp"] = "ddp"
    """How several processes train: each holds the whole model and the gradients are averaged (ddp), or
    each holds 1/N of every parameter, gradient and optimiser moment (fsdp: PyTorch's FSDP2, per decoder
    layer, on CPUs and GPUs; checkpoints are written shard by shard and resume on any process count)."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward instead of keeping them from the forward:
    less memory for about one more forward of compute, the same gradients (transformers' checkpointing,
    non-reentrant)."""
    compile: bool = False
    """torch.compile the training forward and backward (TorchInductor; on CPU it needs a C++ compiler): the
    first steps of each new batch shape compile, later ones run the fused code. Sampling and evaluation run
    the model uncompiled (their shapes change every call)."""
    chunked_head: Literal["auto", "on", "off"] = "auto"
    """The output head and its log-softmax in chunks of tokens, the logits never held for the whole batch (on:
    less memory, one more head matmul in the backward), the full logits (off), or chunks only when a batch's
    logits would exceed 2^28 values, 1 GiB in float32 (auto); same values and gradients either way."""
    best_metric: str = ""
    """An eval metric (as logged, without `eval/`: loss, reward, reward/SOURCE) whose best evaluation's weights
    become the final model: a later, worse model is rolled back (empty: the last weights)."""
    best_metric_mode: Literal["auto", "max", "min"] = "auto"
    """Whether `best_metric` is better high or low (auto: min for names ending in loss or perplexity)."""
    early_stop_patience: int = 0
    """Stop after this many evaluations in a row without a new best `best_metric` (0: never stop early)."""
    early_stop_threshold: float = 0.0
    """How much `best_metric` must beat its best to count as a new best."""

    def validate(self) -> None:
        """A ConfigError naming the first key out of range (`parse_config` calls this after tyro)."""
        from alignkit.config import ConfigError

        checks = [
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("grad_accum", self.grad_accum >= 1, ">= 1"),
            ("lr", self.lr > 0, "> 0"),  # also false for nan
            ("max_steps", self.max_steps >= 0, ">= 0"),
            ("epochs", self.epochs > 0 or self.max_steps > 0, "> 0 when max_steps is 0"),
            ("max_length", self.max_length >= 1, ">= 1"),
            ("log_steps", self.log_steps >= 1, ">= 1"),
            ("save_steps", self.save_steps >= 0, ">= 0"),
            ("save_total_limit", self.save_total_limit >= 0, ">= 0"),
            ("eval_fraction", 0 <= self.eval_fraction < 1, "in [0, 1)"),
            ("early_stop_patience", self.early_stop_patience >= 0, ">= 0"),
            ("early_stop_threshold", self.early_stop_threshold >= 0, ">= 0"),
            ("lora_r", self.lora_r >= 0, ">= 0"),
            ("lora_alpha", self.lora_alpha >= 0, ">= 0"),
            ("lora_dropout", 0 <= self.lora_dropout < 1, "in [0, 1)"),
            ("lora_target_modules", len(self.lora_target_modules) > 0, "one or more module names"),
        ]
        for key, ok, wanted in checks:
            if not ok:
                raise ConfigError(f"{key} must be {wanted}, got {getattr(self, key)}")
        if self.lora_r == 0:  # the LoRA keys shape adapters; without them they would be ignored
            for key, default in (("lora_alpha", 0.0), ("lora_target_modules", ["all-linear"]), ("lora_dropout", 0.0),
                                 ("use_rslora", False), ("use_dora", False)):
                if getattr(self, key) != default:
                    raise ConfigError(f"{key} needs lora_r > 0 (LoRA adapters); set lora_r, or leave {key} out")
        if self.data_weights:  # load_train_eval checks again: run(cfg) from Python skips validate()
            from alignkit.data.mixture import split_sources, weights_problem

            try:  # no data: `require` says so, not a count mismatch
                n_sources = len(split_sources(self.data)) if self.data else len(self.data_weights)
            except ValueError as e:
                raise ConfigError(f"data {e}") from None
            problem = weights_problem(self.data_weights, n_sources)
            if problem:
                raise ConfigError(f"data_weights: {problem}")
        if self.distributed == "fsdp" and self.lora_r > 0:
            raise ConfigError("distributed fsdp with lora_r > 0: LoRA adapters are not sharded yet; "
                              "use distributed ddp (the frozen base could be sharded, the adapters are small)")
        if self.distributed == "fsdp" and self.precision == "fp16":  # fp16 would need FSDP2's sharded grad scaler
            raise ConfigError("distributed fsdp with precision fp16: sharded fp16 needs a gradient scaler alignkit "
                              "does not run; use precision bf16 (or no)")
        if self.early_stop_patience and not (self.best_metric and self.eval_steps > 0):
            raise ConfigError("early_stop_patience needs best_metric (the metric it watches) and eval_steps > 0 "
                              "(how often it is measured)")
        if self.best_metric and not (self.eval_data or self.eval_fraction > 0 or self.eval_split):
            raise ConfigError(f"best_metric {self.best_metric}: no held-out data to measure it on; "
                              "set eval_data, eval_split or eval_fraction")
        if self.lr_scheduler == "constant" and self.warmup_ratio > 0:  # transformers ignores it there
            raise ConfigError(f"warmup_ratio {self.warmup_ratio} has no effect with lr_scheduler constant; "
                              "use constant_with_warmup, or warmup_ratio 0")
        # accelerate only warns about a missing tracker and the run goes on untracked
        package = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}.get(self.logging)
        if package and importlib.util.find_spec(package) is None:
            raise ConfigError(f"logging {self.logging}: the {package} package is not installed "
                              f"(pip install {package}, or --logging none)")
        out = Path(self.output_dir)
        if out.exists() and not out.is_dir():
            raise ConfigError(f"output_dir {out}: is a file, not a folder")
        parent = next((p for p in (out, *out.parents) if p.exists()), Path("."))
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigError(f"output_dir {out}: {parent} is not writable")


class TrainingError(RuntimeError):
    pass


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    history: list[dict] = field(default_factory=list)
    eval_metrics: dict[str, float] = field(default_factory=dict)
    initial_eval_metrics: dict[str, float] = field(default_factory=dict)
    skipped_steps: int = 0
    """Optimiser updates dropped for a non-finite loss or gradient (`on_nan skip`)."""
    train_seconds: float = 0.0
    """Wall time of the optimiser steps alone (no evaluation, no checkpoint writing)."""
    device: str = "cpu"
    precision: str = "no"
    best: dict = field(default_factory=dict)
    """With `best_metric`: its best value, the step of that evaluation (the final model's weights),
    and the step an early stop ended the run at (None: it ran every step)."""


def _row_step(line: str) -> float:
    """A metrics.jsonl row's step; inf for a blank or half-written line (a kill mid-write), which is dropped."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def start_trackers(cfg: TrainConfig, accelerator, name: str) -> None:
    """Start the `logging` tracker (none: nothing) and say where its logs go. The config goes
    along as hyperparameters, lists as text (TensorBoard's hparams take scalars only)."""
    if cfg.logging == "none":
        return
    hparams = {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
               for k, v in config_dict(cfg).items() if v is not None}
    accelerator.init_trackers(name, config=hparams)
    if cfg.logging == "tensorboard" and accelerator.is_main_process:  # accelerate writes to project_dir/name
        print(f"tensorboard logs: {Path(cfg.output_dir) / name} (view: tensorboard --logdir {cfg.output_dir})",
              flush=True)


class MetricLog:
    """Where a run's metric records go: `history`, metrics.jsonl (main process) and the trackers."""

    def __init__(self, accelerator, path: Path, history: list[dict], start_step: int = 0):
        """A fresh run (`start_step` 0) starts the file empty; a resumed one keeps the rows up to
        `start_step` and drops later ones, written by a run killed after its last checkpoint,
        so that every step appears once."""
        self.accelerator, self.path, self.history = accelerator, path, history
        if accelerator.is_main_process and path.exists():
            keep = [line for line in path.read_text().splitlines() if start_step > 0 and _row_step(line) <= start_step]
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in keep))
            os.replace(tmp, path)  # atomic: a kill now leaves the old file or the new one

    def __call__(self, record: dict) -> None:
        self.history.append(record)
        if self.accelerator.is_main_process:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        # trackers take numbers and text: a list (sampled completions) goes as JSON text
        self.accelerator.log({k: json.dumps(v) if isinstance(v, list) else v for k, v in record.items() if k != "step"},
                             step=record["step"])


def make_accelerator(cfg: TrainConfig, project_name: str):
    """One Accelerator per run. Without CUDA but with WORLD_SIZE > 1 (torchrun on CPUs)
    accelerate must be told `cpu=True`, or every rank silently trains alone. Also sets the
    run's process-wide switch `chunked_head` (every forward of the run reads it, the reference's
    and the rollout's included)."""
    from accelerate import Accelerator

    from alignkit.models import forward

    forward.CHUNKED_HEAD = cfg.chunked_head

    multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if cfg.precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    else:
        precision = cfg.precision
    accelerator = Accelerator(
        cpu=multi_cpu,
        mixed_precision=precision,
        log_with=None if cfg.logging == "none" else cfg.logging,
        project_dir=cfg.output_dir,
    )
    fallback = sharded_engine_fallback(accelerator)
    if fallback and accelerator.is_main_process:
        print(f"{project_name}: {fallback}", flush=True)
    return accelerator


def make_scheduler(cfg: TrainConfig, optimizer, total: int):
    """The `lr_scheduler` of `cfg` over `total` optimiser updates: `round(warmup_ratio * total)`
    of them warm up from 0, and cosine_with_min_lr ends at `min_lr_ratio * lr`. Step it once
    per optimiser update (a skipped update too, so the schedule stays on the update count)."""
    from transformers import get_scheduler

    kwargs = {"min_lr_rate": cfg.min_lr_ratio} if cfg.lr_scheduler == "cosine_with_min_lr" else None
    return get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=round(cfg.warmup_ratio * total),
                         num_training_steps=total, scheduler_specific_kwargs=kwargs)


def sharded_engine_fallback(accelerator) -> str:
    """A warning when the launch asked for FSDP or DeepSpeed but accelerate runs something else.

    accelerate 1.15 shards only on GPUs: on CPUs (`cpu=True`) an FSDP or DeepSpeed config
    silently becomes plain DDP, with the whole model on every process."""
    from accelerate.utils import DistributedType

    for engine, kind in (("FSDP", DistributedType.FSDP), ("DEEPSPEED", DistributedType.DEEPSPEED)):
        asked = os.environ.get(f"ACCELERATE_USE_{engine}", "false").lower() in ("1", "true")
        if asked and accelerator.distributed_type != kind:
            return (f"WARNING: the launch config asks for {engine} but accelerate runs "
                    f"{accelerator.distributed_type.value} here (it shards only on GPUs): every process "
                    "holds the whole model, as under DDP")
    return ""


def data_fingerprint(examples: list[dict]) -> str:
    """sha256 over every example's token ids: resume refuses data that changed under it."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(np.asarray(ex["input_ids"], dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()[:16]


def position_warnings(model, lengths: list[int], new_tokens: int = 0) -> list[str]:
    """A warning when rows (plus `new_tokens` sampled after each) run past the positions the
    model was trained on (`max_position_embeddings`): a learned position table fails there,
    and RoPE models see positions they never saw."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(limit, int) or not lengths:
        return []
    over = [n + new_tokens for n in lengths if n + new_tokens > limit]
    if not over:
        return []
    plus = f" + max_new_tokens {new_tokens}" if new_tokens else ""
    return [f"WARNING: {len(over):,} of {len(lengths):,} rows{plus} are longer than the model's "
            f"max_position_embeddings ({limit}), up to {max(over):,} tokens; lower max_length to keep rows within it"]


def row_lengths(examples: list[dict]) -> list[int]:
    """The positions each example's rows reach: a grouped example (`sequences`: one prompt with its
    responses, whose `input_ids` only concatenate them for the loop's length sort) reaches its
    longest sequence, not their sum."""
    return [max(map(len, ex["sequences"])) if ex.get("sequences") else len(ex["input_ids"]) for ex in examples]


def plan_steps(n_examples: int, cfg: TrainConfig, world_size: int) -> tuple[int, int, int]:
    """(global batch, steps per epoch, total steps). The last batch of an epoch may be short."""
    if n_examples == 0:
        raise TrainingError("no training examples")
    global_batch = cfg.batch_size * cfg.grad_accum * world_size
    steps_per_epoch = math.ceil(n_examples / global_batch)
    total = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.epochs * steps_per_epoch)
    if total == 0:  # the run would save its input model unchanged and call it trained
        raise TrainingError(f"0 optimiser steps planned (epochs {cfg.epochs:g}, max_steps {cfg.max_steps}): "
                            "nothing would be trained; set epochs > 0 or max_steps > 0")
    return global_batch, steps_per_epoch, total


def step_indices(step: int, n: int, global_batch: int, steps_per_epoch: int, seed: int) -> list[int]:
    """Example indices of optimiser step `step` (0-based): a slice of epoch `step // steps_per_epoch`'s permutation."""
    epoch, k = divmod(step, steps_per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return order[k * global_batch : (k + 1) * global_batch].tolist()


def rank_micro_batches(indices: list[int], lengths: list[int], rank: int, world: int, batch_size: int) -> list[list[int]]:
    """This rank's share of a step, sorted by length and cut into micro-batches.

    Sorting inside a step cuts padding and changes nothing else: the step's loss is a
    sum over units divided by the step's total count, whatever the grouping.
    """
    share = sorted(indices[rank::world], key=lambda i: lengths[i])
    return [share[j : j + batch_size] for j in range(0, len(share), batch_size)]


MANIFEST = "manifest.json"
CONFIG_FILE = "config.yaml"

# What a run writes into output_dir: the files that mark a folder as some run's outputs, and
# the (wider) set of names `overwrite` may delete. save_pretrained's names, the LoRA adapter,
# pretrain's tiny init/, PPO's value/ critic, bon's rounds, a tensorboard log folder per trainer.
RUN_MARKERS = (CONFIG_FILE, "metrics.jsonl", "model.safetensors", "config.json", f"{CHECKPOINT_PREFIX}*")
RUN_WRITES = RUN_MARKERS + (
    "*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin", "generation_config.json",
    "tokenizer*", "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
    "adapter", "init", "value", "round-*", "rounds.jsonl", "*.tmp", BEST_WEIGHTS, "README.md",
)


def _is_tensorboard_dir(path: Path) -> bool:
    return path.is_dir() and all(p.is_dir() or p.name.startswith("events.out.tfevents") for p in path.rglob("*"))


def run_outputs(folder: Path) -> list[str]:
    """Names in `folder` that mark it as some run's outputs (sorted; empty for a missing folder)."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if any(fnmatch.fnmatch(p.name, m) for m in RUN_MARKERS))


def clear_run_outputs(folder: Path) -> None:
    """Empty `folder` for `overwrite`, only when everything in it is something a run writes
    (RUN_WRITES, or a folder of tensorboard event files): a folder that also holds the user's
    own files is refused untouched, never half-deleted."""
    if not folder.is_dir():
        return
    entries = sorted(folder.iterdir())
    foreign = [p.name for p in entries
               if not any(fnmatch.fnmatch(p.name, m) for m in RUN_WRITES) and not _is_tensorboard_dir(p)]
    if foreign:
        raise TrainingError(
            f"overwrite: {folder} holds files a run never writes ({', '.join(foreign[:5])}"
            f"{', ...' if len(foreign) > 5 else ''}); not clearing it. Remove them or pick another output_dir.")
    for p in entries:
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def config_dict(cfg) -> dict:
    """The config as plain JSON values, keys in field order (what config.yaml and trainer_state.json hold)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def write_config(cfg, folder: Path) -> None:
    """folder/config.yaml: the run's resolved config, keys in field order; `--config` reads it back."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (CONFIG_FILE + ".tmp")
    tmp.write_text(yaml.safe_dump(config_dict(cfg), sort_keys=False))
    os.replace(tmp, folder / CONFIG_FILE)


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks (checkpoint manifests, model cards)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    """manifest.json: size and sha256 of every file, written last; its presence marks a complete checkpoint."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": file_sha256(p)} for p in files}
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(entries, indent=1))
    os.replace(tmp, folder / MANIFEST)


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` is not a complete, intact checkpoint (None when it is)."""
    try:
        entries = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return "no readable manifest.json (the save did not finish)"
    for name, want in entries.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != want["size"] or file_sha256(path) != want["sha256"]:
            return f"{name} is missing or differs from the manifest"
    return None


def latest_checkpoint(output_dir: str | Path, skipped: list[str] | None = None) -> Path | None:
    """The intact checkpoint with the highest step in `output_dir`. A newer half-written or
    corrupt one is passed over, and `skipped` (when given) gets a line saying which and why."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    found = [p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    for path in sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]), reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        if skipped is not None:
            skipped.append(f"resume auto: skipped {path}: {problem}")
    return None


def _is_main_process() -> bool:
    # Called before the Accelerator exists: torchrun and accelerate launch set RANK.
    return os.environ.get("RANK", "0") == "0"


def resolve_resume(cfg: TrainConfig) -> Path | None:
    """The checkpoint to resume from (None: a fresh run), after claiming `cfg.output_dir`.

    A run owns its output_dir. A fresh run refuses a folder holding another run's outputs
    (`run_outputs`) unless `overwrite`, which clears it (`clear_run_outputs`). `resume auto`
    with no intact checkpoint starts fresh in an empty or missing folder and refuses one
    that holds outputs (a finished run, or one killed before its first checkpoint).
    Checks and clearing happen on the main process only; called before any loading.
    """
    out = Path(cfg.output_dir)
    main = _is_main_process()
    if cfg.resume and cfg.overwrite:
        raise TrainingError("resume and overwrite exclude each other: resume continues the run in "
                            f"{out}, overwrite deletes it")
    if not cfg.resume:
        if main and cfg.overwrite:
            clear_run_outputs(out)
        elif main and run_outputs(out):
            raise TrainingError(
                f"{out} already holds a run's outputs ({', '.join(run_outputs(out)[:4])}): a run owns its "
                "output_dir. Pass --overwrite to clear it first, --resume auto to continue that run, "
                "or pick another output_dir.")
        return None
    if cfg.resume == "auto":
        skipped: list[str] = []
        path = latest_checkpoint(out, skipped)
        if main:
            for line in skipped:
                print(line, flush=True)
        if path is None and main:
            if run_outputs(out):
                raise TrainingError(
                    f"resume auto: {out} holds a run's outputs ({', '.join(run_outputs(out)[:4])}) but no "
                    "complete checkpoint to resume from (a finished run, or one stopped before its first "
                    "save_steps checkpoint). Pass --overwrite without --resume to start over there.")
            print(f"resume auto: no checkpoint in {out}, starting fresh", flush=True)
        return path
    path = Path(cfg.resume)
    problem = checkpoint_problem(path)
    if problem:
        raise TrainingError(f"resume: {path} is not a complete checkpoint: {problem}")
    return path


def load_trainable_model(cfg: TrainConfig, resume_from: Path | None, load: Callable | None = None,
                         task_type: str = "CAUSAL_LM"):
    """The model to train: from `cfg.model` (plus fresh LoRA adapters), or from a checkpoint.

    `load(path)` builds the model (default `load_causal_lm`; the reward model passes
    `load_reward_backbone` and task_type "SEQ_CLS", which trains its `score` head in full).
    With LoRA a checkpoint is the base from `cfg.model` plus the checkpoint's `adapter/`.
    Seeded first: new weights (LoRA adapters, a fresh head) are the same in every run."""
    from accelerate.utils import set_seed

    from alignkit.models.load import apply_lora, load_causal_lm

    load = load or load_causal_lm
    set_seed(cfg.seed)
    if cfg.lora_r > 0:
        model = load(cfg.model)
        if resume_from is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, resume_from / "adapter", is_trainable=True)
        else:
            model = apply_lora(model, cfg.lora_r, cfg.lora_alpha or None, cfg.lora_dropout, cfg.lora_target_modules,
                               use_rslora=cfg.use_rslora, use_dora=cfg.use_dora, task_type=task_type)
    elif resume_from is not None and (resume_from / SHARDED_DIR).is_dir():
        model = load(cfg.model)  # the architecture; the checkpoint's shards replace its weights in `train`
    else:
        model = load(str(resume_from) if resume_from is not None else cfg.model)
    if cfg.gradient_checkpointing:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        # non-reentrant: no input needs requires_grad (LoRA's frozen embeddings), and it nests under DDP
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    np_state = np.random.get_state()
    state["numpy"] = (np_state[0], np_state[1].tolist(), *np_state[2:])
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_state(path: Path) -> dict:
    """torch.load restricted to tensors and plain Python values: a pickle that would run
    code is refused, never executed."""
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001 - UnpicklingError and friends
        raise TrainingError(f"{path}: refused to load: not a plain tensor checkpoint ({type(e).__name__})") from None


def save_model(model, tokenizer, path: Path, accelerator) -> None:
    """The trained model (see `models.load.save_weights`) and its tokenizer in one directory, written by
    the main process. Every process calls it: a sharded model is gathered first (a collective)."""
    from alignkit.models.load import save_weights

    state = full_state_dict(model) if is_sharded(model) else None
    if accelerator.is_main_process:
        save_weights(accelerator.unwrap_model(model), path, state_dict=state)
        tokenizer.save_pretrained(path)
    accelerator.wait_for_everyone()


def save_checkpoint(cfg, accelerator, model, tokenizer, optimizer, scheduler, step, meta,
                    extra_files: tuple[Path, ...] = ()) -> Path:
    """checkpoint-{step}/: the model, optimizer, scheduler, per-rank RNG and trainer_state.json.

    Written under a .tmp name, sealed by a manifest of sizes and sha256 sums, then
    renamed: a crash (even kill -9) mid-save never leaves a checkpoint that resume
    accepts. Everything is tensors and plain Python values, loaded back with
    `torch.load(weights_only=True)` (no pickled code). With `distributed fsdp` the weights
    and optimiser state are DCP shards in `sharded/`, one file per process (the config and
    tokenizer beside them), on any process count.
    """
    final = Path(cfg.output_dir) / f"{CHECKPOINT_PREFIX}{step}"
    tmp = final.with_suffix(".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if cfg.distributed == "fsdp":
        save_sharded(tmp / SHARDED_DIR, model, optimizer)
        if accelerator.is_main_process:
            accelerator.unwrap_model(model).config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            torch.save({"scheduler": scheduler.state_dict()}, tmp / "training_state.pt")
    else:
        save_model(model, tokenizer, tmp, accelerator)
        if accelerator.is_main_process:
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                       tmp / "training_state.pt")
    if accelerator.is_main_process:
        for f in extra_files:  # e.g. the best evaluation's weights, as they were at this step
            if f.exists():
                shutil.copy2(f, tmp / f.name)
    accelerator.wait_for_everyone()
    torch.save(_rng_state(), tmp / f"rng_state_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **meta}, indent=1))
        write_manifest(tmp)
        if final.exists():  # re-saving a step: move the old one aside, never delete it in place
            old = final.with_suffix(".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        if cfg.save_total_limit > 0:
            prune_checkpoints(final.parent, cfg.save_total_limit)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(output_dir: Path, keep: int) -> list[Path]:
    """Delete all but the `keep` highest-step checkpoints in `output_dir`; returns the deleted ones.
    Called after a new checkpoint is sealed, so the newest intact one always survives."""
    found = sorted((p for p in output_dir.glob(f"{CHECKPOINT_PREFIX}*")
                    if p.is_dir() and p.name[len(CHECKPOINT_PREFIX):].isdigit()),
                   key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))
    old = found[:-keep] if keep > 0 else []
    for path in old:
        shutil.rmtree(path)
    return old


# Config keys a resume may change: how long to run, where the outputs and logs go, and the
# resume switches themselves. output_dir: a checkpoint may be resumed into a new folder.
RESUME_FREE_KEYS = frozenset({"max_steps", "epochs", "resume", "overwrite", "logging", "log_steps", "eval_steps",
                              "save_steps", "save_total_limit", "allow_resume_mismatch", "output_dir"})


def _check_resume_meta(saved: dict, meta: dict, path: Path, allow: bool) -> None:
    changed = [f"{k}: {saved.get(k)!r} -> {meta[k]!r}" for k in ("data_fingerprint", "world_size", "batch_size", "grad_accum") if saved.get(k) != meta[k]]
    old, new = saved.get("config"), meta.get("config")
    if old is not None and new is not None:  # checkpoints written before the config was saved have none
        new = json.loads(json.dumps(new, default=str))
        # a key added or removed since the checkpoint was saved did not change the run
        changed += [f"{k}: {old[k]!r} -> {new[k]!r}" for k in new
                    if k not in RESUME_FREE_KEYS and k in old and old[k] != new[k]]
    changed = list(dict.fromkeys(changed))  # batch_size, grad_accum: as the loop's geometry and as config keys
    if changed and not allow:
        raise TrainingError(
            f"resume from {path}: the run changed ({'; '.join(changed)}). Only the duration keys "
            f"({', '.join(sorted(RESUME_FREE_KEYS))}) may change on resume: anything else would not "
            "continue the same run; set allow_resume_mismatch=true if intended."
        )


def sync_lr_to_schedule(optimizer, scheduler) -> None:
    """lr_i = base_lr_i * lambda_i(step) of THIS run's schedule, for the next optimiser step.

    The optimizer state restored from a checkpoint carries the lr that the saved run's
    schedule set; a run stopped early with a smaller `max_steps` and resumed to the full
    length would take its first resumed step at that stale lr. With an unchanged schedule
    this writes back the same numbers.
    """
    if not hasattr(scheduler, "lr_lambdas"):
        return
    for group, base, fn in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * fn(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def restore_training_state(resume_from: Path, meta: dict, model, optimizer, scheduler, rank: int,
                           allow_mismatch: bool) -> dict:
    """Optimizer, scheduler (lr re-derived from this run's schedule) and this rank's RNG from a
    `save_checkpoint` folder, and a sharded checkpoint's weights; returns its trainer_state.json.
    Refuses a run whose data or batch geometry changed, unless `allow_mismatch`."""
    saved = json.loads((resume_from / "trainer_state.json").read_text())
    _check_resume_meta(saved, meta, resume_from, allow_mismatch)
    state = load_state(resume_from / "training_state.pt")
    if (resume_from / SHARDED_DIR).is_dir():  # resharded to this run's process count by DCP
        load_sharded(resume_from / SHARDED_DIR, model, optimizer)
    elif is_sharded(model):
        raise TrainingError(f"resume from {resume_from}: written by an unsharded run (distributed ddp), which "
                            "this sharded run cannot load its optimiser state from; resume it with distributed ddp")
    else:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    sync_lr_to_schedule(optimizer, scheduler)
    rng_file = resume_from / f"rng_state_{rank}.pt"
    if rng_file.exists():
        _set_rng_state(load_state(rng_file))
    return saved


def add_metrics(sums: dict[str, float], metrics: dict, weight: float = 1.0) -> None:
    """Add a step function's metric sums into `sums`. A value is a tensor (a sum over the
    batch's units, later divided by the unit count) or a (sum, count) pair for a metric
    with units of its own, e.g. a per-completion reward in a per-token loss."""
    for k, v in metrics.items():
        if isinstance(v, tuple):
            v, n = v
            sums[k + "#n"] = sums.get(k + "#n", 0.0) + weight * float(n)
        sums[k] = sums.get(k, 0.0) + weight * float(v.detach() if isinstance(v, torch.Tensor) else v)


def metric_means(sums: dict[str, float], count: float) -> dict[str, float]:
    """Means of `add_metrics` sums: by their own counts where given, else by `count`."""
    return {k: v / max(sums.get(k + "#n", count), 1e-12) for k, v in sums.items() if "#" not in k and not k.startswith("_")}


def accumulate_gradients(model, batches, weights, step_fn, count_fn, accelerator,
                         forward=None) -> tuple[dict[str, float], float, list[int]]:
    """Backward through the micro-batches of one optimiser step.

    grad = sum_j w_j * grad(loss_sum_j) * world / N, with N = sum_j w_j * count_j summed
    over all processes: the gradient of the step's unit-mean loss however the step is
    split (DDP then averages over the world, hence the factor `world`). Returns the
    local metric sums (plus `_tokens` and `_examples`, the attended tokens and the
    examples with weight > 0), N, and the ids of examples in micro-batches whose loss
    was not finite. `forward` (the compiled model) runs the micro-batches in place of `model`.
    """
    world = accelerator.num_processes
    if is_sharded(model) and world > 1:
        # every forward and backward of a sharded model is a collective: a process with fewer
        # micro-batches (a short last step) runs the others' count, the extra ones at weight 0
        most = int(accelerator.reduce(torch.tensor(len(batches), device=accelerator.device), "max"))
        batches, weights = batches + [batches[-1]] * (most - len(batches)), weights + [0.0] * (most - len(batches))
    local = sum(w * float(count_fn(b)) for w, b in zip(weights, batches))
    step_count = float(accelerator.reduce(torch.tensor(local, dtype=torch.float64, device=accelerator.device), "sum"))
    sums = {"loss": 0.0, "_tokens": 0.0, "_examples": 0.0}
    bad_ids: list[int] = []
    for j, (batch, w) in enumerate(zip(batches, weights)):
        sync = j == len(batches) - 1
        if sync:
            context = contextlib.nullcontext()
        else:
            context = no_gradient_sync(model) if is_sharded(model) else accelerator.no_sync(model)
        with context:
            loss_sum, metrics = step_fn(model if forward is None else forward, batch)
            if not torch.isfinite(loss_sum.detach()):
                bad_ids += batch["ids"].tolist()
            # Every micro-batch runs backward, even a non-finite one, so that all processes
            # meet in the same all-reduce; the caller drops a bad step.
            accelerator.backward(loss_sum * (w * world / max(step_count, 1.0)))
        add_metrics(sums, {"loss": loss_sum, **metrics}, w)
        sums["_tokens"] += w * float(batch["attention_mask"].sum())
        sums["_examples"] += w * len(batch.get("ids", batch["input_ids"]))
    return sums, step_count, bad_ids


def evaluate(model, examples, step_fn, count_fn, collate, batch_size, accelerator) -> dict[str, float]:
    """Unit-weighted means of the loss and metrics over `examples` (sharded over processes)."""
    model.eval()
    sums: dict[str, float] = {}
    count = 0.0
    mine = examples[accelerator.process_index :: accelerator.num_processes]
    with torch.no_grad():
        for j in range(0, len(mine), batch_size):
            batch = _to_device(collate(mine[j : j + batch_size]), accelerator.device)
            loss_sum, metrics = step_fn(model, batch)
            count += float(count_fn(batch))
            add_metrics(sums, {"loss": loss_sum, **metrics})
    model.train()
    keys = sorted(sums) or ["loss"]
    totals = accelerator.reduce(torch.tensor([count] + [sums.get(k, 0.0) for k in keys], device=accelerator.device, dtype=torch.float64), "sum")
    return metric_means(dict(zip(keys, totals[1:].tolist())), max(float(totals[0]), 1.0))


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@dataclass
class StepPlan:
    """What `prepare` returns when one step is several optimiser updates (PPO's epochs of
    minibatches, GRPO's num_iterations): each update's micro-batches, a batch's "weight" key
    scaling it (0: a stand-in that joins the all-reduce), and the step's own metrics in
    `add_metrics` form (a tensor or a (sum, count) pair per process; reduced and logged with
    the updates' as train/<name>)."""

    updates: list[list[dict]]
    metrics: dict = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)
    """A few of the step's completions ({prompt, completion, reward}), shown at the next log step."""


@dataclass
class BestEval:
    """The best evaluation so far by one metric, and how many evaluations since have not beaten it
    (by more than `threshold`): what `best_metric` rolls back to and `early_stop_patience` counts."""

    metric: str
    mode: str = "auto"
    threshold: float = 0.0
    value: float | None = None
    step: int | None = None
    evals_since: int = 0
    metrics: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.mode == "auto":
            self.mode = "min" if self.metric.endswith(("loss", "perplexity")) else "max"

    def update(self, metrics: dict[str, float], step: int) -> bool:
        """Record an evaluation at `step`; True when it is the new best."""
        if self.metric not in metrics:
            raise TrainingError(f"best_metric {self.metric!r} is not among the eval metrics "
                                f"({', '.join(sorted(metrics))})")
        v = metrics[self.metric]
        gain = (v - self.value if self.mode == "max" else self.value - v) if self.value is not None else math.inf
        if gain > self.threshold and math.isfinite(v):
            self.value, self.step, self.evals_since = v, step, 0
            return True
        self.evals_since += 1
        return False

    def state(self) -> dict:
        return {"value": self.value, "step": self.step, "evals_since": self.evals_since, "metrics": self.metrics}


def train(
    cfg: TrainConfig,
    model,
    tokenizer,
    examples: list[dict],
    step_fn: Callable,
    count_fn: Callable,
    collate: Callable,
    *,
    name: str,
    eval_examples: list[dict] | None = None,
    resume_from: Path | None = None,
    accelerator=None,
    derived_metrics: Callable[[dict[str, float]], dict[str, float]] | None = None,
    prepare: Callable | None = None,
    updates_per_step: int | Callable[[int], int] = 1,
    eval_fn: Callable | None = None,
    batch_size: int | None = None,
    dropout: bool = True,
    state: dict | None = None,
) -> TrainResult:
    """Run the optimiser steps of `cfg` and save the final model in `cfg.output_dir`.

    `model` must already hold the resumed weights when `resume_from` is given (see
    `load_trainable_model`); optimizer, scheduler, RNG and data position are restored here.
    `derived_metrics` adds metrics computed from logged means (e.g. perplexity = exp(loss)).
    `prepare(model, batches, step)` runs before the gradient pass of each step: online
    methods generate and score their completions there, so the unit count (e.g. completion
    tokens) is known before any micro-batch is weighted. It returns the batches (one update,
    in the order given) or a `StepPlan` of `updates_per_step` updates (an int, or a function
    of the step when a step's count varies). The learning-rate schedule counts optimiser
    updates; an update whose loss or gradient is not finite stops the run, or with
    `on_nan skip` is dropped (weights unchanged) and counted.
    `eval_fn(model) -> metrics` replaces the mean loss on `eval_examples` as the evaluation
    run before the first step, every `eval_steps` and at the end (online methods: the reward
    of greedy completions of the held-out prompts).
    `batch_size` overrides cfg.batch_size as the loop's examples per micro-batch (online
    trainers count prompts here, their cfg.batch_size completions). `dropout=False` keeps
    the model in eval mode for every forward. `state`, a dict of JSON values the trainer
    updates (PPO's adaptive beta), is saved in each checkpoint and restored into on resume.
    """
    from accelerate.utils import set_seed
    from alignkit.progress import progress

    accelerator = accelerator or make_accelerator(cfg, name)
    derived_metrics = derived_metrics or (lambda m: {})
    set_seed(cfg.seed)
    world, rank = accelerator.num_processes, accelerator.process_index
    geometry = cfg if batch_size is None else dataclasses.replace(cfg, batch_size=batch_size, grad_accum=1)
    global_batch, steps_per_epoch, total_steps = plan_steps(len(examples), geometry, world)
    n_updates = updates_per_step if callable(updates_per_step) else (lambda step: updates_per_step)
    lengths = [len(ex["input_ids"]) for ex in examples]
    for warning in position_warnings(model, row_lengths(examples), getattr(cfg, "max_new_tokens", 0)):
        if accelerator.is_main_process:
            print(warning, flush=True)
    meta = {
        "total_steps": total_steps,
        "steps_per_epoch": steps_per_epoch,
        "data_fingerprint": data_fingerprint(examples),
        "world_size": world,
        "batch_size": geometry.batch_size,
        "grad_accum": geometry.grad_accum,
        "config": config_dict(cfg),  # JSON values: a Path given through the Python API becomes its text
    }

    if cfg.distributed == "fsdp" and world > 1:
        # sharded before the optimiser exists: its moments are created shard by shard
        model = shard_model(model.to(accelerator.device), accelerator.device.type, accelerator.mixed_precision)
        local, whole = local_fraction(model)
        print(f"{name}: process {rank} of {world} holds {local:,} of {whole:,} parameter elements (fsdp)", flush=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # The fused kernel updates all parameters in one pass: ~5x faster than foreach on CPU.
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    scheduler = make_scheduler(cfg, optimizer, sum(n_updates(s) for s in range(total_steps)))
    # The scheduler is stepped by hand once per optimiser update; accelerate's wrapper would
    # step it once per process.
    if not is_sharded(model):
        model, optimizer = accelerator.prepare(model, optimizer)
    # the training passes only: a sampler's one-token steps would recompile at every new length
    compiled = torch.compile(model) if cfg.compile else None

    out = Path(cfg.output_dir)
    best = BestEval(cfg.best_metric, cfg.best_metric_mode, cfg.early_stop_threshold) if cfg.best_metric else None
    if best is not None and not eval_examples:
        raise TrainingError(f"best_metric {cfg.best_metric}: the held-out set is empty; "
                            "set eval_data, eval_split or eval_fraction")
    best_file = out / BEST_WEIGHTS
    start_step = 0
    if resume_from is not None:
        saved = restore_training_state(resume_from, meta, model, optimizer, scheduler, rank, cfg.allow_resume_mismatch)
        start_step = saved["step"]
        if state is not None:
            state.update(saved["state"])
        if best is not None and saved.get("best"):
            # the best weights as they were at the checkpoint: a newer best written after it is not this run's
            best.value, best.step, best.evals_since, best.metrics = (saved["best"][k] for k in (
                "value", "step", "evals_since", "metrics"))
            if accelerator.is_main_process and (resume_from / BEST_WEIGHTS).exists():
                out.mkdir(parents=True, exist_ok=True)
                shutil.copy2(resume_from / BEST_WEIGHTS, best_file)
    if accelerator.is_main_process:
        write_config(cfg, out)
        if resume_from is not None:
            print(f"resuming from {resume_from} (step {start_step} of {total_steps})", flush=True)
    start_trackers(cfg, accelerator, name)
    result = TrainResult(output_dir=out, steps=total_steps, device=str(accelerator.device),
                         precision=accelerator.mixed_precision)
    log = MetricLog(accelerator, out / "metrics.jsonl", result.history, start_step)
    model.train(dropout)

    def run_eval() -> dict[str, float]:
        with gathered(model):  # each process evaluates its own share: no collective per forward
            if eval_fn is None:
                metrics = evaluate(model, eval_examples, step_fn, count_fn, collate, cfg.batch_size, accelerator)
            else:
                model.eval()
                with torch.no_grad():
                    metrics = eval_fn(model)
        model.train(dropout)
        return metrics

    def note_eval(metrics: dict[str, float], step: int) -> None:
        """A new best by best_metric: its weights are kept (written atomically) to roll back to."""
        if best is None or not best.update(metrics, step):
            return
        best.metrics = dict(metrics)
        weights = full_state_dict(model) if is_sharded(model) else accelerator.unwrap_model(model).state_dict()
        if accelerator.is_main_process:
            tmp = best_file.with_suffix(".tmp")
            out.mkdir(parents=True, exist_ok=True)
            torch.save({k: v.detach().cpu() for k, v in weights.items()}, tmp)
            os.replace(tmp, best_file)
        accelerator.wait_for_everyone()

    if eval_examples and start_step == 0:
        ev = run_eval()
        result.initial_eval_metrics = {**ev, **derived_metrics(ev)}
        log({"step": 0, **{f"eval/{k}": v for k, v in result.initial_eval_metrics.items()}})
        note_eval(result.initial_eval_metrics, 0)
    window: dict[str, float] = {}
    window_steps, window_tokens, window_start = 0, 0.0, time.perf_counter()
    stop_on_nan = cfg.on_nan == "stop"
    bar = progress(total=total_steps, initial=start_step, desc=name, unit="step", disable=not accelerator.is_main_process, dynamic_ncols=True)
    last_eval, samples = None, []
    for step in range(start_step, total_steps):
        step_start = time.perf_counter()
        indices = step_indices(step, len(examples), global_batch, steps_per_epoch, cfg.seed)
        groups = rank_micro_batches(indices, lengths, rank, world, geometry.batch_size)
        weights = [1.0] * len(groups)
        if not groups:  # a short last batch left this rank nothing: join the all-reduce with weight 0
            groups, weights = [indices[:1]], [0.0]
        batches = [{**_to_device(collate([examples[i] for i in g]), accelerator.device), "weight": w}
                   for g, w in zip(groups, weights)]
        plan = batches
        if prepare is not None:
            with gathered(model):  # rollouts: each process samples on its own, as many tokens as it needs
                plan = prepare(model, batches, step)
        if not isinstance(plan, StepPlan):  # one update on the given batches, in their order
            plan = StepPlan([[{**b, "weight": w} for b, w in zip(plan, weights)]])
        samples = plan.samples or samples
        if len(plan.updates) != n_updates(step):
            raise TrainingError(f"step {step + 1}: prepare planned {len(plan.updates)} updates, "
                                f"updates_per_step says {n_updates(step)}")
        step_sums: dict[str, float] = {}
        add_metrics(step_sums, plan.metrics)
        step_count = 0.0
        for k, update in enumerate(plan.updates):
            sums, count, bad_ids = accumulate_gradients(model, update, [float(b["weight"]) for b in update],
                                                        step_fn, count_fn, accelerator, compiled)
            if cfg.max_grad_norm > 0:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            else:
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in trainable if p.grad is not None])
            grad_norm = full_tensor(grad_norm)  # sharded: the norm over every process's shards
            flags = accelerator.reduce(torch.tensor([float(bool(bad_ids)), float(not torch.isfinite(grad_norm))], device=accelerator.device), "sum")
            if float(flags.sum()) > 0 or count == 0:
                what = "loss" if float(flags[0]) > 0 else ("gradient" if count > 0 else "count of loss units (0)")
                if stop_on_nan and count > 0:
                    where = f"step {step + 1}" + (f", update {k + 1} of {len(plan.updates)}" if len(plan.updates) > 1 else "")
                    raise TrainingError(
                        f"{where}: non-finite {what} (example ids {sorted(set(bad_ids)) or indices}); "
                        "stopped so that no NaN is averaged into the weights. Set on_nan=skip to skip such updates."
                    )
                optimizer.zero_grad(set_to_none=True)
                result.skipped_steps += 1
                scheduler.step()  # a dropped update moves the schedule too: it counts the updates planned
                continue
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            window_tokens += sums.pop("_tokens")
            for key, v in sums.items():
                step_sums[key] = step_sums.get(key, 0.0) + v
            step_count += count
            window["_grad_norm"] = window.get("_grad_norm", 0.0) + float(grad_norm)
            window["_updates"] = window.get("_updates", 0.0) + 1
        result.train_seconds += time.perf_counter() - step_start

        if world > 1:  # the updates' count was already over all processes; the metric sums are per process
            keys = sorted(step_sums)
            totals = accelerator.reduce(torch.tensor([step_sums[k] for k in keys], dtype=torch.float64, device=accelerator.device), "sum")
            step_sums = dict(zip(keys, totals.tolist()))
        for key, v in step_sums.items():
            window[key] = window.get(key, 0.0) + v
        window["_count"] = window.get("_count", 0.0) + step_count
        window_steps += 1
        bar.update(1)
        done = step + 1
        if done % cfg.log_steps == 0 or done == total_steps:
            means = metric_means(window, window.get("_count", 0.0))
            elapsed = time.perf_counter() - window_start
            record = {"step": done, **{f"train/{k}": v for k, v in {**means, **derived_metrics(means)}.items()}}
            if window.get("_updates"):
                record["train/grad_norm"] = window["_grad_norm"] / window["_updates"]
            record["train/lr"] = scheduler.get_last_lr()[0]  # the next update's
            record["train/tokens_per_s"] = window_tokens * world / elapsed
            record["train/skipped_updates"] = result.skipped_steps
            record["train/examples"] = window.get("_examples", 0.0)  # all processes: an epoch's sum is the data size
            log(record)
            if "loss" in means:
                bar.set_postfix(loss=f"{means['loss']:.4f}", lr=f"{record['train/lr']:.2e}", refresh=False)
            if samples:  # what the policy writes now (log_completions)
                log({"step": done, "samples": samples})
                if accelerator.is_main_process:
                    bar.write(f"step {done}, sampled completions:\n" + "\n".join(
                        f"  [{s['reward']:+.3f}] {s['prompt']!r} -> {s['completion']!r}" for s in samples))
                samples = []
            window, window_steps, window_tokens, window_start = {}, 0, 0.0, time.perf_counter()
        last_eval = None
        if eval_examples and cfg.eval_steps > 0 and done % cfg.eval_steps == 0 and done != total_steps:
            ev = run_eval()
            last_eval = {**ev, **derived_metrics(ev)}
            log({"step": done, **{f"eval/{k}": v for k, v in last_eval.items()}})
            note_eval(last_eval, done)
        if cfg.save_steps > 0 and (done % cfg.save_steps == 0 or done == total_steps):
            save_checkpoint(cfg, accelerator, model, tokenizer, optimizer, scheduler, done,
                            {**meta, **({"state": dict(state)} if state is not None else {}),
                             **({"best": best.state()} if best is not None else {})},
                            extra_files=(best_file,) if best is not None else ())
        if last_eval is not None and cfg.early_stop_patience and best.evals_since >= cfg.early_stop_patience:
            result.best["stopped_at"] = done
            bar.write(f"early stop at step {done}: {best.metric} has not beaten {best.value:.4g} (step {best.step}) "
                      f"in {best.evals_since} evaluations")
            break
    bar.close()

    end = result.best.get("stopped_at", total_steps)
    if eval_examples:
        if last_eval is None or end == total_steps:  # an early stop has just evaluated these weights
            ev = run_eval()
            last_eval = {**ev, **derived_metrics(ev)}
            log({"step": end, **{f"eval/{k}": v for k, v in last_eval.items()}})
            note_eval(last_eval, end)
        result.eval_metrics = last_eval
    if best is not None:
        result.best.update(metric=best.metric, value=best.value, step=best.step)
        result.best.setdefault("stopped_at", None)
        if best.step != end:  # roll back to the best evaluation's weights
            if is_sharded(model):
                load_full_state_dict(model, load_state(best_file))
            else:
                accelerator.unwrap_model(model).load_state_dict(load_state(best_file))
            result.eval_metrics = dict(best.metrics)
            if accelerator.is_main_process:
                print(f"rolled back to step {best.step}: {best.metric} {best.value:.4g} there, "
                      f"{last_eval[best.metric]:.4g} at step {end}", flush=True)
        log({"step": end, "best/step": best.step, "best/value": best.value})
    save_model(model, tokenizer, out, accelerator)
    if accelerator.is_main_process:
        from alignkit.models.card import write_model_card

        write_model_card(out, name, cfg, config_dict(cfg), result.eval_metrics, result.initial_eval_metrics)
        if best is not None:
            best_file.unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    if cfg.logging != "none":
        accelerator.end_training()
    return result
