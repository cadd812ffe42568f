"""Supervised fine-tuning: next-token loss on the response tokens only.

    alignkit sft --model runs/base --data sft.jsonl --max_steps 200
    python -m alignkit sft --config run.yaml --lr 5e-5

Data: `prompt` + `completion`, or `messages` (the last one the assistant's). In a
conversation the loss covers every assistant message (`assistant_only_loss`, on by
default; off: the last one only), rendered with the tokenizer's chat template or the one
`chat_template` names, which is saved with the model:

    alignkit sft --model runs/base --data chats.jsonl --chat_template chatml

Everything before the last assistant message is left-truncated first when an example
exceeds `max_length`, and every truncation is counted in the report.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from alignkit.config import require
from alignkit.train.common import lm_count, lm_step, load_train_eval, print_summary, say
from alignkit.train.loop import TrainConfig, TrainResult, load_trainable_model, resolve_resume, train


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning on prompt/completion or messages data."""

    lr: float = 2e-4
    """Peak learning rate (AdamW)."""
    packing: bool = False
    """Pack several examples into each row of max_length tokens (attention kept within each example)."""
    assistant_only_loss: bool = True
    """Conversations: the loss covers every assistant message (its content and the end-of-turn text the chat
    template writes with it; of `prompt`/`completion` lists, the completion's) and nothing else; off: the last
    message only (the whole completion). On by default: TRL trains every assistant turn however its own key is
    set, and a conversation with one assistant message gets the same example either way (unless the tokenizer
    merges text across that message's edge into one token)."""
    chat_template: str = ""
    """Chat template for message data, saved with the model: a bundled name (plain, chatml) or a .jinja
    file (empty: the tokenizer's own, or plain when it has none)."""


def run(cfg: SFTConfig) -> TrainResult:
    from alignkit.data import pack_examples, pad_batch, tokenize_sft
    from alignkit.data.chat import attach_chat_template, load_chat_template
    from alignkit.models.load import load_tokenizer

    require(cfg, "model", "data")
    template = load_chat_template(cfg.chat_template) if cfg.chat_template else None  # a bad name fails before data loads
    train_records, eval_records = load_train_eval(cfg, "sft")
    resume_from = resolve_resume(cfg)
    tokenizer = load_tokenizer(str(resume_from) if resume_from else cfg.model)
    if template is not None:  # before tokenizing; `train` saves the tokenizer, template included
        attach_chat_template(tokenizer, template, cfg.chat_template)
    examples, report = tokenize_sft(train_records, tokenizer, cfg.max_length, cfg.truncation, cfg.assistant_only_loss)
    report.check_not_all_truncated(cfg.data, cfg.max_length)
    model = load_trainable_model(cfg, resume_from)
    eval_examples, eval_report = tokenize_sft(eval_records, tokenizer, cfg.max_length, cfg.truncation,
                                              cfg.assistant_only_loss)
    rows = f"{len(examples)} examples"
    if cfg.packing:
        examples = pack_examples(examples, cfg.max_length)
        rows += f" packed into {len(examples)} rows of <= {cfg.max_length} tokens"
    say(f"sft: {rows}; {report}")
    result = train(
        cfg, model, tokenizer, examples, lm_step, lm_count,
        lambda b: pad_batch(b, tokenizer.pad_token_id), name="sft",
        eval_examples=eval_examples, resume_from=resume_from,
    )
    print_summary("sft", result, [str(report)] + ([f"eval {eval_report}"] if eval_records else []))
    return result


def main(argv: list[str] | None = None) -> TrainResult:
    from alignkit.config import parse_config

    return run(parse_config(SFTConfig, sys.argv[1:] if argv is None else argv, prog="alignkit sft"))
