"""PPO's critic: a value model V(s_t) read at every completion position, trained with the policy.

The critic is a reward-model-shaped checkpoint (`token_values`: its scalar head at each
position), or with `share_backbone` a scalar head on the policy's own last hidden state:
one backbone fewer, and one forward gives both log-probs and values.
"""

from __future__ import annotations

from pathlib import Path

import torch

from alignkit.models.forward import token_stats
from alignkit.models.reward import token_values

VALUE_HEAD_FILE = "value_head.safetensors"


class ValueHead(torch.nn.Module):
    """V(s_t) = w^T h_t + b on the policy's own last hidden state h_t (`share_backbone`).

    Zero at initialisation, so the first value gradients do not reach the policy's backbone."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.score = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.score.weight)
        torch.nn.init.zeros_(self.score.bias)


class PolicyAndValue(torch.nn.Module):
    """Holds the two trained models so one optimiser, one clip, one prepare and one save cover both."""

    def __init__(self, policy, value):
        super().__init__()
        self.policy, self.value = policy, value

    @property
    def config(self):
        """The policy's config (its positions, its vocabulary)."""
        return self.policy.config

    def forward(self, ids, attn, temperature: float, columns, entropy: bool = False):
        """`logprobs_and_values`. Training passes go through here, i.e. through the DDP wrapper's
        forward: DDP averages the gradients of a backward only after its own forward ran."""
        return self.logprobs_and_values(ids, attn, temperature, columns, entropy)

    def logprobs_and_values(self, ids, attn, temperature: float, columns, entropy: bool = False):
        """log pi, the entropy of pi (None unless `entropy`) and V at `columns`: [N, C] float32 each
        (`token_stats`: the head in chunks when the logits would be large)."""
        if isinstance(self.value, ValueHead):  # one forward through the shared backbone
            stats = token_stats(self.policy, ids, attn, temperature, columns=columns, entropy=entropy, with_hidden=True)
            return stats.logprobs, stats.entropy, self.value.score(stats.hidden).squeeze(-1).float()
        stats = token_stats(self.policy, ids, attn, temperature, columns=columns, entropy=entropy)
        return stats.logprobs, stats.entropy, token_values(self.value, ids, attn, columns)

    def save_pretrained(self, path, state_dict: dict | None = None):
        """The policy at `path`, loadable by plain transformers (with LoRA: merged, the adapter
        alone in path/adapter, as `load_trainable_model` resumes it); the critic in path/value,
        or a shared backbone's value head in path/value_head.safetensors. `state_dict`: both
        models' weights gathered from a sharded run (keys policy.*, value.*)."""
        from alignkit.models.load import save_weights

        def part(prefix: str) -> dict | None:
            if state_dict is None:
                return None
            return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}

        save_weights(self.policy, path, part("policy."))
        if isinstance(self.value, ValueHead):
            from safetensors.torch import save_file

            head = part("value.") or self.value.state_dict()
            save_file({k: v.contiguous() for k, v in head.items()}, Path(path) / VALUE_HEAD_FILE)
        else:
            save_weights(self.value, Path(path) / "value", part("value."))


def load_critic(policy, share_backbone: bool, source: str, resume_from: Path | None, pad_token_id: int):
    """The value model: a head on the policy (`share_backbone`) or a reward-model-shaped
    checkpoint from `source` (padding with the policy's `pad_token_id`); from the checkpoint
    when resuming. Returns (critic, its origin)."""
    from alignkit.models.reward import load_reward_backbone

    if share_backbone:
        head = ValueHead(getattr(policy, "module", policy).config.hidden_size)
        if resume_from:
            from safetensors.torch import load_file

            head.load_state_dict(load_file(resume_from / VALUE_HEAD_FILE))
        return head, "a head on the policy's backbone"
    source = str(resume_from / "value") if resume_from else source
    critic = load_reward_backbone(source)
    critic.config.pad_token_id = pad_token_id
    return critic, source
