"""What the `compile` key buys: `alignkit sft` with and without torch.compile on the same data, model
and seed, each in a fresh process, one after the other. Prints JSON: the training tokens per second of
the last logging window (after compilation), the first window's (compilation included), the whole
run's wall time and the final loss of each.

    .venv/bin/python benchmarks/compile_step.py [--hidden 256 --layers 4 --length 256 --steps 40]

A random Llama with a 1,024-token BPE vocabulary trained on arithmetic text, every row padded to the
same length so that the compiled graph is reused (rows of new lengths recompile).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--length", type=int, default=256, help="tokens per row")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from alignkit.models.tiny import build_tiny_llama, save_tiny, train_tokenizer

    work = Path(tempfile.mkdtemp(prefix="compile_bench"))
    texts = [f"What is {a}+{b}? The answer is {a + b}." for a in range(60) for b in range(60)]
    tokenizer = train_tokenizer(texts, vocab_size=1024)
    model = build_tiny_llama(tokenizer, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.hidden // 64,
                             max_position_embeddings=args.length)
    save_tiny(model, tokenizer, work / "model")
    n_params = sum(p.numel() for p in model.parameters())
    # one fixed length: every row is a block of arithmetic text cut to `length` tokens (packing)
    with (work / "text.jsonl").open("w") as f:
        for i in range(args.batch * args.steps):
            f.write(json.dumps({"text": " ".join(texts[(i * 97 + j) % len(texts)] for j in range(40))}) + "\n")
    results = {"parameters": n_params, "rows": f"{args.batch} x {args.length} tokens", "steps": args.steps}
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    for compile_ in (False, True):
        out = work / ("compiled" if compile_ else "eager")
        cmd = [sys.executable, "-m", "alignkit", "pretrain", "--model", str(work / "model"), "--data",
               str(work / "text.jsonl"), "--max_length", str(args.length), "--batch_size", str(args.batch),
               "--max_steps", str(args.steps), "--log_steps", str(args.steps // 4), "--eval_fraction", "0",
               "--lr", "1e-3", "--output_dir", str(out), "--compile" if compile_ else "--no-compile"]
        start = time.perf_counter()
        subprocess.run(cmd, env=env, cwd=ROOT, check=True, capture_output=True, text=True)
        wall = time.perf_counter() - start
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        rows = [r for r in rows if "train/tokens_per_s" in r]
        results["compiled" if compile_ else "eager"] = {
            "wall_s": round(wall, 1), "first_window_tokens_per_s": round(rows[0]["train/tokens_per_s"]),
            "last_window_tokens_per_s": round(rows[-1]["train/tokens_per_s"]), "final_loss": rows[-1]["train/loss"]}
    results["speedup_after_compilation"] = round(results["compiled"]["last_window_tokens_per_s"]
                                                 / results["eager"]["last_window_tokens_per_s"], 3)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
