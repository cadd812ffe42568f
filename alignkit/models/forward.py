"""The one forward pass every trainer uses: per-token log-probs of a padded batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignkit.ops import entropy_from_logits, masked_sum, token_logprobs
from alignkit.ops.chunked_head import chunked_head

CHUNKED_HEAD = "auto"
"""How `token_stats` runs the output head: "on" in chunks of tokens (alignkit.ops.chunked_head: the
logits are never held for the whole batch), "off" the full logits, "auto" chunks when the batch's
logits would exceed AUTO_ELEMENTS. Set from a run's `chunked_head` key by the training loop."""
AUTO_ELEMENTS = 1 << 28
"""Logits (1 GiB in float32) above which "auto" chunks: the chunked backward recomputes each chunk's
logits (one more head matmul: 0.76-0.93x the full path's step time at a 128k vocabulary,
benchmarks/chunked_head.py), so below this the full path, faster, is kept."""


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """positions_t = (sum_{s<=t} mask_s) - 1, clamped at 0: [B, T] -> [B, T].

    With left padding the first real token gets position 0, exactly as if the row had
    been run alone; with right padding this equals arange(T) on the real tokens.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def forward_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float = 1.0,
                     position_ids: torch.Tensor | None = None, columns: torch.Tensor | None = None,
                     with_hidden: bool = False):
    """log pi(x_t | x_<t) for t = 1..T-1 of a padded batch, and the logits.

    Shapes: input_ids, attention_mask [B, T] -> logprobs [B, T-1] (aligned with
    input_ids[:, 1:]), logits [B, T-1, V]. Logits are divided by `temperature`, so a
    sampler and a learner using the same temperature agree on every log-prob.
    Packed rows pass `position_ids` that restart at 0 for each example; the model then
    gets no attention mask and builds a block-diagonal causal one from the positions.
    `columns` (1-D, ascending, < T-1) keeps only those target positions: the model's
    head runs on them alone (`logits_to_keep`), and the outputs are [B, len(columns)].
    `with_hidden` also returns the last hidden state (after the final norm) at the same
    positions, [B, len(columns) or T-1, H]: a value head on the policy's backbone reads it.
    """
    if position_ids is None:
        position_ids, mask = position_ids_from_mask(attention_mask), attention_mask
    else:
        mask = None
    extra = {"output_hidden_states": True} if with_hidden else {}
    if columns is None:
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False, **extra)
        logits, targets = out.logits[:, :-1], input_ids[:, 1:]
    else:
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False,
                    logits_to_keep=columns, **extra)
        logits, targets = out.logits, input_ids[:, columns + 1]
    if temperature != 1.0:
        logits = logits / temperature
    if with_hidden:
        hidden = out.hidden_states[-1]
        return token_logprobs(logits, targets), logits, hidden[:, :-1] if columns is None else hidden[:, columns]
    return token_logprobs(logits, targets), logits


@dataclass
class TokenStats:
    """Per-target-token outputs of `token_stats`, each [B, C] (hidden [B, C, H])."""

    logprobs: torch.Tensor
    entropy: torch.Tensor | None
    argmax: torch.Tensor
    hidden: torch.Tensor | None


def plain_head(model) -> torch.nn.Linear | None:
    """The output head when the logits are exactly head(last hidden state): a plain nn.Linear
    (not a LoRA-wrapped one) and no logit soft-capping or scaling in the config; else None."""
    inner = getattr(model, "module", model)  # DDP
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    config = getattr(inner, "config", None)
    if type(head) is not torch.nn.Linear or config is None:
        return None
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", 1.0) not in (None, 1.0):
        return None
    return head


def uses_chunked_head(model, rows: int) -> bool:
    """Whether `token_stats` chunks the head for `rows` target tokens (see CHUNKED_HEAD)."""
    head = plain_head(model)
    if head is None or CHUNKED_HEAD == "off":
        return False
    return CHUNKED_HEAD == "on" or rows * head.weight.shape[0] > AUTO_ELEMENTS


def token_stats(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float = 1.0,
                position_ids: torch.Tensor | None = None, columns: torch.Tensor | None = None,
                entropy: bool = False, with_hidden: bool = False) -> TokenStats:
    """`forward_logprobs`' log-probs (same shapes, same arguments), the entropy of each predicted
    distribution (with `entropy`), its argmax and, `with_hidden`, the last hidden state; without
    the [B, C, V] logits when the head runs in chunks (CHUNKED_HEAD). Values and gradients are
    those of the full path (tests/ops/test_chunked_head.py)."""
    rows = input_ids.shape[0] * (len(columns) if columns is not None else input_ids.shape[1] - 1)
    if not uses_chunked_head(model, rows):
        lp, logits, *hidden = forward_logprobs(model, input_ids, attention_mask, temperature, position_ids, columns,
                                               with_hidden)
        return TokenStats(lp, entropy_from_logits(logits) if entropy else None, logits.argmax(-1),
                          hidden[0] if hidden else None)
    if position_ids is None:
        position_ids, mask = position_ids_from_mask(attention_mask), attention_mask
    else:
        mask = None
    none = torch.empty(0, dtype=torch.long, device=input_ids.device)  # the model's own head runs on no column
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False,
                output_hidden_states=True, logits_to_keep=none)
    hidden = out.hidden_states[-1]
    if columns is None:
        hidden, targets = hidden[:, :-1], input_ids[:, 1:]
    else:
        hidden, targets = hidden[:, columns], input_ids[:, columns + 1]
    head = plain_head(model)
    lp, ent, argmax = chunked_head(hidden, head.weight, targets, head.bias, temperature, entropy=entropy)
    return TokenStats(lp, ent, argmax, hidden if with_hidden else None)


def sequence_logprobs(model, batch: dict, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(y | x) = sum_t m_t log pi(x_t | x_<t) per row, and the token count sum_t m_t.

    batch: input_ids, attention_mask, loss_mask [N, T] (m = loss_mask shifted to the
    targets) -> ([N] float32, [N]). With one forward pass for all rows, chosen and
    rejected responses share it. The output head runs only on columns where some row
    has a response token (prompts are mostly skipped: less compute, smaller logits).
    A batch from `pad_shared_prompt` (it has `segment_ids`) goes to `shared_prompt_logprobs`.
    """
    if "segment_ids" in batch:
        return shared_prompt_logprobs(model, batch, temperature)
    mask = batch["loss_mask"][:, 1:]
    columns = mask.any(0).nonzero().squeeze(-1)
    logprobs = token_stats(model, batch["input_ids"], batch["attention_mask"], temperature,
                           position_ids=batch.get("position_ids"), columns=columns).logprobs
    return masked_sum(logprobs, mask[:, columns], dim=-1), mask.sum(-1)


