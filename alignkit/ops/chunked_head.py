"""The output head and its log-softmax in chunks of tokens: logits are never held for the whole batch.

For hidden states h [N, H], head weight W [V, H] (and bias b), temperature T and targets y [N]:

    z_n = (W h_n + b) / T          logp_n = z_n[y_n] - logsumexp(z_n)          H_n = logsumexp(z_n) - sum_v p_nv z_nv

computed `chunk` tokens at a time; only lse_n = logsumexp(z_n) is kept per token. The backward
recomputes each chunk's logits, so the peak holds one chunk's [chunk, V] logits instead of the
batch's [N, V] (at a 128k vocabulary, 8 x 1,024 tokens: 4.2 GB in float32). The gradients, with
p = softmax(z), g the incoming gradient of logp and e that of H:

    dL/dz_nv = g_n (1[v = y_n] - p_nv) - e_n p_nv (log p_nv + H_n)

then dL/dh_n = (1/T) W^T dL/dz_n, dL/dW = (1/T) sum_n dL/dz_n h_n^T, dL/db = (1/T) sum_n dL/dz_n.
The idea of fused linear cross-entropy (Liger Kernel, Apple's Cut Cross-Entropy) in plain
PyTorch, so it runs on CPU and GPU alike. Each chunk's matmul and softmax run in float32
(hidden states and weights upcast per chunk).
"""

from __future__ import annotations

import torch
from torch import Tensor

CHUNK_ELEMENTS = 1 << 24
"""Logit elements per chunk by default (64 MiB in float32): 128 tokens at V = 128k, all of a
small-vocabulary batch at once."""


def default_chunk(vocab_size: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab_size)


def _compute_dtype(hidden: Tensor) -> torch.dtype:
    """float32, or float64 for float64 inputs (the exactness tests)."""
    return torch.promote_types(hidden.dtype, torch.float32)


def _chunk_logits(h: Tensor, weight: Tensor, bias: Tensor | None, temperature: float) -> Tensor:
    dtype = _compute_dtype(h)
    z = h.to(dtype) @ weight.to(dtype).t()
    if bias is not None:
        z += bias.to(dtype)
    return z.div_(temperature) if temperature != 1.0 else z  # in place: a chunk of logits is the big buffer


class _ChunkedHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk, want_entropy):
        n, dtype = hidden.shape[0], _compute_dtype(hidden)
        logprobs = torch.empty(n, dtype=dtype, device=hidden.device)
        entropy = torch.empty(n if want_entropy else 0, dtype=dtype, device=hidden.device)
        argmax = torch.empty(n, dtype=torch.long, device=hidden.device)
        lse = torch.empty(n, dtype=dtype, device=hidden.device)
        for s in range(0, n, chunk):
            z = _chunk_logits(hidden[s:s + chunk], weight, bias, temperature)
            lse[s:s + chunk] = torch.logsumexp(z, dim=-1)
            logprobs[s:s + chunk] = z.gather(1, targets[s:s + chunk, None]).squeeze(1) - lse[s:s + chunk]
            argmax[s:s + chunk] = z.argmax(-1)
            if want_entropy:  # -sum p log p with log p = z - lse: no cancellation of two large terms
                log_p = z.sub_(lse[s:s + chunk, None])
                entropy[s:s + chunk] = -(torch.exp(log_p) * log_p).sum(-1)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.temperature, ctx.chunk, ctx.want_entropy = temperature, chunk, want_entropy
        ctx.mark_non_differentiable(argmax)
        return logprobs, entropy, argmax

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy, _grad_argmax):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        t, chunk = ctx.temperature, ctx.chunk
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.empty_like(hidden) if need_h else None
        dtype = _compute_dtype(hidden)
        grad_w = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=dtype, device=bias.device) if need_b else None
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s:s + chunk]
            log_p = _chunk_logits(h, weight, bias, t).sub_(lse[s:s + chunk, None])  # in place, chunk-sized
            p = torch.exp(log_p)
            if ctx.want_entropy and grad_entropy is not None:  # -e p (log p + H), built in log_p's buffer
                dz = log_p.add_(entropy[s:s + chunk, None]).mul_(p).mul_(-grad_entropy[s:s + chunk, None])
            else:
                dz, log_p = None, None
            if grad_logprobs is not None:  # g (1[v = y] - p)
                g = grad_logprobs[s:s + chunk, None].to(p.dtype)
                term = p.mul_(-g)
                term.scatter_add_(1, targets[s:s + chunk, None], g)
                dz = term if dz is None else dz.add_(term)
            if dz is None:
                dz = torch.zeros_like(p)
            if t != 1.0:
                dz.div_(t)
            if need_h:
                grad_h[s:s + chunk] = (dz @ weight.to(dz.dtype)).to(hidden.dtype)
            if need_w:
                grad_w += dz.t() @ h.to(dz.dtype)
            if need_b:
                grad_b += dz.sum(0)
        return (grad_h, grad_w.to(weight.dtype) if need_w else None, grad_b.to(bias.dtype) if need_b else None,
                None, None, None, None)


def chunked_head(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None,
                 temperature: float = 1.0, chunk: int | None = None,
                 entropy: bool = False) -> tuple[Tensor, Tensor | None, Tensor]:
    """(logp [..], entropy [..] or None, argmax [..]) of hidden [.., H] through the head W [V, H]
    (bias [V]) at `temperature`, for targets [..] (negative targets read as 0; mask them), computed
    `chunk` tokens at a time (default: `default_chunk(V)`). Float32 outputs; differentiable in
    hidden, weight and bias (argmax is not). Formulas in the module docstring. Outputs are float32
    (float64 for float64 inputs)."""
    shape = targets.shape
    h = hidden.reshape(-1, hidden.shape[-1])
    y = targets.reshape(-1).clamp(min=0)
    chunk = chunk or default_chunk(weight.shape[0])
    logprobs, ent, argmax = _ChunkedHead.apply(h, weight, bias, y, float(temperature), int(chunk), bool(entropy))
    return logprobs.view(shape), ent.view(shape) if entropy else None, argmax.view(shape)
