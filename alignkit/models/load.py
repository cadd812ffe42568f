"""Load any causal LM and its tokenizer by local path or Hub id, optionally with LoRA."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(path: str):
    """`AutoTokenizer.from_pretrained(path)`, with a pad token guaranteed.

    A tokenizer without a pad token gets EOS as pad. That is safe here because every
    alignkit mask is built from sequence lengths, never from `input_ids != pad_id`, so
    the EOS that ends a completion is still trained on.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"{path}: tokenizer has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path: str, dtype: str = "float32", device: str | torch.device | None = None):
    """`AutoModelForCausalLM.from_pretrained` with a dtype name ("auto", "float32", "bfloat16", "float16").

    Training keeps float32 master weights by default; mixed precision comes from the
    accelerator's autocast, not from the stored dtype.
    """
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"dtype '{dtype}' is not one of {sorted(DTYPES)}")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    return model.to(device) if device is not None else model


def apply_lora(model, r: int, alpha: float | None = None, dropout: float = 0.0, target_modules="all-linear"):
    """Wrap `model` with LoRA adapters of rank `r` (scaling alpha / r; alpha defaults to 2r).

    With LoRA the reference model is this same model with its adapters disabled
    (`with model.disable_adapter(): ...`), so no second copy is held in memory.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r,
        lora_alpha=alpha if alpha is not None else 2 * r,
        lora_dropout=dropout,
        target_modules=target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)
