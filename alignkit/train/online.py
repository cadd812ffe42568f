"""What the online trainers (grpo, rloo, ppo, bon) share: sampling and reward keys."""

from __future__ import annotations

from dataclasses import dataclass, field

from alignkit.train.loop import TrainConfig


@dataclass
class OnlineConfig(TrainConfig):
    """Keys of every trainer that samples completions and scores them."""

    max_new_tokens: int = 32
    """Longest completion; one that reaches it without EOS did not end."""
    max_length: int = 256
    """Longest prompt in tokens (older prompt tokens are dropped, counted)."""
    temperature: float = 1.0
    """Sampling temperature; log-probs are recomputed at the same temperature."""
    top_k: int = 0
    """Sample from the k most likely tokens (0: all)."""
    top_p: float = 1.0
    """Nucleus sampling mass (1: all)."""
    reward: list[str] = field(default_factory=list)
    """Reward sources: reward-model directories and/or `module:function` callables."""
    reward_weights: list[float] = field(default_factory=list)
    """Weight of each reward source (default: 1 each)."""
    reward_timeout: float = 300.0
    """Seconds a reward call may take before it counts as failed."""
    reward_dtype: str = "float32"
    """Storage dtype of reward-model checkpoints among `reward` (bfloat16 / float16: half their memory)."""

    def validate(self) -> None:
        """TrainConfig's checks, then each reward source resolved (imported, or its folder checked)
        and the weights matched to it, before any model loads."""
        from alignkit.config import ConfigError
        from alignkit.rollout.rewards import check_reward_spec

        super().validate()
        for spec in self.reward:
            check_reward_spec(spec)
        if self.reward_weights and len(self.reward_weights) != len(self.reward):
            raise ConfigError(f"reward_weights has {len(self.reward_weights)} values for {len(self.reward)} "
                              "reward sources; give one weight per source, in order")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
