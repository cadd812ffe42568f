"""Every benchmark case, alignkit vs TRL side by side, as one JSON table and benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/run.py --quick                      # small size, few steps, 1 repeat (~3-5 min)
    .venv/bin/python benchmarks/run.py                              # both sizes, 2 repeats (by hand; long)
    .venv/bin/python benchmarks/run.py --only dpo grpo --sizes medium --steps 10

Cases (each lives in one module, which also runs standalone; see its docstring for exactly
what is compared and timed, and what could not be matched between the libraries):

| case | module | rate | quality (both libraries, held out unless noted) |
| --- | --- | --- | --- |
| sft | offline_throughput.py | tokens/s | NLL per completion token |
| rm | offline_throughput.py | pairs/s | pairwise accuracy |
| dpo | dpo_throughput.py (reference on the fly) | pairs/s | implicit-reward accuracy, loss |
| dpo_precomputed | dpo_throughput.py (+ the reference pass) | pairs/s | implicit-reward accuracy, loss |
| kto | offline_throughput.py | examples/s | implicit-reward sign accuracy, KTO loss |
| grpo | grpo_step.py (G = 8, 64-token completions) | completions/s | training reward, first / last window |
| grpo_lora | grpo_step.py, LoRA rank 8 on both sides (reference = adapters disabled) | completions/s | training reward, first / last window |
| ppo | ppo_step.py (64-token completions) | completions/s | training reward, first / last window |

In every case both libraries get the same model directory, tokenizer, data, batch size,
max length, learning rate (constant, no warm-up), step count, seed 0, fp32, no gradient
checkpointing, report_to none, save_strategy no, use_cpu; each run is a fresh interpreter,
the libraries alternate within the invocation (alignkit, TRL, alignkit, TRL, ...), and every
child runs torch on `--threads` threads (1 by default: on this shared 2-core machine 2
threads collapsed under other people's load, see common.run_child). The rate is units / the
median training time over the repeats; `speedup` = alignkit rate / TRL rate and
`memory_ratio` = alignkit / TRL peak resident memory (ru_maxrss of each child, the largest
over the repeats). `ceiling` = TRL's median training time / alignkit's median time inside
the model's forward and backward (common.ModelClock): the speed-up alignkit would reach if
its work outside the model took no time (the model's own work as it is). Quote ratios from one invocation, not absolute figures across runs.
TRL 1.16 has no PPO trainer: that case records `"trl": null` and the exact ImportErrors.

Sizes (common.SIZES; random Llama, intermediate 4 x hidden, tied embeddings, vocab 1024):
`small` hidden 128, 4 layers, 4 heads (1.18M parameters); `medium` hidden 512, 5 layers,
8 heads (21.5M; 6 layers would be 25.7M). For `medium` the runner first measures this
machine's float32 matmul FLOP/s (torch.mm of 1024, 1536 and 2048 square matrices in a child
on the same threads, the best of 3 calls each, the best size kept) and reports each
library's model-FLOPs utilisation, MFU = 6 N T / median training seconds / that peak, with
N the model's parameters and T the training tokens of the run: every token of the rows that
go through the policy's forward + backward (SFT: BOS + prompt + completion + EOS; RM and
DPO: prompt + chosen and prompt + rejected rows; KTO: the rows themselves, not the KL rows;
GRPO and PPO: completions x (mean prompt tokens + that side's mean completion length)). T is
the same for both libraries except in GRPO / PPO, where completion lengths are sampled; the
reference, critic, no-grad and generation passes are not counted, so MFU is a lower bound
for those methods, comparable between the libraries, not across cases.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import dpo_throughput  # noqa: E402
import grpo_step  # noqa: E402
import offline_throughput  # noqa: E402
import ppo_step  # noqa: E402
from common import SIZES, TRL_VERSION, ensure_trl, matmul_flops, mfu, run_child  # noqa: E402

# Steps per case and size for a full run; --quick uses QUICK (small only, 1 repeat).
STEPS = {
    "small": {"sft": 40, "rm": 40, "dpo": 40, "dpo_precomputed": 40, "kto": 40, "grpo": 20, "grpo_lora": 20, "ppo": 10},
    "medium": {"sft": 20, "rm": 20, "dpo": 20, "dpo_precomputed": 20, "kto": 20, "grpo": 8, "grpo_lora": 8, "ppo": 4},
}
QUICK = {"sft": 8, "rm": 8, "dpo": 4, "dpo_precomputed": 4, "kto": 4, "grpo": 2, "grpo_lora": 2, "ppo": 2}
QUICK_COMPLETIONS = 16  # completions per GRPO / PPO step with --quick (2 prompts x G = 8 for GRPO); 64 otherwise


def run_one(name: str, work: Path, size: str, steps: int, repeats: int, threads: int, quick: bool) -> dict:
    completions = QUICK_COMPLETIONS if quick else 64
    if name in ("sft", "rm", "kto"):
        return offline_throughput.run_case(work, name, size, steps, repeats=repeats, threads=threads)
    if name in ("dpo", "dpo_precomputed"):
        return dpo_throughput.run_case(work, size, steps, precompute=name == "dpo_precomputed", repeats=repeats,
                                       threads=threads)
    if name in ("grpo", "grpo_lora"):
        return grpo_step.run_case(work, size, steps, batch_size=completions, num_generations=8, max_new_tokens=64,
                                  lora_r=8 if name == "grpo_lora" else 0,
                                  repeats=repeats, threads=threads)
    return ppo_step.run_case(work, size, steps, batch_size=completions, max_new_tokens=64, repeats=repeats,
                             threads=threads)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch_version()}, python {platform.python_version()}"


def torch_version() -> str:
    from importlib.metadata import version

    return version("torch")


def add_mfu(case: dict, peak_flops: float) -> None:
    for lib in ("alignkit", "trl"):
        side = case.get(lib)
        if side:
            tokens = side.get("train_tokens", case.get("train_tokens"))
            side["mfu"] = round(mfu(case["params"], tokens, statistics.median(side["train_s"]), peak_flops), 5)


def fmt_rate(side: dict | None, case: dict) -> str:
    return "—" if not side else f"{side[case['rate_key']]:,.1f}"


def fmt_quality(side: dict | None) -> str:
    if not side:
        return "—"
    parts = []
    for k, v in side["quality"].items():
        if isinstance(v, dict):
            parts.append(f"{k} {v['first']:.3f} → {v['last']:.3f}")
        else:
            parts.append(f"{k} {v:.3f}")
    return ", ".join(parts)


def fmt_share(side: dict | None) -> str:
    """The median share of training time spent inside the model's forward and backward."""
    if not side or "model_s" not in side:
        return "—"
    return f"{statistics.median(side['model_s']) / statistics.median(side['train_s']):.0%}"


