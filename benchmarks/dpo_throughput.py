"""DPO throughput and peak memory, alignkit vs TRL, side by side on this machine.

    .venv/bin/python benchmarks/dpo_throughput.py            # prints a JSON report
    .venv/bin/python benchmarks/dpo_throughput.py --steps 20 --repeats 1 [--size medium]

Both libraries get the same tiny Llama directory and tokenizer (`--size` small: hidden 128,
4 layers, 1.18M parameters; medium: hidden 512, 5 layers, 21.5M; see common.SIZES), the
same arithmetic preference pairs, batch size, max length, learning rate (constant, no
warm-up), beta, seed and step count, fp32, no gradient checkpointing (TRL's default is
on), each run in a fresh subprocess, alternating alignkit / TRL, on `--threads` torch
threads (1 by default: on this shared 2-core machine 2 threads collapsed ~10x under other
people's load, as in grpo_step.py). Both libraries' figures count the optimiser steps plus,
with a precomputed reference, the reference pass over the training pairs: alignkit
`TrainResult.train_seconds` (+ its timed `precompute_reference` over the training pairs)
vs TRL `trainer.train()` (+ its timed `_precompute_ref_logps` over the training set, which
TRL runs in its constructor). Held-out quality: each library's own evaluation of the same
64 held-out pairs, implicit-reward accuracy and loss. TRL is installed with `pip --target`
into benchmarks/.trl (its other requirements are already alignkit's), never into the
project environment. Figures to quote are the ratios from one invocation. `run_case` is
run.py's `dpo` / `dpo_precomputed` case.

Not matched exactly: alignkit puts chosen and rejected in one row behind one shared prompt
(its default `share_prompt`), TRL in two rows with the prompt in each; the data order
(each side's own seeded shuffle). The standalone script trains on a set of max(steps x
batch_size, 256) pairs; run.py on exactly steps x batch_size (one epoch, so both sides see
every pair once and `train_tokens` is exact).
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
from common import (MODEL_CLOCK, SIZES, TRL_DIR, TRL_VERSION, add_case_arguments, alternate, build_tiny,  # noqa: E402
                    child_main, ensure_trl, preference_corpus, preference_pairs, preimport, side_by_side,
                    summarise, token_lengths, write_jsonl)

N_EVAL = 64


def build_fixture(work: Path, n_pairs: int, size: str = "small", seed: int = 0) -> dict:
    """A tiny Llama of `size` and arithmetic preference pairs (n_pairs to train on, 64 held out).
    Returns the parameter count and the policy tokens of the training pairs (prompt + chosen + EOS
    and prompt + rejected + EOS, each with BOS)."""
    pairs = preference_pairs(n_pairs + N_EVAL, seed)
    _, params = build_tiny(work / "model", preference_corpus(pairs), **SIZES[size])
    write_jsonl(work / "train.jsonl", pairs[:n_pairs])
    write_jsonl(work / "eval.jsonl", pairs[n_pairs:])
    train = pairs[:n_pairs]
    lengths = token_lengths(work / "model", [p["prompt"] for p in train] * 2,
                            [p["chosen"] for p in train] + [p["rejected"] for p in train])
    return {"params": params, "train_pairs": n_pairs, "train_pair_tokens": sum(lengths)}


def child_alignkit(work: Path, args) -> dict:
    sys.path.insert(0, str(HERE.parent))
    from transformers.utils import logging as hf_logging

    from alignkit.train import dpo

    preimport()  # before the clock, as TRL's are in child_trl
    hf_logging.disable_progress_bar()
    precompute_s = []

    def timed_precompute(*a, **k):
        start = time.perf_counter()
        dpo_precompute(*a, **k)
        precompute_s.append(time.perf_counter() - start)

    dpo_precompute, dpo.precompute_reference = dpo.precompute_reference, timed_precompute
    start = time.perf_counter()
    with MODEL_CLOCK.counting():  # a forward outside the optimiser steps and the reference pass is evaluation (paused)
        result = dpo.run(dpo.DPOConfig(
            model=str(work / "model"), data=str(work / "train.jsonl"), eval_data=str(work / "eval.jsonl"),
            output_dir=str(work / f"out-alignkit-{args.precompute}"), overwrite=True, max_steps=args.steps, batch_size=args.batch_size,
            max_length=args.max_length, lr=args.lr, beta=0.1, precompute_ref=bool(args.precompute),
            log_steps=args.steps, lr_scheduler="constant", warmup_ratio=0.0, seed=0, precision="no",
        ))
    job_s = time.perf_counter() - start
    # The optimiser steps plus the reference pass over the training pairs, for both libraries.
    train_s = result.train_seconds + (precompute_s[0] if precompute_s else 0.0)
    return {"job_s": job_s, "train_s": train_s, "reference_pass_s": sum(precompute_s[:1]),
            "eval_accuracy": result.eval_metrics["rewards/accuracy"], "eval_loss": result.eval_metrics["loss"]}


def child_trl(work: Path, args) -> dict:
    sys.path.insert(0, str(TRL_DIR))
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    from trl import DPOConfig, DPOTrainer

    hf_logging.disable_progress_bar()
    # TRL 1.16 runs its reference pass inside DPOTrainer(...), not in train(): time the pass over
    # the training pairs and add it to train_s, as for alignkit. A fresh datasets cache per child
    # keeps TRL from reading the log-probs an earlier child cached on disk (alignkit caches none).
    precompute_s = []
    trl_precompute = DPOTrainer._precompute_ref_logps

    def timed_precompute(self, dataset, name, *a, **k):
        start = time.perf_counter()
        out = trl_precompute(self, dataset, name, *a, **k)
        if name == "train":
            precompute_s.append(time.perf_counter() - start)
        return out

    DPOTrainer._precompute_ref_logps = timed_precompute
    start = time.perf_counter()
    data = load_dataset("json", data_files={"train": str(work / "train.jsonl"), "eval": str(work / "eval.jsonl")},
                        cache_dir=tempfile.mkdtemp(dir=work, prefix="hf-cache-"))
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    config = DPOConfig(
        output_dir=str(work / f"out-trl-{args.precompute}"), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, max_length=args.max_length, learning_rate=args.lr, beta=0.1,
        precompute_ref_log_probs=bool(args.precompute), lr_scheduler_type="constant", warmup_steps=0,
        logging_steps=args.steps, report_to="none", save_strategy="no", use_cpu=True, bf16=False,
        gradient_checkpointing=False, disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )
    with MODEL_CLOCK.counting():  # the constructor's only forwards are the reference pass
        trainer = DPOTrainer(model=model, args=config, train_dataset=data["train"], eval_dataset=data["eval"],
                             processing_class=tokenizer)
    train_start = time.perf_counter()
    with MODEL_CLOCK.counting():
        trainer.train()
    train_s = time.perf_counter() - train_start + (precompute_s[0] if precompute_s else 0.0)
    metrics = trainer.evaluate()
    trainer.save_model(str(work / f"out-trl-{args.precompute}"))
    job_s = time.perf_counter() - start
    return {"job_s": job_s, "train_s": train_s, "reference_pass_s": sum(precompute_s[:1]),
            "eval_accuracy": metrics["eval_rewards/accuracies"], "eval_loss": metrics["eval_loss"]}


def run_case(work: Path, size: str = "small", steps: int = 40, batch_size: int = 8, max_length: int = 128,
             lr: float = 1e-4, precompute: bool = False, repeats: int = 2, threads: int = 1,
             n_pairs: int | None = None) -> dict:
    """One DPO comparison (reference on the fly, or precomputed) in `work`, whose fixture is built
    on first use (n_pairs training pairs, default steps x batch_size: exactly one epoch)."""
    ensure_trl()
    pairs = steps * batch_size
    n_pairs = n_pairs or pairs
    fixture_file = work / "fixture.json"
    if not fixture_file.exists():
        fixture_file.write_text(json.dumps(build_fixture(work, n_pairs, size)))
    fixture = json.loads(fixture_file.read_text())
    argv = ["--work", str(work), "--precompute", str(int(precompute)), "--steps", str(steps),
            "--batch_size", str(batch_size), "--max_length", str(max_length), "--lr", str(lr), "--threads", str(threads)]
    runs = alternate(__file__, argv, repeats, threads)

    def summary(lib: str, rs: list[dict]) -> dict:
        return {**summarise(rs, pairs, "pairs_per_s"),
                "reference_pass_s": round(statistics.median(r["reference_pass_s"] for r in rs), 3),
                "quality": {"eval_accuracy": round(rs[-1]["eval_accuracy"], 4), "eval_loss": round(rs[-1]["eval_loss"], 4)}}

    case = {"case": "dpo_precomputed" if precompute else "dpo", "size": size, "params": fixture["params"],
            "unit": "pairs/s", "rate_key": "pairs_per_s", "pairs": pairs, "steps": steps, "batch_size": batch_size,
            "max_length": max_length, "lr": lr, "beta": 0.1, "reference": "precomputed" if precompute else "on the fly",
            # policy tokens through forward + backward (for MFU), the same on both sides
            "train_tokens": fixture["train_pair_tokens"] * pairs / fixture["train_pairs"]}
    return side_by_side(case, runs, "pairs_per_s", summary)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-4)
    add_case_arguments(parser)
    parser.add_argument("--precompute", type=int, default=0)
    args = parser.parse_args()

    if args.child:
        child_main(args, {"alignkit": child_alignkit, "trl": child_trl})
        return

    pairs = args.steps * args.batch_size
    report = {"benchmark": "dpo_throughput", "trl_version": TRL_VERSION, "pairs": pairs, "steps": args.steps,
              "batch_size": args.batch_size, "max_length": args.max_length, "threads": args.threads, "cases": {}}
    with tempfile.TemporaryDirectory(prefix="alignkit-dpo-") as tmp:
        for precompute in (False, True):
            case = run_case(Path(tmp), args.size, args.steps, args.batch_size, args.max_length, args.lr, precompute,
                            args.repeats, args.threads, n_pairs=max(pairs, 256))
            report["cases"]["precomputed_ref" if precompute else "ref_on_the_fly"] = case
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
