"""The frozen reference policy of DPO, KTO and the online methods.

It is `ref_model` (default: the starting `model`), or with LoRA the policy itself
with its adapters disabled, so no second copy is held.
"""

from __future__ import annotations

import torch

from alignkit.models.forward import sequence_logprobs


def reference_logprobs_fn(model: str, ref_model: str, lora: bool, device):
    """A function (policy, batch) -> reference sequence log-probs [N], without gradient.

    `ref_model` if given, else with `lora` the policy with adapters disabled, else a
    frozen copy of the starting `model`."""
    if lora and not ref_model:
        def with_adapters_disabled(policy, batch):
            policy = getattr(policy, "module", policy)  # a DDP wrapper hides disable_adapter
            with torch.no_grad(), policy.disable_adapter():
                return sequence_logprobs(policy, batch)[0]
        return with_adapters_disabled
    from alignkit.models.load import load_causal_lm

    ref = load_causal_lm(ref_model or model).to(device).eval().requires_grad_(False)

    def frozen(policy, batch):
        with torch.no_grad():
            return sequence_logprobs(ref, batch)[0]
    return frozen


def precompute_reference(reference, policy, examples: list[dict], collate, batch_size: int, device) -> None:
    """One pass that stores each example's reference log-probs in `ex["ref_logps"]`."""
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in collate(chunk).items()}
        values = reference(policy, batch).tolist()
        for ex in chunk:
            k = len(ex["sequences"])
            ex["ref_logps"], values = values[:k], values[k:]
