"""A tiny model factory: a BPE tokenizer trained with `tokenizers` and a small Llama.

Both are ordinary Hugging Face objects saved with `save_pretrained`, so what this
builds loads back with `AutoTokenizer` / `AutoModelForCausalLM` unchanged (the saved
tokenizer carries alignkit's PLAIN chat template):

    tok = train_tokenizer(texts, vocab_size=512)
    model = build_tiny_llama(tok, hidden_size=64, num_layers=2, num_heads=4)
    save_tiny(model, tok, "runs/tiny-init")
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

BOS, EOS, PAD = "<s>", "</s>", "<pad>"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts`.

    Byte-level means every string round-trips (no unknown token). The special tokens
    are `<pad>` (id 0), `<s>` (BOS, prepended when special tokens are added, as Llama's
    tokenizer does) and `</s>` (EOS); pad is distinct from EOS so that padding masks
    never hide the end-of-sequence token the model must learn.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    # Like Llama's tokenizer: BOS is added when special tokens are asked for, EOS never.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, tokenizer.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        padding_side="right",
    )


def build_tiny_llama(
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 512,
    tie_word_embeddings: bool = True,
    seed: int = 0,
) -> LlamaForCausalLM:
    """A randomly initialised Llama sized by the arguments, vocabulary from `tokenizer`."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def save_tiny(model, tokenizer, path: str | Path) -> Path:
    """Save model and tokenizer side by side as one `save_pretrained` directory.

    The saved tokenizer carries a chat template: its own, or else alignkit's PLAIN one
    (`alignkit.data.chat.plain_chat_template`), so plain transformers renders message
    lists as alignkit does. `tokenizer` itself is not changed.
    """
    from alignkit.data.chat import ensure_chat_template

    path = Path(path)
    model.save_pretrained(path)
    if not getattr(tokenizer, "chat_template", None):
        tokenizer = ensure_chat_template(copy.deepcopy(tokenizer))
    tokenizer.save_pretrained(path)
    return path
