"""SFT, reward-model and KTO throughput and peak memory, alignkit vs TRL, side by side.

    .venv/bin/python benchmarks/offline_throughput.py --case sft      # prints a JSON report
    .venv/bin/python benchmarks/offline_throughput.py --case rm --steps 10 --repeats 1 [--size medium]

Cases, each timed over `--steps` optimiser steps of `--batch_size` examples:
- `sft`: next-token loss on the completion (+ EOS) of prompt/completion rows; tokens/s, where
  the tokens are BOS + prompt + completion + EOS of every training row, as alignkit tokenises
  them. alignkit `sft.run` vs TRL `SFTTrainer` (completion-only loss, its default for this format).
- `rm`: a Bradley-Terry reward model on prompt/chosen/rejected pairs; pairs/s. alignkit
  `reward.run` vs TRL `RewardTrainer`. Both start from ONE sequence-classification checkpoint
  (num_labels 1, the causal fixture with a scalar head drawn once, seed 0), so the head
  starts the same on both sides.
- `kto`: prompt/completion/label rows (half desirable: the correct answer; half undesirable:
  a wrong one); examples/s. alignkit `kto.run` vs TRL `KTOTrainer` (promoted from
  trl.experimental to `trl` in 1.16), reference model on the fly, beta 0.1, desirable and
  undesirable weights 1 on both sides, KL reference point from mismatched pairs.

Both libraries get the same tiny Llama directory and tokenizer (`--size` small: hidden 128,
4 layers, vocab 1024, 1.18M parameters; medium: hidden 512, 5 layers, 21.5M; see
common.SIZES), the same rows (arithmetic questions, as in dpo_throughput.py), batch size,
max length (no row is truncated), learning rate (constant, no warm-up), seed 0, step count,
fp32, no gradient checkpointing (TRL's default is on), report_to none, save_strategy no,
use_cpu; each run in a fresh subprocess, alternating alignkit / TRL, on `--threads` torch
threads (1 by default, see common.run_child). The training set is exactly steps x batch_size
rows, so each side trains on every row once and both process the same tokens.

Timed: alignkit `TrainResult.train_seconds` (the optimiser steps alone) vs TRL
`trainer.train()` (the same, plus its dataloader set-up); `job_*` runs from the start of the
run, libraries already imported, to the saved model. Quality, measured after the clock by the
same code on each side's saved model, on 64 held-out rows (tokenised by alignkit's tokenizer
code): `sft` held-out NLL per completion token; `rm` held-out pairwise accuracy (reward of
chosen > rejected); `kto` held-out accuracy (the implicit reward log pi - log pi_ref is > 0 for
desirable rows, < 0 for undesirable ones) and each library's own held-out KTO loss.

Not matched exactly: the data order of KTO (alignkit: its seeded permutation; TRL: the file
order, which it requires for its KL pairs). For SFT and RM both orders are torch.randperm
seeded with 0 (alignkit's seed * 1000003 + epoch; the Trainer's RandomSampler, seed 0): the
same batches, and after SFT the two libraries' weights agreed to ~1e-7 here. KTO's mismatched
pairs (alignkit: a fixed seeded partner per row; TRL: the completions rotated by one within
each batch); TRL tokenises prompt + completion jointly for SFT, alignkit separately (the
same ids here except possibly at the boundary); each library's own loss reduction inside a
step (both: mean over the step's tokens for SFT, over its pairs / rows for RM and KTO).
`run_case` is run.py's `sft`, `rm` and `kto` case.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import (MODEL_CLOCK, ROOT, SIZES, TRL_DIR, TRL_VERSION, add_case_arguments, alternate,  # noqa: E402
                    build_tiny, child_main, ensure_trl, preference_corpus, preference_pairs, preimport,
                    side_by_side, summarise, token_lengths, write_jsonl)

N_EVAL = 64
# per case: units counted by the rate, and the default learning rate (the same on both sides)
CASES = {
    "sft": {"unit": "tokens/s", "rate_key": "tokens_per_s", "lr": 5e-4},
    "rm": {"unit": "pairs/s", "rate_key": "pairs_per_s", "lr": 1e-4},
    "kto": {"unit": "examples/s", "rate_key": "examples_per_s", "lr": 1e-4},
}


def rows_for(case: str, pairs: list[dict]) -> list[dict]:
    if case == "sft":
        return [{"prompt": p["prompt"], "completion": p["chosen"]} for p in pairs]
    if case == "rm":
        return pairs
    # kto: alternate desirable / undesirable, so the classes balance (weights 1 on both sides)
    return [{"prompt": p["prompt"], "completion": p["chosen"] if i % 2 == 0 else p["rejected"], "label": i % 2 == 0}
            for i, p in enumerate(pairs)]


def build_fixture(work: Path, case: str, n_train: int, size: str = "small", seed: int = 0) -> dict:
    """The model (and for `rm` the shared initial reward model), train.jsonl and eval.jsonl.
    Returns the parameter count and the tokens of the training rows that go through forward + backward."""
    pairs = preference_pairs(n_train + N_EVAL, seed)
    _, params = build_tiny(work / "model", preference_corpus(pairs), **SIZES[size])
    rows = rows_for(case, pairs)
    write_jsonl(work / "train.jsonl", rows[:n_train])
    write_jsonl(work / "eval.jsonl", rows[n_train:])
    train = rows[:n_train]
    if case == "rm":
        build_reward_init(work / "model", work / "rm-init")
        lengths = token_lengths(work / "model", [r["prompt"] for r in train] * 2,
                                [r["chosen"] for r in train] + [r["rejected"] for r in train])
    else:
        lengths = token_lengths(work / "model", [r["prompt"] for r in train], [r["completion"] for r in train])
    return {"params": params, "train_rows": n_train, "train_tokens": sum(lengths)}


def build_reward_init(model_dir: Path, out: Path) -> None:
    """The causal fixture as AutoModelForSequenceClassification (num_labels 1) with a head drawn from seed 0."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "newly initialized: score.weight" is the point
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


