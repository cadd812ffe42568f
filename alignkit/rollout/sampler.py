"""The built-in rollout engine for online RL: batched sampling with a KV cache.

    from alignkit.models.forward import forward_logprobs
    from alignkit.rollout.sampler import sample

    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    g = torch.Generator().manual_seed(0)
    rollout = sample(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=24,
                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                     temperature=0.7, generator=g)
    # the learner scores exactly what was sampled, at the same temperature:
    new_lp, _ = forward_logprobs(policy, rollout.input_ids, rollout.attention_mask, temperature=0.7)
    new_lp = new_lp[:, rollout.prompt_ids.shape[1] - 1 :]   # [N, C], aligned with rollout.logprobs

Several completions of each prompt (GRPO's group, best-of-n) come from `num_samples=n` on the
DISTINCT prompts: each prompt is prefilled once and its KV cache copied to its n rows, where
repeating the prompts first would prefill each of them n times.

Unlike `model.generate`, `sample` returns what an RL learner needs in one object: the
sampled ids, a completion mask that includes the EOS that ended a row, the sampling
log-probs and whether each row ended. vLLM is the other backend (later) behind the same
`Rollout`, so a trainer does not care which one produced it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import Tensor

from alignkit.models.forward import position_ids_from_mask
from alignkit.ops import token_logprobs


@dataclass
class Rollout:
    """N prompts and their sampled completions.

    prompt_ids, prompt_mask: [N, P] left-padded prompts.
    completion_ids: [N, C], right-padded with pad_token_id after the end.
    completion_mask: [N, C], 1 on sampled tokens including the EOS that ended the row, 0 after.
    logprobs: [N, C] float32, log softmax(logits / temperature) at each sampled token, 0 where
        completion_mask is 0 (temperature 1 for greedy sampling).
    ended: [N] bool, True when the row emitted EOS within max_new_tokens; False when it was
        cut off at the limit (that is not an ending: do not append an EOS to it).
    shared_prefill: True when each distinct prompt was prefilled once and its KV cache copied to
        its num_samples rows; False when every row was prefilled (one sample per prompt, or a
        cache `sample` cannot expand: see `expand_cache`).
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    completion_ids: Tensor
    completion_mask: Tensor
    logprobs: Tensor
    ended: Tensor
    shared_prefill: bool = False

    @property
    def input_ids(self) -> Tensor:
        """Prompt and completion side by side: [N, P + C]."""
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> Tensor:
        """[N, P + C]: the prompt mask, then the completion mask (pads after the end are 0)."""
        return torch.cat([self.prompt_mask.to(self.completion_mask.dtype), self.completion_mask], dim=1)

    @property
    def columns(self) -> Tensor:
        """[C]: the logit columns of `input_ids` that predict the completion tokens (P - 1, ..., P + C - 2)."""
        p = self.prompt_ids.shape[1]
        return torch.arange(p - 1, p - 1 + self.completion_ids.shape[1], device=self.prompt_ids.device)


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Set logits outside the top-k / top-p (nucleus) set to -inf: [N, V] -> [N, V].

    top_k > 0 keeps the k largest; top_p < 1 keeps the smallest set of most likely tokens
    whose probabilities sum to >= top_p. The most likely token is always kept.
    """
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p.
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        drop[:, 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def draw_inverse_cdf(probs: Tensor, u: Tensor) -> Tensor:
    """One token per row by inverse CDF from its uniform u_i in [0, 1): [N, V], [N] -> [N].

    token_i = min{v : sum_{w<=v} p_iw > u_i * sum_w p_iw}: P(token_i = v) = p_iv, and a
    zero-probability token is never drawn. One cumsum and one binary search per row, where
    `torch.multinomial` took 15x longer on CPU for 64 rows of 1024 (measured).
    """
    cdf = probs.cumsum(-1)
    token = torch.searchsorted(cdf, (u.to(cdf) * cdf[:, -1])[:, None], right=True)[:, 0]
    return token.clamp(max=probs.shape[-1] - 1)


def completion_generators(seed: int, prompt_ids: list[int], n: int) -> list[torch.Generator]:
    """One CPU generator per completion, n per prompt, in prompt-major order: completion k of
    prompt i is seeded with (seed * 1_000_033 + i) * 101 + k.

    Handed to `sample(num_samples=n)` (or with the prompts repeated n times each), a completion then depends only on
    (seed, prompt id, k): not on which process, micro-batch or batch size it was drawn in.
    """
    return [torch.Generator().manual_seed((seed * 1_000_033 + i) * 101 + k) for i in prompt_ids for k in range(n)]


def draw_per_row(probs: Tensor, generators: list[torch.Generator]) -> Tensor:
    """One token per row, row i by inverse CDF from one uniform of generators[i]: [N, V] -> [N].

    The generators are CPU ones: N scalar draws and one copy per step, not N sampling
    kernels on the device.
    """
    return draw_inverse_cdf(probs, torch.stack([torch.rand((), generator=g) for g in generators]).to(probs.device))


def _cache_of(out):
    return out.cache if "cache" in out else out.past_key_values


def preallocated_cache(model, capacity: int):
    """A transformers `DynamicCache` for `model` whose full-attention layers hold their keys
    and values in buffers of `capacity` positions, or None when the model's cache is not
    made of plain `DynamicLayer`s (then the model builds its own).

    `DynamicLayer.update` concatenates each new token's keys and values onto the whole cache:
    O(T) copying per layer per token. Writing into a buffer sized for prompt + max_new_tokens
    copies only the new position, and the layer hands attention a view of the filled part;
    the values attention sees are the same. Measured 10% faster decoding at batch 64.
    """
    from transformers.cache_utils import DynamicCache, DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        expandable = True  # `expand_cache` knows its state: the two buffers and the filled length

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.device, self.is_initialized, self.length = key_states.device, True, 0
                self.key_buffer = key_states.new_empty((*key_states.shape[:2], capacity, key_states.shape[3]))
                self.value_buffer = value_states.new_empty((*value_states.shape[:2], capacity, value_states.shape[3]))
            end = self.length + key_states.shape[-2]
            if end > capacity:
                raise RuntimeError(f"KV cache of {capacity} positions is full ({end} needed)")
            self.key_buffer[:, :, self.length : end] = key_states
            self.value_buffer[:, :, self.length : end] = value_states
            self.length = end
            self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
            return self.keys, self.values

        def batch_repeat_interleave(self, repeats: int) -> None:
            if not self.is_initialized:
                return

            def grow(buffer: Tensor) -> Tensor:
                # Only the filled positions are copied: one broadcast write into the new rows.
                rows, rest = buffer.shape[0], buffer.shape[1:]
                out = buffer.new_empty((rows * repeats, *rest))
                out.view(rows, repeats, *rest)[:, :, :, : self.length] = buffer[:, None, :, : self.length]
                return out

            self.key_buffer, self.value_buffer = grow(self.key_buffer), grow(self.value_buffer)
            self.keys = self.key_buffer[:, :, : self.length]
            self.values = self.value_buffer[:, :, : self.length]

    try:
        cache = DynamicCache(config=model.config)
    except Exception:  # noqa: BLE001 - a config this transformers cannot read: let the model decide
        return None
    if not cache.layers or any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None  # sliding-window, linear-attention or KV-sharing layers keep transformers' own cache
    cache.layers = [PreallocatedLayer() for _ in cache.layers]
    return cache


def expand_cache(cache, repeats: int) -> bool:
    """Repeat each row of a filled KV cache `repeats` times along the batch, in place and
    prompt-major (row i becomes rows i*repeats .. i*repeats + repeats - 1); False, cache
    untouched, when it is not one whose whole per-row state is known to be its keys and values.

    Known: a transformers `DynamicCache` made of `DynamicLayer`s, `DynamicSlidingWindowLayer`s
    (each repeated by transformers' own `batch_repeat_interleave`) and `preallocated_cache`'s
    buffer layers. Linear-attention, quantised, offloaded or KV-sharing caches keep other
    per-row state: `sample` repeats the prompts for those instead.
    """
    from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

    if type(cache) is not DynamicCache or not cache.layers or getattr(cache, "offloading", False):
        return False
    known = (DynamicLayer, DynamicSlidingWindowLayer)
    if not all(type(layer) in known or getattr(type(layer), "expandable", False) for layer in cache.layers):
        return False
    cache.batch_repeat_interleave(repeats)
    return True


def shared_prefill_cache(model, capacity: int):
    """A cache that `expand_cache` can expand after the prefill, for `model`: the buffer-backed
    `preallocated_cache`, else a transformers `DynamicCache` built from the model's config (what
    the model would build itself) when all its layers are full or sliding-window attention;
    None when neither (the prompts are then repeated)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

    cache = preallocated_cache(model, capacity)
    if cache is not None:
        return cache
    try:
        cache = DynamicCache(config=model.config)
    except Exception:  # noqa: BLE001 - a config this transformers cannot read
        return None
    known = (DynamicLayer, DynamicSlidingWindowLayer)
    return cache if cache.layers and all(type(layer) in known for layer in cache.layers) else None


