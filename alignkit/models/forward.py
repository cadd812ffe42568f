"""The one forward pass every trainer uses: per-token log-probs of a padded batch."""

from __future__ import annotations

import torch

from alignkit.ops import masked_sum, token_logprobs


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """positions_t = (sum_{s<=t} mask_s) - 1, clamped at 0: [B, T] -> [B, T].

    With left padding the first real token gets position 0, exactly as if the row had
    been run alone; with right padding this equals arange(T) on the real tokens.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def forward_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float = 1.0,
                     position_ids: torch.Tensor | None = None, columns: torch.Tensor | None = None):
    """log pi(x_t | x_<t) for t = 1..T-1 of a padded batch, and the logits.

    Shapes: input_ids, attention_mask [B, T] -> logprobs [B, T-1] (aligned with
    input_ids[:, 1:]), logits [B, T-1, V]. Logits are divided by `temperature`, so a
    sampler and a learner using the same temperature agree on every log-prob.
    Packed rows pass `position_ids` that restart at 0 for each example; the model then
    gets no attention mask and builds a block-diagonal causal one from the positions.
    `columns` (1-D, ascending, < T-1) keeps only those target positions: the model's
    head runs on them alone (`logits_to_keep`), and the outputs are [B, len(columns)].
    """
    if position_ids is None:
        position_ids, mask = position_ids_from_mask(attention_mask), attention_mask
    else:
        mask = None
    if columns is None:
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False)
        logits, targets = out.logits[:, :-1], input_ids[:, 1:]
    else:
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False,
                    logits_to_keep=columns)
        logits, targets = out.logits, input_ids[:, columns + 1]
    if temperature != 1.0:
        logits = logits / temperature
    return token_logprobs(logits, targets), logits


def sequence_logprobs(model, batch: dict, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(y | x) = sum_t m_t log pi(x_t | x_<t) per row, and the token count sum_t m_t.

    batch: input_ids, attention_mask, loss_mask [N, T] (m = loss_mask shifted to the
    targets) -> ([N] float32, [N]). With one forward pass for all rows, chosen and
    rejected responses share it. The output head runs only on columns where some row
    has a response token (prompts are mostly skipped: less compute, smaller logits).
    """
    mask = batch["loss_mask"][:, 1:]
    columns = mask.any(0).nonzero().squeeze(-1)
    logprobs, _ = forward_logprobs(model, batch["input_ids"], batch["attention_mask"], temperature,
                                   position_ids=batch.get("position_ids"), columns=columns)
    return masked_sum(logprobs, mask[:, columns], dim=-1), mask.sum(-1)
