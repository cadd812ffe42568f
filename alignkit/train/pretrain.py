"""Pretraining: next-token loss on raw text, packed into fixed-length blocks.

    alignkit pretrain --data corpus.jsonl --model tiny --max_length 128 --max_steps 500
    python -m alignkit pretrain --config run.yaml --lr 3e-4

`model: tiny` builds a fresh BPE tokenizer (trained on the training text) and a
small Llama sized by the `tiny_*` keys; any other value continues training an
existing model directory or Hub id. Packed blocks are not masked between
documents (as in nanoGPT): an EOS separates them and the model learns to reset.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from alignkit.train.common import lm_count, lm_step, load_train_eval, print_summary, say
from alignkit.train.loop import TrainConfig, TrainResult, load_trainable_model, resolve_resume, train


@dataclass
class PretrainConfig(TrainConfig):
    """Causal language modelling on raw text (`text` field)."""

    lr: float = 1e-3
    """Peak learning rate (AdamW)."""
    max_length: int = 128
    """Block length of the packed token stream."""
    packing: bool = True
    """Concatenate documents (EOS between them) and cut blocks of max_length; else one document per example."""
    eval_fraction: float = 0.05
    """Fraction of `data` held out for evaluation when `eval_data` is empty."""
    model: str = "tiny"
    """'tiny' = a new tokenizer and Llama built from the tiny_* keys; else a model path or Hub id."""
    tiny_vocab_size: int = 1024
    """Tokenizer vocabulary size for model=tiny."""
    tiny_hidden_size: int = 128
    """Hidden size for model=tiny."""
    tiny_layers: int = 4
    """Transformer blocks for model=tiny."""
    tiny_heads: int = 4
    """Attention heads for model=tiny."""
    truncation: Literal["left", "error"] = "left"
    """With packing false, an over-long document loses its end (left: counted) or stops the run naming it (error)."""

    def validate(self) -> None:
        from alignkit.config import ConfigError

        super().validate()
        if self.packing and self.truncation == "error":  # packed blocks are never over-long: the key would do nothing
            raise ConfigError("truncation error applies to packing false (packed blocks are cut to max_length by design)")


def perplexity(metrics: dict[str, float]) -> dict[str, float]:
    return {"perplexity": math.exp(min(metrics["loss"], 50.0))}


def run(cfg: PretrainConfig) -> TrainResult:
    from alignkit.data import pad_batch, tokenize_text
    from alignkit.models.load import load_tokenizer
    from alignkit.models.tiny import build_tiny_llama, save_tiny, train_tokenizer

    train_records, eval_records = load_train_eval(cfg, "text")
    resume_from = resolve_resume(cfg)
    if cfg.model == "tiny":
        init_dir = Path(cfg.output_dir) / "init"
        if resume_from is None:
            tokenizer = train_tokenizer((r["text"] for r in train_records), cfg.tiny_vocab_size)
            init = build_tiny_llama(tokenizer, cfg.tiny_hidden_size, cfg.tiny_layers, cfg.tiny_heads,
                                    max_position_embeddings=max(cfg.max_length, 128), seed=cfg.seed)
            save_tiny(init, tokenizer, init_dir)
        # a resumed run names the same init/ as the run it continues (resume compares configs)
        cfg = replace(cfg, model=str(init_dir))
    tokenizer = load_tokenizer(str(resume_from) if resume_from else cfg.model)
    model = load_trainable_model(cfg, resume_from)

    examples, report = tokenize_text(train_records, tokenizer, cfg.max_length, cfg.packing, cfg.truncation)
    report.check_not_all_truncated(cfg.data, cfg.max_length)
    eval_examples, _ = tokenize_text(eval_records, tokenizer, cfg.max_length, cfg.packing, cfg.truncation)
    n_params = sum(p.numel() for p in model.parameters())
    say(f"pretrain: {n_params / 1e6:.2f}M parameters, {len(examples)} blocks of <= {cfg.max_length} tokens; {report}")
    result = train(
        cfg, model, tokenizer, examples, lm_step, lm_count,
        lambda b: pad_batch(b, tokenizer.pad_token_id), name="pretrain",
        eval_examples=eval_examples, resume_from=resume_from, derived_metrics=perplexity,
    )
    print_summary("pretrain", result, [str(report)])
    return result


def main(argv: list[str] | None = None) -> TrainResult:
    from alignkit.config import parse_config

    return run(parse_config(PretrainConfig, sys.argv[1:] if argv is None else argv, prog="alignkit pretrain"))
