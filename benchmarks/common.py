"""Shared by the benchmark scripts: TRL's private install, the tiny-Llama fixture, child runs.

TRL is installed with `pip install --no-deps --target benchmarks/.trl` (its other
requirements are already alignkit's), never into the project environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TRL_DIR = HERE / ".trl"
TRL_VERSION = "1.16.0"


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
    from alignkit.models.tiny import build_tiny_llama, save_tiny, train_tokenizer

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
