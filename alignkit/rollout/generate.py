"""Batched generation through `model.generate` (left padding, KV cache)."""

from __future__ import annotations

import torch


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 64,
             temperature: float = 0.0) -> list[dict]:
    """Complete each prompt; temperature 0 is greedy decoding.

    Returns one dict per prompt: `text` (decoded completion, special tokens removed),
    `token_ids` (the sampled ids, kept because decode -> re-encode need not round-trip)
    and `ended` (True when the model emitted EOS before the length limit).
    """
    was_training = model.training
    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    device = next(model.parameters()).device
    results = []
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True).to(device)
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=temperature > 0,
                temperature=temperature if temperature > 0 else None,
                top_k=None, top_p=None,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            for row in out[:, enc["input_ids"].shape[1] :].tolist():
                ended = tokenizer.eos_token_id in row
                ids = row[: row.index(tokenizer.eos_token_id)] if ended else row
                results.append({"text": tokenizer.decode(ids, skip_special_tokens=True), "token_ids": ids, "ended": ended})
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return results