def fmt_ratio(x) -> str:
    return "—" if x is None else f"{x:.2f}×"


def results_markdown(report: dict) -> str:
    lines = ["# Benchmarks: alignkit vs TRL", "",
             f"Produced by `{report['command']}` on {report['date']} (TRL {report['trl_version']}, "
             f"{report['threads']} torch thread(s) per child, {report['repeats']} repeat(s), {report['machine']}).",
             "What each case compares and times, and what could not be matched between the libraries: "
             "the docstrings of benchmarks/run.py and of each case's module. Ratios come from this one invocation "
             "(libraries alternating); the machine is shared, so absolute rates are noisy.", ""]
    if "matmul" in report:
        mm = report["matmul"]
        lines += [f"Measured float32 matmul peak (torch.mm, {mm['threads']} thread): {mm['best_flops'] / 1e9:.1f} GFLOP/s "
                  f"(by size: {', '.join(f'{n}: {f / 1e9:.1f}' for n, f in mm['by_size'].items())}); "
                  "MFU = 6 N T / training seconds / that peak (medium only).", ""]
    with_mfu = any("mfu" in (c.get("alignkit") or {}) for c in report["cases"])
    head = ["case", "size", "params", "unit", "alignkit", "TRL", "speedup", "ceiling", "in model alignkit / TRL",
            "memory ratio", "quality alignkit", "quality TRL"]
    if with_mfu:
        head += ["MFU alignkit", "MFU TRL"]
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    notes = []
    for c in report["cases"]:
        if "error" in c:
            notes.append(f"{c['case']} / {c['size']}: failed: {c['error']}")
            row = [c["case"], c["size"], "", "", "failed"] + [""] * (len(head) - 5)
            lines.append("| " + " | ".join(row) + " |")
            continue
        a, t = c["alignkit"], c["trl"]
        trl_rate = fmt_rate(t, c)
        if t is None:
            notes.append(f"{c['case']} / {c['size']}: no TRL figure: {c['reason']}")
            trl_rate = "— (see note)"
        row = [c["case"], c["size"], f"{c['params'] / 1e6:.2f}M", c["unit"], fmt_rate(a, c), trl_rate,
               fmt_ratio(c["speedup"]), fmt_ratio(c.get("ceiling")), " / ".join(fmt_share(s) for s in (a, t)),
               fmt_ratio(c["memory_ratio"]), fmt_quality(a), fmt_quality(t)]
        if with_mfu:
            row += [f"{s['mfu']:.2%}" if s and "mfu" in s else "—" for s in (a, t)]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines += [f"- {n}" for n in notes]
    lines += ["", "In model = the share of the training time spent inside transformers' decoder forward "
              "(every call: policy, reference, value model, each generated token) and backward (common.ModelClock); "
              "the rest is each library's own work: data, output head and log-softmax, loss, sampling, optimiser, "
              "Python. Ceiling = TRL's training time / alignkit's time in the model: the speed-up alignkit would "
              "show if everything outside the model's forward and backward took no time. "
              "Memory ratio = alignkit / TRL peak resident memory of the child process (ru_maxrss). "
              "Quality: sft held-out NLL per completion token; rm held-out pairwise accuracy; dpo held-out implicit-reward "
              "accuracy and loss (each library's own evaluation); kto held-out implicit-reward sign accuracy and each "
              "library's own held-out loss; grpo / ppo mean training reward over the first → last steps.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(QUICK), metavar="NAME",
                        help=f"cases to run (default all: {' '.join(QUICK)})")
    parser.add_argument("--sizes", default=None, help="comma-separated, from: small,medium (default both; --quick: small)")
    parser.add_argument("--quick", action="store_true", help="few steps, small size, 1 repeat")
    parser.add_argument("--steps", type=int, default=0, help="override every case's step count")
    parser.add_argument("--repeats", type=int, default=0, help="runs per library (default 2; --quick: 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each child (0: torch's default)")
    parser.add_argument("--results", default=str(HERE / "RESULTS.md"), help="where to write the Markdown table")
    parser.add_argument("--child", choices=["matmul"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child == "matmul":
        import torch

        if args.threads > 0:
            torch.set_num_threads(args.threads)
        print(json.dumps(matmul_flops()))
        return

    sizes = (args.sizes or ("small" if args.quick else "small,medium")).split(",")
    bad = [s for s in sizes if s not in SIZES]
    if bad:
        parser.error(f"unknown size(s) {bad}; choose from {sorted(SIZES)}")
    names = args.only or list(QUICK)
    repeats = args.repeats or (1 if args.quick else 2)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    ensure_trl()
    report = {"benchmark": "run", "trl_version": TRL_VERSION,
              "command": shlex.join(["python", "benchmarks/run.py", *sys.argv[1:]]),
              "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "machine": machine(),
              "threads": args.threads, "repeats": repeats, "quick": args.quick, "sizes": sizes}
    if "medium" in sizes:
        report["matmul"] = run_child(__file__, ["--child", "matmul", "--threads", str(args.threads)], "matmul",
                                     threads=args.threads)
    cases, failed = [], False
    for size in sizes:
        for name in names:
            steps = args.steps or (QUICK if args.quick else STEPS[size])[name]
            print(f"run: {name} / {size}, {steps} steps, {repeats} repeat(s) ...", file=sys.stderr, flush=True)
            try:
                with tempfile.TemporaryDirectory(prefix=f"alignkit-bench-{name}-") as tmp:
                    case = run_one(name, Path(tmp), size, steps, repeats, args.threads, args.quick)
            except Exception as e:  # one broken case must not hide the others' figures
                failed = True
                case = {"case": name, "size": size, "error": f"{type(e).__name__}: {str(e).strip()[-2000:]}"}
            if size == "medium" and "error" not in case:
                add_mfu(case, report["matmul"]["best_flops"])
            cases.append(case)
    report["cases"] = cases
    Path(args.results).write_text(results_markdown(report))
    print(json.dumps(report, indent=1))
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
