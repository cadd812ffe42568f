"""Per-token log-probabilities and entropy from logits.

Both return float32. Low-precision logits (float16 / bfloat16) are upcast one
sequence at a time, so the float32 copy is [T, V], never [B, T, V].
"""

from __future__ import annotations

import torch
from torch import Tensor

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _token_logprobs_fp32(logits: Tensor, labels: Tensor) -> Tensor:
    logits = logits.float()
    # Ignore labels (e.g. -100) would crash gather; the caller masks those positions.
    index = labels.clamp(min=0).unsqueeze(-1)
    picked = logits.gather(-1, index).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def token_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    """log pi(labels_t) = logits[t, labels_t] - logsumexp_v logits[t, v].

    logits: [B, T, V]; labels: [B, T] long, already aligned with logits (the
    caller shifts). Negative labels (ignore index) are read as 0; mask them.
    Returns [B, T] float32.
    """
    if logits.dtype not in _LOW_PRECISION:
        return _token_logprobs_fp32(logits, labels)
    out = torch.empty(labels.shape, dtype=torch.float32, device=logits.device)
    for b in range(logits.shape[0]):
        out[b] = _token_logprobs_fp32(logits[b], labels[b])
    return out


def _entropy_fp32(logits: Tensor) -> Tensor:
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """H = -sum_v p_v log p_v = logsumexp(z) - sum_v softmax(z)_v * z_v.

    logits z: [B, T, V]. Returns [B, T] float32 (nats).
    """
    if logits.dtype not in _LOW_PRECISION:
        return _entropy_fp32(logits)
    out = torch.empty(logits.shape[:-1], dtype=torch.float32, device=logits.device)
    for b in range(logits.shape[0]):
        out[b] = _entropy_fp32(logits[b])
    return out
