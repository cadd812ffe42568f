"""DPO throughput and peak memory, alignkit vs TRL, side by side on this machine.

    .venv/bin/python benchmarks/dpo_throughput.py            # prints a JSON report
    .venv/bin/python benchmarks/dpo_throughput.py --steps 20 --repeats 1

Both libraries get the same tiny Llama directory and tokenizer, the same preference
pairs, batch size, max length, learning rate, beta and step count, each run in a
fresh subprocess, alternating alignkit / TRL, on `--threads` torch threads (1 by default:
on this shared 2-core machine 2 threads collapsed ~10x under other people's load, as in
grpo_step.py). Both libraries' figures count the optimiser steps plus, with a precomputed
reference, the reference pass over the training pairs. TRL is installed with `pip --target`
into benchmarks/.trl (its other requirements are already alignkit's), never into
the project environment. Figures to quote are the ratios from one invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import TRL_DIR, TRL_VERSION, ensure_trl  # noqa: E402


def build_fixture(work: Path, n_pairs: int, seed: int = 0) -> None:
    """A ~1.2M-parameter Llama (hidden 128, 4 layers, vocab 1024) and arithmetic preference pairs."""
    sys.path.insert(0, str(HERE.parent))
    from alignkit.models.tiny import build_tiny_llama, save_tiny, train_tokenizer

    rng = random.Random(seed)

    def pair():
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        prompt = f"Question: what do you get when you add {a} and {b} together? Think it through.\nAnswer:"
        chosen = f" Adding {a} and {b} gives {a + b}, so the answer is {a + b}."
        rejected = f" I think it is {a * b % 1000 + 3}, or maybe {a + 7}; hard to say without more work."
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}

    pairs = [pair() for _ in range(n_pairs + 64)]
    texts = [p["prompt"] + p["chosen"] + p["rejected"] for p in pairs]
    tokenizer = train_tokenizer(texts, vocab_size=1024)
    model = build_tiny_llama(tokenizer, hidden_size=128, num_layers=4, num_heads=4, max_position_embeddings=256)
    save_tiny(model, tokenizer, work / "model")
    for name, rows in (("train", pairs[:n_pairs]), ("eval", pairs[n_pairs:])):
        with (work / f"{name}.jsonl").open("w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


def child_alignkit(work: Path, args) -> dict:
    sys.path.insert(0, str(HERE.parent))
    from transformers.utils import logging as hf_logging

    from alignkit.train import dpo

    hf_logging.disable_progress_bar()
    precompute_s = []

    def timed_precompute(*a, **k):
        start = time.perf_counter()
        dpo_precompute(*a, **k)
        precompute_s.append(time.perf_counter() - start)

    dpo_precompute, dpo.precompute_reference = dpo.precompute_reference, timed_precompute
    start = time.perf_counter()
    result = dpo.run(dpo.DPOConfig(
        model=str(work / "model"), data=str(work / "train.jsonl"), eval_data=str(work / "eval.jsonl"),
        output_dir=str(work / f"out-alignkit-{args.precompute}"), max_steps=args.steps, batch_size=args.batch_size,
        max_length=args.max_length, lr=args.lr, beta=0.1, precompute_ref=bool(args.precompute),
        log_steps=args.steps, lr_scheduler="constant", warmup_ratio=0.0,
    ))
    job_s = time.perf_counter() - start
    # The optimiser steps plus the reference pass over the training pairs, for both libraries.
    train_s = result.train_seconds + (precompute_s[0] if precompute_s else 0.0)
    return {"job_s": job_s, "train_s": train_s, "reference_pass_s": sum(precompute_s[:1]),
            "eval_accuracy": result.eval_metrics["rewards/accuracy"], "eval_loss": result.eval_metrics["loss"]}


def child_trl(work: Path, args) -> dict:
    sys.path.insert(0, str(TRL_DIR))
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
    model = AutoModelForCausalLM.from_pretrained(work / "model")
    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    config = DPOConfig(
        output_dir=str(work / f"out-trl-{args.precompute}"), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, max_length=args.max_length, learning_rate=args.lr, beta=0.1,
        precompute_ref_log_probs=bool(args.precompute), lr_scheduler_type="constant", warmup_steps=0,
        logging_steps=args.steps, report_to="none", save_strategy="no", use_cpu=True, bf16=False,
        disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )
    trainer = DPOTrainer(model=model, args=config, train_dataset=data["train"], eval_dataset=data["eval"],
                         processing_class=tokenizer)
    train_start = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - train_start + (precompute_s[0] if precompute_s else 0.0)
    metrics = trainer.evaluate()
    trainer.save_model(str(work / f"out-trl-{args.precompute}"))
    job_s = time.perf_counter() - start
    return {"job_s": job_s, "train_s": train_s, "reference_pass_s": sum(precompute_s[:1]),
            "eval_accuracy": metrics["eval_rewards/accuracies"], "eval_loss": metrics["eval_loss"]}


def run_child(lib: str, work: Path, args, precompute: int) -> dict:
    cmd = [sys.executable, __file__, "--child", lib, "--work", str(work), "--precompute", str(precompute),
           "--steps", str(args.steps), "--batch_size", str(args.batch_size), "--max_length", str(args.max_length),
           "--lr", str(args.lr), "--threads", str(args.threads)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if args.threads > 0:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{lib} run failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", choices=["alignkit", "trl"])
    parser.add_argument("--work")
    parser.add_argument("--precompute", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each child (0: torch's default)")
    args = parser.parse_args()

    if args.child:
        import torch

        if args.threads > 0:
            torch.set_num_threads(args.threads)
        out = (child_alignkit if args.child == "alignkit" else child_trl)(Path(args.work), args)
        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(out))
        return

    ensure_trl()
    pairs = args.steps * args.batch_size
    report = {"benchmark": "dpo_throughput", "trl_version": TRL_VERSION, "pairs": pairs, "steps": args.steps,
              "batch_size": args.batch_size, "max_length": args.max_length, "threads": args.threads, "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        build_fixture(work, n_pairs=max(pairs, 256))
        for precompute in (0, 1):
            runs = {"alignkit": [], "trl": []}
            for _ in range(args.repeats):
                for lib in ("alignkit", "trl"):  # alternate, so drift in machine load hits both
                    runs[lib].append(run_child(lib, work, args, precompute))
            case = {}
            for lib, rs in runs.items():
                train_s = statistics.median(r["train_s"] for r in rs)
                case[lib] = {
                    "pairs_per_s": pairs / train_s,
                    "job_pairs_per_s": pairs / statistics.median(r["job_s"] for r in rs),
                    "reference_pass_s": statistics.median(r["reference_pass_s"] for r in rs),
                    "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
                    "eval_accuracy": rs[-1]["eval_accuracy"],
                    "eval_loss": rs[-1]["eval_loss"],
                }
            case["speedup"] = case["alignkit"]["pairs_per_s"] / case["trl"]["pairs_per_s"]
            case["memory_ratio"] = case["alignkit"]["peak_rss_mb"] / case["trl"]["peak_rss_mb"]
            report["cases"]["precomputed_ref" if precompute else "ref_on_the_fly"] = case
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
