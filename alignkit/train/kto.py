"""Kahneman–Tversky Optimization (Ethayarajh et al. 2024) on thumbs-up / thumbs-down data.

    alignkit kto --model runs/demo/sft --data feedback.jsonl --beta 0.1 --max_steps 200

Data: `prompt`, `completion`, `label` (true = desirable). With r = log pi(y|x) -
log pi_ref(y|x), desirable examples lose w_D (1 - sigmoid(beta (r - z_ref))) and
undesirable ones w_U (1 - sigmoid(beta (z_ref - r))). The reference point comes from
MISMATCHED pairs: each example is paired once, by a seeded shuffle, with another
example's completion y' under its own prompt x, and

    z_ref = max(0, mean over the optimiser step's mismatched pairs of log pi(y'|x) - log pi_ref(y'|x)),

an estimate of KL(pi || pi_ref), detached. "The step's" means every micro-batch of
every process: the loop's `prepare` computes it (no gradient) before the gradient pass,
so a step split as batch_size x grad_accum x processes in any way has one z_ref and one
gradient, as the loop promises. The gradient pass then runs each example's own row only.
Fixing the partner per example lets reference log-probs be precomputed like DPO's.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass

import torch

from alignkit.config import require
from alignkit.data.tokenize import prompt_length
from alignkit.losses import kto_default_weights, kto_loss, kto_reference_point
from alignkit.models.forward import sequence_logprobs
from alignkit.train.common import load_train_eval, print_summary, say
from alignkit.train.loop import TrainConfig, TrainResult, load_trainable_model, make_accelerator, resolve_resume, train
from alignkit.train.reference import make_reference, precompute_reference, reference_sequence_logprobs


@dataclass
class KTOConfig(TrainConfig):
    """Alignment from unpaired desirable / undesirable completions."""

    lr: float = 1e-5
    """Peak learning rate (AdamW)."""
    beta: float = 0.1
    """Strength of the implicit KL constraint to the reference."""
    desirable_weight: float = 0.0
    """w_D; 0 = balance the classes: w_D n_D = w_U n_U with the larger class at weight 1."""
    undesirable_weight: float = 0.0
    """w_U; 0 = balance the classes (see desirable_weight)."""
    ref_model: str = ""
    """Reference model (empty: the starting `model`; with LoRA, the policy with adapters disabled)."""
    precompute_ref: bool = False
    """Compute reference log-probs once before training, then free the reference model."""
    share_prompt: bool = True
    """Evaluation and precomputed reference log-probs: one row per example, [prompt | completion | partner's
    completion], so the prompt goes through the model once (training runs the two rows in separate passes)."""


def with_mismatched_pairs(examples: list[dict], labels: list[bool], max_length: int, seed: int) -> list[dict]:
    """Each example as two rows: its own (prompt, completion) and (its prompt, a partner's completion).

    The partner is fixed by a seeded derangement-like shuffle (never itself when n > 1);
    the prompt of the mismatched row is left-truncated to fit `max_length`.
    """
    n = len(examples)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    partner = {order[i]: order[(i + 1) % n] for i in range(n)}
    out = []
    for i, ex in enumerate(examples):
        cut = prompt_length(ex["loss_mask"])
        prompt = ex["input_ids"][:cut]
        other = examples[partner[i]]
        other_cut = prompt_length(other["loss_mask"])
        completion = other["input_ids"][other_cut:][:max_length]
        prompt = prompt[: max(0, max_length - len(completion))] if len(prompt) + len(completion) > max_length else prompt
        out.append({
            "id": ex["id"],
            "label": bool(labels[i]),
            "sequences": [ex["input_ids"], prompt + completion],
            "loss_masks": [ex["loss_mask"], [0] * len(prompt) + [1] * len(completion)],
            "input_ids": ex["input_ids"] + prompt + completion,
        })
    return out


def _prompt(ids: list[int], loss_mask: list[int]) -> list[int]:
    return ids[: prompt_length(loss_mask)]


def collate(examples: list[dict], pad_token_id: int, share_prompt: bool = False) -> dict:
    """Rows own, mismatched, own, ... (`pad_groups`), or with `share_prompt` one row per example
    behind its prompt (`pad_shared_prompt`) when every example's mismatched row kept the whole
    prompt (a long partner completion may have cut it)."""
    from alignkit.data import pad_groups
    from alignkit.data.tokenize import pad_shared_prompt

    shared = share_prompt and all(_prompt(ex["sequences"][0], ex["loss_masks"][0]) == _prompt(ex["sequences"][1], ex["loss_masks"][1])
                                  for ex in examples)
    batch = (pad_shared_prompt if shared else pad_groups)(examples, pad_token_id)
    batch["labels"] = torch.tensor([ex["label"] for ex in examples], dtype=torch.bool)
    return batch


def collate_rows(examples: list[dict], pad_token_id: int, j: int) -> dict:
    """Sequence j of each example alone, one row per example (`pad_groups`): j = 0 its own
    completion, j = 1 its mismatched pair; `ref_logps` (if precomputed) and `labels` follow."""
    from alignkit.data import pad_groups

    rows = [{"id": ex["id"], "sequences": ex["sequences"][j : j + 1], "loss_masks": ex["loss_masks"][j : j + 1],
             **({"ref_logps": ex["ref_logps"][j : j + 1]} if "ref_logps" in ex else {})} for ex in examples]
    batch = pad_groups(rows, pad_token_id)
    batch["labels"] = torch.tensor([ex["label"] for ex in examples], dtype=torch.bool)
    return batch


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def make_step_reference_point(examples: list[dict], pad_token_id: int, reference, accelerator):
    """The loop's `prepare`: z_ref of the whole optimiser step, then each micro-batch's own rows.

    With d_i = log pi(y'_i|x_i) - log pi_ref(y'_i|x_i) over the step's mismatched pairs i on
    all processes, z_ref = max(0, sum_i d_i / n): sums and counts are reduced across processes,
    so z_ref does not depend on how the step is split. The pass is under no_grad (z_ref is
    detached in the loss anyway). Each returned batch is `collate_rows(.., 0)` of the same
    examples plus `z_ref` [] (0-dim), which `make_kto_step` then uses (the loop's batches give
    only their example ids: rebuilding rows is cheap next to a forward). A stand-in micro-batch
    (the loop's weight 0: an example of another process, on a process with no share of a
    short last step) adds nothing to the sums.
    """
    by_id = {ex["id"]: ex for ex in examples}
    if len(by_id) != len(examples):
        raise ValueError("example ids must be unique")

    def prepare(model, batches: list[dict], step: int) -> list[dict]:
        device = accelerator.device
        totals = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of d_i, n]
        chunks = [[by_id[i] for i in batch["ids"].tolist()] for batch in batches]
        for chunk, batch in zip(chunks, batches):
            if batch["weight"] > 0:
                kl = _to(collate_rows(chunk, pad_token_id, 1), device)
                with torch.no_grad():
                    policy = sequence_logprobs(model, kl)[0]
                ref = kl["ref_logps"] if "ref_logps" in kl else reference_sequence_logprobs(reference, model, kl)
                totals[0] += (policy.double() - ref.double()).sum()  # on the device: no sync per micro-batch
                totals[1] += len(chunk)
        if accelerator.num_processes > 1:
            totals = accelerator.reduce(totals, "sum")
        z_ref = (totals[0] / totals[1].clamp(min=1)).clamp(min=0).float()
        return [{**_to(collate_rows(chunk, pad_token_id, 0), device), "z_ref": z_ref} for chunk in chunks]
    return prepare


def make_kto_step(beta: float, desirable_weight: float, undesirable_weight: float, reference):
    """`step_fn(model, batch) -> (loss sum, metric sums)` over the batch's examples.

    A training batch from `make_step_reference_point` holds own rows only and the step's
    `z_ref`. Any other batch (`collate`: rows own, mismatched, own, ...) gets z_ref from its
    own mismatched rows: evaluation, which has no `prepare`, takes this path, so an eval
    batch of batch_size examples uses the z_ref of its batch_size mismatched pairs, as a
    training micro-batch did before z_ref became per step.
    """
    def kto_step(model, batch):
        logps, _ = sequence_logprobs(model, batch)
        ref = batch["ref_logps"] if "ref_logps" in batch else reference_sequence_logprobs(reference, model, batch)
        if "z_ref" in batch:
            z_ref = batch["z_ref"]
        else:
            z_ref = kto_reference_point(logps[1::2].detach(), ref[1::2])
            logps, ref = logps[0::2], ref[0::2]
        losses, metrics = kto_loss(logps, ref, batch["labels"], z_ref, beta, desirable_weight, undesirable_weight)
        return losses.sum(), {k: v.sum() for k, v in metrics.items()}
    return kto_step


def example_count(batch) -> int:
    return len(batch["ids"])


def check_both_labels(records: list[dict], source: str) -> None:
    """A DataError when every record has the same label: KTO's default weights balance the two
    classes, and its loss with one class has no undesirable (or desirable) side to push against."""
    from alignkit.data import DataError

    good = sum(bool(r["label"]) for r in records)
    if good in (0, len(records)):
        kind, other = ("desirable (label true)", "undesirable (label false)") if good else (
            "undesirable (label false)", "desirable (label true)")
        raise DataError(str(source), "label", (
            f"all {len(records)} training rows are {kind}; KTO needs both classes: add {other} rows"
            + (", or train on these with `alignkit sft`" if good else "")))


def run(cfg: KTOConfig) -> TrainResult:
    from alignkit.data import tokenize_sft
    from alignkit.models.load import load_tokenizer

    require(cfg, "model", "data")
    train_records, eval_records = load_train_eval(cfg, "unpaired")
    check_both_labels(train_records, cfg.data)
    resume_from = resolve_resume(cfg)
    tokenizer = load_tokenizer(str(resume_from) if resume_from else cfg.model)
    tokens, report = tokenize_sft(train_records, tokenizer, cfg.max_length, cfg.truncation)
    report.check_not_all_truncated(cfg.data, cfg.max_length)
    model = load_trainable_model(cfg, resume_from)
    eval_tokens, _ = tokenize_sft(eval_records, tokenizer, cfg.max_length, cfg.truncation)
    examples = with_mismatched_pairs(tokens, [r["label"] for r in train_records], cfg.max_length, cfg.seed)
    eval_examples = with_mismatched_pairs(eval_tokens, [r["label"] for r in eval_records], cfg.max_length, cfg.seed)
    n_good = sum(ex["label"] for ex in examples)
    n_bad = len(examples) - n_good
    w_d, w_u = cfg.desirable_weight, cfg.undesirable_weight
    if w_d <= 0 or w_u <= 0:
        auto_d, auto_u = kto_default_weights(n_good, n_bad)
        w_d, w_u = w_d if w_d > 0 else auto_d, w_u if w_u > 0 else auto_u

    batch_fn = lambda b: collate(b, tokenizer.pad_token_id, cfg.share_prompt)  # noqa: E731
    accelerator = make_accelerator(cfg, "kto")
    reference = make_reference(cfg.model, cfg.ref_model, cfg.lora_r > 0, accelerator.device, accelerator.autocast,
                               before_first_update=cfg.precompute_ref and resume_from is None)
    if cfg.precompute_ref:
        model.to(accelerator.device)
        for part in (examples, eval_examples):  # no gradients kept: 4x the training batch fits
            precompute_reference(reference, model, part, batch_fn, 4 * cfg.batch_size, accelerator.device)
        reference = None
    step_reference_point = make_step_reference_point(examples, tokenizer.pad_token_id, reference, accelerator)
    say(f"kto: {n_good} desirable, {n_bad} undesirable (weights {w_d:.3g} / {w_u:.3g}), beta {cfg.beta}; {report}")
    result = train(cfg, model, tokenizer, examples, make_kto_step(cfg.beta, w_d, w_u, reference), example_count,
                   batch_fn, name="kto", eval_examples=eval_examples, resume_from=resume_from, accelerator=accelerator,
                   prepare=step_reference_point)
    print_summary("kto", result, [str(report)])
    return result


def main(argv: list[str] | None = None) -> TrainResult:
    from alignkit.config import parse_config

    return run(parse_config(KTOConfig, sys.argv[1:] if argv is None else argv, prog="alignkit kto"))