def shared_prompt_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """allowed[b, 0, q, k] = (k <= q and s_k >= 0 and (s_k == 0 or s_k == s_q)) or k == q,
    for query column q and key column k of row b, with s = segment_ids[b].

    segment_ids [B, T]: -1 pad, 0 prompt, j >= 1 response j -> bool [B, 1, T, T]. The
    prompt is causal; a response sees the whole prompt and its own earlier tokens, never
    another response. A pad sees only itself: a query that sees nothing would give NaN.
    """
    q, k = segment_ids[:, :, None], segment_ids[:, None, :]
    width = segment_ids.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = causal & (k >= 0) & ((k == 0) | (k == q))
    return (allowed | torch.eye(width, dtype=torch.bool, device=segment_ids.device))[:, None]


def _model_mask(allowed: torch.Tensor, model) -> torch.Tensor:
    """A 4-D mask in the form the model's attention adds or applies as is.

    transformers hands a 4-D mask to the attention function untouched: sdpa takes the
    boolean (True = attend), eager ADDS the mask to the scores, so it gets 0 / dtype-min.
    """
    config = getattr(model, "module", model).config
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if impl == "sdpa":
        return allowed
    if impl == "eager":
        dtype = next(getattr(model, "module", model).parameters()).dtype
        blocked = torch.full(allowed.shape, torch.finfo(dtype).min, dtype=dtype, device=allowed.device)
        return blocked.masked_fill(allowed, 0.0)
    raise ValueError(f"a shared-prompt batch needs a custom 4-D attention mask, which '{impl}' attention "
                     "does not take: use sdpa or eager attention, or set share_prompt=false")


def _picked_logprobs(logits: torch.Tensor, index: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits[b, index_bt])[labels_bt]: logits [B, K, V], index, labels [B, N] -> [B, N] float32.

    The log-normaliser is computed once per kept column, although one column may predict
    several targets (the last prompt token predicts the first token of every response).
    Low-precision logits are upcast one row at a time, as in `token_logprobs`.
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        lse = torch.stack([torch.logsumexp(row.float(), -1) for row in logits])
    else:
        lse = torch.logsumexp(logits, -1)
    rows = torch.arange(logits.shape[0], device=logits.device)[:, None]
    return logits[rows, index, labels].float() - lse.gather(1, index)


