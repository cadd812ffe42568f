"""The recipe as stages with cached outputs: `alignkit demo`.

    alignkit demo                 # pretrain a tiny Llama on a generated corpus, then SFT it
    alignkit demo --quick         # the same, smaller (what the tests run)

Each stage writes its own folder under `output_dir` and is skipped when that folder
already holds a saved model, so an interrupted demo resumes where it stopped.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal


@dataclass
class DemoConfig:
    """The built-in recipe on a generated task, end to end on a CPU."""

    task: Literal["arithmetic"] = "arithmetic"
    """Built-in task."""
    output_dir: str = "runs/demo"
    """Run directory; each stage writes a subfolder."""
    quick: bool = False
    """A smaller, faster run (what the tests use)."""
    seed: int = 0
    """Seed for data, initialisation and training."""


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def _done(stage_dir: Path) -> bool:
    return (stage_dir / "config.json").exists() and any(stage_dir.glob("*.safetensors"))


def evaluate_format(model_dir: Path, records: list[dict], max_new_tokens: int = 8) -> dict[str, float]:
    """Greedy completions of held-out arithmetic prompts: format-following, accuracy, EOS rate."""
    from alignkit.data import pad_batch, tokenize_prompts
    from alignkit.models.load import load_causal_lm, load_tokenizer
    from alignkit.rollout.sampler import sample
    from alignkit.tasks import arithmetic

    model, tokenizer = load_causal_lm(str(model_dir)), load_tokenizer(str(model_dir))
    examples, _ = tokenize_prompts([{"prompt": r["prompt"]} for r in records], tokenizer, max_length=256)
    batch = pad_batch(examples, tokenizer.pad_token_id, side="left")
    rollout = sample(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=max_new_tokens,
                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, temperature=0.0)
    ids = rollout.completion_ids.masked_fill(rollout.completion_mask == 0, tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
    ended = rollout.ended.tolist()
    scores = [arithmetic.score(t, r["answer"]) for t, r in zip(texts, records)]
    n = len(records)
    return {
        "follows_format": sum(s["follows_format"] and e for s, e in zip(scores, ended)) / n,
        "correct": sum(s["correct"] and e for s, e in zip(scores, ended)) / n,
        "ends_with_eos": sum(ended) / n,
        "examples": [(r["prompt"], t) for r, t in zip(records[:3], texts[:3])],
    }


def run_demo(cfg: DemoConfig) -> dict:
    from alignkit.tasks import arithmetic
    from alignkit.train import pretrain, sft

    start = time.perf_counter()
    root = Path(cfg.output_dir)
    n_corpus, n_sft, pre_steps, sft_steps = (1500, 400, 150, 60) if cfg.quick else (6000, 2000, 600, 200)
    corpus = _write_jsonl(root / "data/corpus.jsonl", arithmetic.corpus(n_corpus, seed=cfg.seed))
    sft_records = arithmetic.sft_data(n_sft + 100, seed=cfg.seed + 1)
    sft_train = _write_jsonl(root / "data/sft.jsonl", sft_records[:n_sft])
    sft_eval = _write_jsonl(root / "data/sft_eval.jsonl", sft_records[n_sft:])
    summary: dict = {}

    base = root / "base"
    if _done(base):
        print(f"[1/3] pretrain: {base} exists, skipped")
    else:
        print("[1/3] pretrain a tiny Llama on the generated corpus")
        result = pretrain.run(pretrain.PretrainConfig(
            data=str(corpus), output_dir=str(base), max_steps=pre_steps, batch_size=16, max_length=64,
            lr=3e-3, tiny_vocab_size=384, tiny_hidden_size=64, tiny_layers=2, tiny_heads=4,
            log_steps=25, seed=cfg.seed,
        ))
        first = next(h for h in result.history if "train/loss" in h)
        summary["pretrain"] = {"first_train_loss": first["train/loss"], **result.eval_metrics}

    tuned = root / "sft"
    if _done(tuned):
        print(f"[2/3] sft: {tuned} exists, skipped")
    else:
        print("[2/3] supervised fine-tuning on question/answer pairs")
        result = sft.run(sft.SFTConfig(
            model=str(base), data=str(sft_train), eval_data=str(sft_eval), output_dir=str(tuned),
            max_steps=sft_steps, batch_size=16, max_length=64, lr=2e-3, log_steps=20, seed=cfg.seed,
        ))
        summary["sft"] = dict(result.eval_metrics)

    print("[3/3] greedy completions of held-out prompts, base vs SFT")
    held_out = sft_records[n_sft:]
    summary["base_format"] = evaluate_format(base, held_out)
    summary["sft_format"] = evaluate_format(tuned, held_out)
    summary["seconds"] = time.perf_counter() - start

    lines = ["", "== demo summary ==", f"run directory: {root}"]
    if "pretrain" in summary:
        p = summary["pretrain"]
        lines.append(f"pretrain: train loss {p['first_train_loss']:.3f} at first log -> held-out loss {p['loss']:.3f} (perplexity {p['perplexity']:.2f})")
    if "sft" in summary:
        lines.append(f"sft: held-out response loss {summary['sft']['loss']:.3f}, token accuracy {summary['sft']['accuracy']:.3f}")
    for name in ("base", "sft"):
        s = summary[f"{name}_format"]
        lines.append(f"{name:>4}: follows the answer format {s['follows_format']:.0%}, correct {s['correct']:.0%}, ends with EOS {s['ends_with_eos']:.0%}")
    prompt, completion = summary["sft_format"]["examples"][0]
    lines.append(f"example: {prompt!r} -> {completion!r}")
    lines.append(f"checkpoints: {base} (base), {tuned} (sft); took {summary['seconds']:.0f} s")
    print("\n".join(lines), flush=True)
    return summary


def main(argv: list[str] | None = None) -> dict:
    from alignkit.config import parse_config

    return run_demo(parse_config(DemoConfig, sys.argv[1:] if argv is None else argv, prog="alignkit demo"))