@torch.no_grad()
def sample(model, prompt_ids: Tensor, prompt_mask: Tensor, *, max_new_tokens: int, eos_token_id: int | list[int],
           pad_token_id: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, num_samples: int = 1,
           generator: torch.Generator | list[torch.Generator] | None = None) -> Rollout:
    """Sample `num_samples` completions of up to `max_new_tokens` tokens after each left-padded
    prompt, with a KV cache.

    prompt_ids, prompt_mask: [M, P], left padded (the last column is a real token in every
    row). One prefill forward over the M prompts; with num_samples = n > 1 the prefill's KV
    cache and last logits are then repeated to N = M * n rows, prompt-major (row i*n + k is
    sample k of prompt i), exactly as if the prompts had been repeated n times first, but
    each prompt is prefilled once. Fallback: for a model whose cache `expand_cache` does not
    know (linear attention, quantised, ...; see `shared_prefill_cache`), or that built its own
    cache instead of using the one it was given, every row is prefilled (the prompts repeated
    first, as callers did before): the same rollout, with `Rollout.shared_prefill` False.
    Then one forward per new token that feeds only that token, its position and the cache.
    Rows stop independently at an EOS (any id in `eos_token_id`); the loop stops when all
    have, so C <= max_new_tokens. The returned prompt_ids / prompt_mask are [N, P] (each
    prompt repeated n times), the other fields [N, ...].

    Tokens are drawn from softmax(logits / temperature), restricted by top_k / top_p;
    temperature 0 is greedy (argmax). The returned log-probs are log softmax(logits /
    temperature) of the UNTRUNCATED distribution (temperature 1 when greedy): that is what
    the learner recomputes with `forward_logprobs(..., temperature)`, so sampler and learner
    agree token for token. top-k / top-p only change which tokens are drawn; with them the
    log-probs are not those of the (truncated) sampling distribution.
    The same `generator` state gives the same rollout. A list of N CPU generators draws row
    i from generator i alone: a row's completion then does not depend on which rows share
    its batch (how prompts were split over processes and micro-batches), nor on whether its
    prompt was prefilled once for all its samples.
    """
    if prompt_ids.shape != prompt_mask.shape or prompt_ids.dim() != 2:
        raise ValueError(f"prompt_ids {tuple(prompt_ids.shape)} and prompt_mask {tuple(prompt_mask.shape)} "
                         "must both be [M, P]")
    if not bool(prompt_mask[:, -1].all()):
        raise ValueError("prompts must be left padded: the last column of prompt_mask must be 1 in every row")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    device = prompt_ids.device
    m, p = prompt_ids.shape
    n = m * num_samples
    if isinstance(generator, (list, tuple)) and len(generator) != n:
        raise ValueError(f"{len(generator)} generators for {n} rows")
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id),
                       dtype=torch.long, device=device)

    completion_ids = torch.full((n, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    completion_mask = torch.zeros((n, max_new_tokens), dtype=torch.long, device=device)
    logprobs = torch.zeros((n, max_new_tokens), dtype=torch.float32, device=device)
    ended = torch.zeros(n, dtype=torch.bool, device=device)
    rows_ids, rows_mask = ((prompt_ids.repeat_interleave(num_samples, 0), prompt_mask.repeat_interleave(num_samples, 0))
                           if num_samples > 1 else (prompt_ids, prompt_mask))
    # The attention mask grows by one column per step; slicing a preallocated one avoids a copy.
    attention_mask = torch.cat([rows_mask.long(), torch.ones((n, max_new_tokens), dtype=torch.long, device=device)], 1)

    # transformers 5.24 renamed `past_key_values` to `cache`; accept both.
    cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def prefill(ids: Tensor, mask: Tensor, cache):
        position_ids = position_ids_from_mask(mask)
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True,
                    logits_to_keep=1, **({cache_kwarg: cache} if cache is not None else {}))
        return _cache_of(out), out.logits[:, -1], position_ids[:, -1:]

    was_training = model.training
    model.eval()
    try:
        capacity = p + max_new_tokens
        cache = shared_prefill_cache(model, capacity) if num_samples > 1 else None
        shared = cache is not None
        if shared:  # the distinct prompts, then each row of their cache repeated num_samples times
            cache, last, position = prefill(prompt_ids, prompt_mask, cache)
            shared = expand_cache(cache, num_samples)
            last, position = last.repeat_interleave(num_samples, 0), position.repeat_interleave(num_samples, 0)
        if not shared:  # every row; also when the model built its own cache rather than use the one it was given
            cache, last, position = prefill(rows_ids, rows_mask, preallocated_cache(model, capacity))
        steps = 0
        for t in range(max_new_tokens):
            logits = last.float()
            if temperature > 0:
                logits = logits / temperature
                probs = filter_logits(logits, top_k, top_p).softmax(dim=-1)
                if isinstance(generator, (list, tuple)):
                    token = draw_per_row(probs, generator)
                else:
                    device_of_draw = generator.device if generator is not None else probs.device
                    token = draw_inverse_cdf(probs, torch.rand(n, generator=generator, device=device_of_draw))
            else:
                token = logits.argmax(dim=-1)
            alive = ~ended
            token = token.masked_fill(ended, pad_token_id)
            completion_ids[:, t] = token
            completion_mask[:, t] = alive.long()
            logprobs[:, t] = token_logprobs(logits[:, None], token[:, None])[:, 0].masked_fill(ended, 0.0)
            ended = ended | (alive & torch.isin(token, eos))
            steps = t + 1
            # One host sync per token: the price of stopping as soon as every row has ended.
            if t == max_new_tokens - 1 or bool(ended.all()):
                break
            position = position + 1
            out = model(input_ids=token[:, None], attention_mask=attention_mask[:, : p + t + 1],
                        position_ids=position, use_cache=True, **{cache_kwarg: cache})
            cache, last = _cache_of(out), out.logits[:, -1]
    finally:
        model.train(was_training)

    return Rollout(
        prompt_ids=rows_ids,
        prompt_mask=rows_mask,
        completion_ids=completion_ids[:, :steps],
        completion_mask=completion_mask[:, :steps],
        logprobs=logprobs[:, :steps],
        ended=ended,
        shared_prefill=shared,
    )