def _shared_prompt_targets(model, batch: dict, temperature: float, entropy: bool = False):
    """The forward of a `pad_shared_prompt` batch: (log-probs [B, N], entropies [B, N] or None,
    the target columns [N], their loss mask [B, N] and segment ids [B, N]) at the N columns that
    hold some row's response token. Column c's token is predicted from column sources[b, c]."""
    ids, mask, segments = batch["input_ids"], batch["loss_mask"].bool(), batch["segment_ids"]
    targets = mask.any(0).nonzero().squeeze(-1)  # columns holding some row's response token
    mask, segments = mask[:, targets], segments[:, targets]
    sources = batch["sources"][:, targets].clamp(min=0)  # -1 (nothing predicts it) only where mask is 0
    keep = sources[mask].unique()  # sorted: the columns whose logits are needed
    attention = _model_mask(shared_prompt_mask(batch["segment_ids"]), model)
    ent = None
    if uses_chunked_head(model, ids.shape[0] * len(targets)):
        # the head in chunks on each target's source column: the last prompt column's hidden state
        # is read once per response (K rows of H numbers), never a [B, N, V] block of logits
        none = torch.empty(0, dtype=torch.long, device=ids.device)
        out = model(input_ids=ids, attention_mask=attention, position_ids=batch["position_ids"], use_cache=False,
                    output_hidden_states=True, logits_to_keep=none)
        hidden = out.hidden_states[-1].gather(1, sources[:, :, None].expand(-1, -1, out.hidden_states[-1].shape[-1]))
        head = plain_head(model)
        logprobs, ent, _ = chunked_head(hidden, head.weight, ids[:, targets], head.bias, temperature, entropy=entropy)
    else:
        out = model(input_ids=ids, attention_mask=attention, position_ids=batch["position_ids"], use_cache=False,
                    logits_to_keep=keep)
        logits = out.logits if temperature == 1.0 else out.logits / temperature
        index = torch.searchsorted(keep, sources).clamp(max=len(keep) - 1)  # out of range only where mask is 0
        logprobs = _picked_logprobs(logits, index, ids[:, targets])  # [B, N]
        if entropy:
            ent = entropy_from_logits(logits).gather(1, index)
    return logprobs, ent, targets, mask, segments


def shared_prompt_logprobs(model, batch: dict, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """`sequence_logprobs` of a batch laid out by `pad_shared_prompt`: one row per prompt.

    Row b is [prompt | response 1 | ... | response K] with `segment_ids`, `position_ids`
    (every response continues the prompt's positions) and `sources` [B, T]: the column whose
    logits predict each column's token, c - 1 except at a response's first token, which
    the last prompt token predicts. The prompt goes through the model once, not K times.
    log pi(y_bj | x_b) = sum_{c in response j} m_bc log softmax(z_{b, src_bc})[x_bc]. The head
    runs only on the source columns some target needs. Returns ([R], [R]) with one entry per
    response, example by example (best first), as for `pad_groups` rows: R = sum(group_sizes).
    """
    logprobs, _, _, mask, segments = _shared_prompt_targets(model, batch, temperature)
    responses = torch.arange(1, int(batch["group_sizes"].max()) + 1, device=logprobs.device)
    in_response = mask[:, :, None] & (segments[:, :, None] == responses)  # [B, N, K]
    sums = masked_sum(logprobs[:, :, None].expand(in_response.shape), in_response, dim=1)  # [B, K]
    present = responses[None, :] <= batch["group_sizes"][:, None]
    return sums[present], in_response.sum(1)[present]


def shared_prompt_token_stats(model, batch: dict, temperature: float = 1.0,
                              entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs (and entropies) of each response of a `pad_shared_prompt` batch whose
    rows all hold the same number K of responses: [B * K, W], response k of row b at row b * K + k,
    its token t at column t (0 past its end), W the widest response block. What `token_stats`
    gives for [prompt | response] rows, each prompt computed once."""
    logprobs, ent, targets, mask, _ = _shared_prompt_targets(model, batch, temperature, entropy)
    b, width = batch["input_ids"].shape
    k = int(batch["group_sizes"].max())
    if bool((batch["group_sizes"] != k).any()):
        raise ValueError("shared_prompt_token_stats needs K responses in every row")
    blocks = [(batch["segment_ids"] == j + 1).any(0).nonzero().squeeze(-1) for j in range(k)]
    starts, widths = [int(c[0]) for c in blocks], [len(c) for c in blocks]  # each block is contiguous
    w = max(widths)
    outs = []
    for values in (logprobs, ent):
        if values is None:
            outs.append(None)
            continue
        full = torch.zeros(b, width + w, dtype=values.dtype, device=values.device)
        full[:, targets] = torch.where(mask, values, 0)
        cols = torch.arange(w, device=values.device)
        outs.append(torch.stack([torch.where(cols < n, full[:, s:s + w], 0) for s, n in zip(starts, widths)],
                                1).reshape(b * k, w))
    return outs[0], outs[1]
