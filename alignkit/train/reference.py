"""The frozen reference policy of DPO, KTO and the online methods.

It is `ref_model` (default: the starting `model`), or with LoRA the policy itself
with its adapters disabled, so no second copy is held.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from alignkit.models.forward import sequence_logprobs


def make_reference(model: str, ref_model: str, lora: bool, device,
                   autocast: Callable = contextlib.nullcontext, before_first_update: bool = False,
                   dtype: str = "float32") -> Callable:
    """A function `reference(policy, fn)` that returns `fn(reference_model)` without gradient.

    `ref_model` if given, else with `lora` the policy with adapters disabled, else a
    frozen copy of the starting `model`. `fn` is any forward, e.g.
    `lambda m: sequence_logprobs(m, batch)[0]`. Pass the accelerator's `autocast` so
    the reference runs at the policy's precision: at step 0, log pi - log pi_ref is 0.
    `before_first_update`: the caller uses the reference only while the policy still
    holds the starting weights (precomputed log-probs of a run that is not resumed), so
    the policy itself, in eval mode, is the reference and no copy is loaded.
    `dtype` ("bfloat16", "float16") stores a loaded reference copy at lower precision: half
    the memory, at the price of log pi - log pi_ref no longer being exactly 0 at step 0.
    """
    if before_first_update and not ref_model and not lora:
        def starting_policy(policy, fn):
            policy = getattr(policy, "module", policy)
            was_training = policy.training
            policy.eval()  # as the loaded copy would be: no dropout
            try:
                with torch.no_grad(), autocast():
                    return fn(policy)
            finally:
                policy.train(was_training)
        return starting_policy
    if lora and not ref_model:
        def with_adapters_disabled(policy, fn):
            policy = getattr(policy, "module", policy)  # a DDP wrapper hides disable_adapter
            with torch.no_grad(), autocast(), policy.disable_adapter():
                return fn(policy)
        return with_adapters_disabled
    from alignkit.models.load import load_causal_lm

    ref = load_causal_lm(ref_model or model, dtype=dtype).to(device).eval().requires_grad_(False)

    def frozen(policy, fn):
        with torch.no_grad(), autocast():
            return fn(ref)
    return frozen


def reference_sequence_logprobs(reference: Callable, policy, batch: dict) -> torch.Tensor:
    """log pi_ref(y | x) per row of `batch` [N]."""
    return reference(policy, lambda m: sequence_logprobs(m, batch)[0])


def precompute_reference(reference, policy, examples: list[dict], collate, batch_size: int, device) -> None:
    """One pass that stores each example's reference log-probs in `ex["ref_logps"]`."""
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in collate(chunk).items()}
        values = reference_sequence_logprobs(reference, policy, batch).tolist()
        for ex in chunk:
            k = len(ex["sequences"])
            ex["ref_logps"], values = values[:k], values[k:]
