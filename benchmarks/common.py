"""Shared by the benchmark scripts: TRL's private install, the tiny-Llama fixtures, child runs
(one interpreter per library run, alternating), the per-side summary and the FLOP counts.

TRL is installed with `pip install --no-deps --target benchmarks/.trl` (its other
requirements are already alignkit's), never into the project environment.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TRL_DIR = HERE / ".trl"
TRL_VERSION = "1.16.0"
LIBS = ("alignkit", "trl")

# Model sizes of the fixtures: a random Llama, intermediate 4 x hidden, tied embeddings, vocab 1024.
SIZES = {
    "small": {"hidden_size": 128, "num_layers": 4, "num_heads": 4},   # 1.18M parameters
    "medium": {"hidden_size": 512, "num_layers": 5, "num_heads": 8},  # 21.5M parameters
}


def ensure_trl() -> None:
    if not (TRL_DIR / "trl").exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(TRL_DIR),
                        f"trl=={TRL_VERSION}"], check=True)


def build_tiny(path: Path, texts: list[str], hidden_size: int = 128, num_layers: int = 4, num_heads: int = 4,
               vocab_size: int = 1024, max_position_embeddings: int = 256, tokenizer=None):
    """A randomly initialised Llama (intermediate 4 x hidden, tied embeddings) and a BPE
    tokenizer trained on `texts` (or `tokenizer` when given), saved side by side in `path`.
    Returns (tokenizer, number of parameters)."""
    sys.path.insert(0, str(ROOT))
    from transformers.utils import logging as hf_logging

    from alignkit.models.tiny import build_tiny_llama, save_tiny, train_tokenizer

    hf_logging.disable_progress_bar()
    tokenizer = tokenizer or train_tokenizer(texts, vocab_size=vocab_size)
    model = build_tiny_llama(tokenizer, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                             max_position_embeddings=max_position_embeddings)
    save_tiny(model, tokenizer, path)
    return tokenizer, sum(p.numel() for p in model.parameters())


def run_child(script: str, argv: list[str], what: str, threads: int = 0) -> dict:
    """Run `script --child ...` in a fresh interpreter; its last stdout line is a JSON object.

    threads > 0 caps the child's OpenMP / MKL threads (the child should also call
    `torch.set_num_threads`). On this shared 2-core machine, with other jobs running, torch
    with 2 threads was measured 45x slower than with 1 on the same sampling loop (threads
    spinning at every op's barrier while the other core is taken), so the scripts default to 1.
    """
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if threads > 0:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} run failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def preference_pairs(n: int, seed: int = 0) -> list[dict]:
    """Arithmetic preference pairs: the chosen answer adds correctly, the rejected one guesses."""
    rng = random.Random(seed)

    def pair():
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        prompt = f"Question: what do you get when you add {a} and {b} together? Think it through.\nAnswer:"
        chosen = f" Adding {a} and {b} gives {a + b}, so the answer is {a + b}."
        rejected = f" I think it is {a * b % 1000 + 3}, or maybe {a + 7}; hard to say without more work."
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}

    return [pair() for _ in range(n)]


def preference_corpus(pairs: list[dict]) -> list[str]:
    """Tokenizer training text for a preference fixture: its own pairs plus 2000 fixed ones, so the
    BPE vocabulary always fills its 1024 entries and every case's model has the same size."""
    return [p["prompt"] + p["chosen"] + p["rejected"] for p in pairs + preference_pairs(2000, seed=1)]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def token_lengths(model_dir: Path, prompts: list[str], completions: list[str]) -> list[int]:
    """Tokens of each prompt + completion + EOS, as alignkit tokenises them (BOS, prompt, completion, EOS)."""
    sys.path.insert(0, str(ROOT))
    from alignkit.data import tokenize_sft
    from alignkit.models.load import load_tokenizer

    records = [{"prompt": p, "completion": c} for p, c in zip(prompts, completions)]
    examples, _ = tokenize_sft(records, load_tokenizer(str(model_dir)), max_length=1 << 20)
    return [len(ex["input_ids"]) for ex in examples]


def preimport(*extra: str) -> None:
    """Import before an alignkit child starts its job clock what alignkit's `run` imports lazily
    (TRL's child has these loaded by `import trl`), so `job_s` compares work, not import time."""
    import importlib

    for module in ("accelerate", "tqdm.auto", "transformers.modeling_utils", "transformers.models.llama.modeling_llama",
                   "transformers.models.auto.modeling_auto", "transformers.optimization", "alignkit.data",
                   "alignkit.models.load", *extra):
        importlib.import_module(module)


def add_case_arguments(parser) -> None:
    """The flags every alignkit-vs-TRL case script shares: repeats, model size, threads, and
    the `--child LIB --work DIR` pair by which the parent starts each library's run."""
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each child (0: torch's default)")
    parser.add_argument("--child", choices=list(LIBS))
    parser.add_argument("--work")


class ModelClock:
    """Seconds of a child's training spent inside the model's own compute, summed over every call
    of transformers' decoder forward (`LlamaModel.forward`: policy, reference, value model, each
    generation step) and of `Tensor.backward`, while `counting()` is open and outside evaluation
    (alignkit's `loop.evaluate`, transformers' `Trainer.evaluate`).

    Both libraries run the same decoder code, so train_s - model_s is what each library adds
    around it: data, the output head and log-softmax, loss, sampling, optimiser, Python. TRL's
    train_s / alignkit's model_s is the ceiling of the speed-up: what alignkit would show if
    everything outside forward and backward took no time and the model's work stayed as it is.
    """

    def __init__(self):
        self.seconds = 0.0
        self.active = False

    def install(self, lib: str) -> None:
        """Patch the decoder, backward and `lib`'s evaluation only (importing the other library's
        trainer would add its modules to this child's peak memory)."""
        import torch
        from transformers.models.llama import modeling_llama

        modeling_llama.LlamaModel.forward = self._timed(modeling_llama.LlamaModel.forward)
        torch.Tensor.backward = self._timed(torch.Tensor.backward)
        if lib == "alignkit":
            sys.path.insert(0, str(ROOT))
            from alignkit.train import loop

            loop.evaluate = self._paused(loop.evaluate)
        else:
            from transformers import Trainer

            Trainer.evaluate = self._paused(Trainer.evaluate)

    def _timed(self, fn):
        @functools.wraps(fn)
        def timed(*a, **k):
            if not self.active:
                return fn(*a, **k)
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.seconds += time.perf_counter() - start
        return timed

    def _paused(self, fn):
        @functools.wraps(fn)
        def paused(*a, **k):
            was, self.active = self.active, False
            try:
                return fn(*a, **k)
            finally:
                self.active = was
        return paused

    @contextlib.contextmanager
    def counting(self):
        self.active = True
        try:
            yield
        finally:
            self.active = False


MODEL_CLOCK = ModelClock()


def child_main(args, children: dict[str, Callable]) -> None:
    """The `--child LIB` side of a script: torch threads, the run (its training inside
    MODEL_CLOCK.counting()), peak memory, one JSON line on stdout."""
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    MODEL_CLOCK.install(args.child)
    out = children[args.child](Path(args.work), args)
    out["model_s"] = MODEL_CLOCK.seconds
    out["threads"] = torch.get_num_threads()
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


def alternate(script: str, argv: list[str], repeats: int, threads: int) -> dict[str, list[dict]]:
    """`repeats` rounds of one alignkit run then one TRL run, each in a fresh interpreter, so drift
    in machine load hits both. A TRL child that returns {"unavailable": reason} (TRL has no such
    trainer) or fails (its error's last line becomes the reason) is not run again; a failing
    alignkit child raises."""
    runs: dict[str, list[dict]] = {lib: [] for lib in LIBS}
    for _ in range(repeats):
        for lib in LIBS:
            if runs[lib] and "unavailable" in runs[lib][0]:
                continue
            try:
                runs[lib].append(run_child(script, ["--child", lib, *argv], lib, threads=threads))
            except RuntimeError as e:
                if lib == "alignkit":
                    raise
                runs[lib] = [{"unavailable": "the TRL run failed: " + str(e).strip().splitlines()[-1]}]
    return runs


def summarise(rs: list[dict], units: float, rate_key: str) -> dict:
    """One library's runs: `rate_key` = units / median train seconds, job rate, peak memory over the
    runs, and the seconds of training inside the model's forward and backward (ModelClock)."""
    train_s = statistics.median(r["train_s"] for r in rs)
    return {
        rate_key: round(units / train_s, 3),
        "train_s": [round(r["train_s"], 3) for r in rs],
        "model_s": [round(r["model_s"], 3) for r in rs],
        f"job_{rate_key}": round(units / statistics.median(r["job_s"] for r in rs), 3),
        "peak_rss_mb": round(max(r["peak_rss_mb"] for r in rs), 1),
    }


def side_by_side(case: dict, runs: dict[str, list[dict]], rate_key: str, summary: Callable[[str, list[dict]], dict]) -> dict:
    """case["alignkit"], case["trl"] (None with case["reason"] when TRL has no such trainer), speedup, memory
    ratio, and the ceiling of the speed-up: TRL's median train_s / alignkit's median model_s (ModelClock)."""
    for lib, rs in runs.items():
        if rs and "unavailable" in rs[0]:
            case[lib], case["reason"] = None, f"{lib}: {rs[0]['unavailable']}"
        else:
            case[lib] = summary(lib, rs)
    if case["alignkit"] and case["trl"]:
        case["speedup"] = round(case["alignkit"][rate_key] / case["trl"][rate_key], 3)
        case["memory_ratio"] = round(case["alignkit"]["peak_rss_mb"] / case["trl"]["peak_rss_mb"], 3)
        case["ceiling"] = round(statistics.median(case["trl"]["train_s"]) / statistics.median(case["alignkit"]["model_s"]), 3)
    else:
        case["speedup"] = case["memory_ratio"] = case["ceiling"] = None
    return case


def matmul_flops(sizes=(1024, 1536, 2048), repeats: int = 3) -> dict:
    """Float32 torch.mm FLOP/s on this process's torch threads: 2 n^3 / seconds, best of `repeats` per size."""
    import torch

    by_size = {}
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - start)
        by_size[str(n)] = 2 * n**3 / best
    return {"best_flops": max(by_size.values()), "by_size": by_size, "threads": torch.get_num_threads()}


def mfu(params: int, tokens: float, train_s: float, peak_flops: float) -> float:
    """Model-FLOPs utilisation: 6 N T (forward + backward of N parameters over T tokens) / seconds / peak."""
    return 6 * params * tokens / train_s / peak_flops