# ---- quality, after the clock: the same code for both libraries' saved models ----

def completion_logps(model_dir: Path, rows: list[dict], max_length: int, batch_size: int = 16):
    """log pi(completion + EOS | prompt) per row, and its token count (tensors [N])."""
    import torch
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(ROOT))
    from alignkit.data import pad_batch, tokenize_sft
    from alignkit.models.forward import sequence_logprobs
    from alignkit.models.load import load_tokenizer

    tokenizer = load_tokenizer(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    examples, _ = tokenize_sft([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows], tokenizer, max_length)
    logps, counts = [], []
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            lp, n = sequence_logprobs(model, pad_batch(examples[i : i + batch_size], tokenizer.pad_token_id))
            logps.append(lp)
            counts.append(n)
    return torch.cat(logps), torch.cat(counts)


def quality(case: str, work: Path, out: Path, max_length: int) -> dict:
    eval_rows = [json.loads(line) for line in (work / "eval.jsonl").read_text().splitlines()]
    if case == "sft":
        logps, n = completion_logps(out, eval_rows, max_length)
        return {"eval_nll_per_token": round(float(-logps.sum() / n.sum()), 4)}
    if case == "rm":
        sys.path.insert(0, str(ROOT))
        from alignkit.models.reward import RewardModel

        rm = RewardModel.load(str(out), max_length=max_length, normalize=False)
        prompts = [r["prompt"] for r in eval_rows]
        chosen = rm.score(prompts, [r["chosen"] for r in eval_rows])
        rejected = rm.score(prompts, [r["rejected"] for r in eval_rows])
        return {"eval_accuracy": round(statistics.fmean(c > r for c, r in zip(chosen, rejected)), 4)}
    policy, _ = completion_logps(out, eval_rows, max_length)
    reference, _ = completion_logps(work / "model", eval_rows, max_length)
    hits = [(float(r) > 0) == row["label"] for r, row in zip(policy - reference, eval_rows)]
    return {"eval_accuracy": round(statistics.fmean(hits), 4)}


# ---- the two sides ----

def child_alignkit(work: Path, args) -> dict:
    sys.path.insert(0, str(ROOT))
    from transformers.utils import logging as hf_logging

    from alignkit.train import kto, reward, sft

    preimport("alignkit.models.reward")
    hf_logging.disable_progress_bar()
    out = work / f"out-alignkit-{args.case}"
    common = dict(data=str(work / "train.jsonl"), output_dir=str(out), overwrite=True, max_steps=args.steps, batch_size=args.batch_size,
                  grad_accum=1, max_length=args.max_length, lr=args.lr, lr_scheduler="constant", warmup_ratio=0.0,
                  weight_decay=0.0, max_grad_norm=1.0, seed=0, precision="no", log_steps=args.steps)
    start = time.perf_counter()
    with MODEL_CLOCK.counting():
        if args.case == "sft":
            result = sft.run(sft.SFTConfig(model=str(work / "model"), **common))
        elif args.case == "rm":
            result = reward.run(reward.RewardConfig(model=str(work / "rm-init"), normalize=False, **common))
        else:
            result = kto.run(kto.KTOConfig(model=str(work / "model"), eval_data=str(work / "eval.jsonl"), beta=0.1,
                                           desirable_weight=1.0, undesirable_weight=1.0, **common))
    job_s = time.perf_counter() - start
    metrics = quality(args.case, work, out, args.max_length)
    if args.case == "kto":
        metrics["eval_loss"] = round(result.eval_metrics["loss"], 4)
    return {"job_s": job_s, "train_s": result.train_seconds, "quality": metrics}


def child_trl(work: Path, args) -> dict:
    sys.path.insert(0, str(TRL_DIR))
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging
    from trl import KTOConfig, KTOTrainer, RewardConfig, RewardTrainer, SFTConfig, SFTTrainer

    hf_logging.disable_progress_bar()
    out = work / f"out-trl-{args.case}"
    common = dict(output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                  per_device_eval_batch_size=args.batch_size, gradient_accumulation_steps=1, max_length=args.max_length,
                  learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                  max_grad_norm=1.0, seed=0, logging_steps=args.steps, report_to="none", save_strategy="no",
                  use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False, disable_tqdm=True,
                  dataloader_num_workers=0)
    start = time.perf_counter()
    # a fresh datasets cache per child: no child reads what an earlier one cached
    data = load_dataset("json", data_files={"train": str(work / "train.jsonl"), "eval": str(work / "eval.jsonl")},
                        cache_dir=tempfile.mkdtemp(dir=work, prefix="hf-cache-"))
    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    if args.case == "sft":
        model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
        trainer = SFTTrainer(model=model, args=SFTConfig(**common), train_dataset=data["train"],
                             processing_class=tokenizer)
    elif args.case == "rm":
        model = AutoModelForSequenceClassification.from_pretrained(work / "rm-init", dtype=torch.float32)
        trainer = RewardTrainer(model=model, args=RewardConfig(**common), train_dataset=data["train"],
                                processing_class=tokenizer)
    else:
        model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
        config = KTOConfig(beta=0.1, desirable_weight=1.0, undesirable_weight=1.0, **common)
        trainer = KTOTrainer(model=model, args=config, train_dataset=data["train"], eval_dataset=data["eval"],
                             processing_class=tokenizer)
    train_start = time.perf_counter()
    with MODEL_CLOCK.counting():
        trainer.train()
    train_s = time.perf_counter() - train_start
    eval_loss = trainer.evaluate()["eval_loss"] if args.case == "kto" else None
    trainer.save_model(str(out))
    job_s = time.perf_counter() - start
    metrics = quality(args.case, work, out, args.max_length)
    if eval_loss is not None:
        metrics["eval_loss"] = round(eval_loss, 4)
    return {"job_s": job_s, "train_s": train_s, "quality": metrics, "optimizer_steps": trainer.state.global_step}


def run_case(work: Path, case: str, size: str = "small", steps: int = 40, batch_size: int = 8,
             max_length: int = 128, lr: float | None = None, repeats: int = 2, threads: int = 1) -> dict:
    """One comparison (`case` sft, rm or kto) in `work`, its fixture built there first."""
    ensure_trl()
    spec = CASES[case]
    lr = spec["lr"] if lr is None else lr
    n_rows = steps * batch_size
    fixture = build_fixture(work, case, n_rows, size)
    argv = ["--case", case, "--work", str(work), "--steps", str(steps), "--batch_size", str(batch_size),
            "--max_length", str(max_length), "--lr", str(lr), "--threads", str(threads)]
    runs = alternate(__file__, argv, repeats, threads)
    units = fixture["train_tokens"] if case == "sft" else n_rows

    def summary(lib: str, rs: list[dict]) -> dict:
        bad = [r["optimizer_steps"] for r in rs if r.get("optimizer_steps", steps) != steps]
        if bad:
            raise RuntimeError(f"{lib} ran {bad} optimiser steps, expected {steps}")
        return {**summarise(rs, units, spec["rate_key"]), "quality": rs[-1]["quality"]}

    out = {"case": case, "size": size, "params": fixture["params"], "unit": spec["unit"], "rate_key": spec["rate_key"],
           "steps": steps, "batch_size": batch_size, "rows": n_rows, "max_length": max_length, "lr": lr,
           "train_tokens": fixture["train_tokens"]}
    if case == "kto":
        out["beta"] = 0.1
    return side_by_side(out, runs, spec["rate_key"], summary)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=sorted(CASES), required=True)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=None, help="default: per case (sft 5e-4, rm 1e-4, kto 1e-4)")
    add_case_arguments(parser)
    args = parser.parse_args()

    if args.child:
        child_main(args, {"alignkit": child_alignkit, "trl": child_trl})
        return

    with tempfile.TemporaryDirectory(prefix=f"alignkit-{args.case}-") as tmp:
        case = run_case(Path(tmp), args.case, args.size, args.steps, args.batch_size, args.max_length, args.lr,
                        args.repeats, args.threads)
    print(json.dumps({"benchmark": "offline_throughput", "trl_version": TRL_VERSION, **case}, indent=1))


if __name__ == "__main__":
    main()
