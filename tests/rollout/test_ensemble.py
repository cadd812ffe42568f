"""An ensemble of reward sources penalised by its disagreement (reward_uncertainty_penalty)."""

import math

import pytest
import torch

from alignkit.config import ConfigError
from alignkit.rollout.rewards import PenalisedEnsemble, penalised_ensemble
from alignkit.train.grpo import GRPOConfig
from alignkit.train.online import load_rewards


def test_penalised_ensemble_by_hand():
    # members 1 and 3 on completion 0 (mean 2, population std 1), 2 and 2 on completion 1 (std 0)
    values = torch.tensor([[1.0, 2.0], [3.0, 2.0]])
    out = penalised_ensemble(values, torch.tensor([0.5, 0.5]), penalty=1.0)
    assert out.tolist() == [1.0, 2.0]
    # three members 0, 3, 6: weighted sum 0.2*0 + 0.3*3 + 0.5*6 = 3.9, std sqrt(6) = 2.449...; lambda 0.5
    out = penalised_ensemble(torch.tensor([[0.0], [3.0], [6.0]]), torch.tensor([0.2, 0.3, 0.5]), penalty=0.5)
    assert out.item() == pytest.approx(3.9 - 0.5 * math.sqrt(6.0))


def test_the_ensemble_as_one_source_and_the_watched_one_kept(tmp_path):
    cfg = GRPOConfig(reward=["tests.helpers:digit_fraction", "tests.helpers:contains_seven",
                             "alignkit.tasks.sentiment:gold_reward"], reward_weights=[0.5, 0.5, 0.0],
                     reward_uncertainty_penalty=2.0)
    fns, weights = load_rewards(cfg, "cpu")
    assert weights == [1.0, 0.0] and isinstance(fns[0], PenalisedEnsemble)
    assert fns[1].reward_name == "alignkit.tasks.sentiment:gold_reward"
    assert fns[0].reward_name == "ensemble(tests.helpers:digit_fraction, tests.helpers:contains_seven; -2 std)"
    # "77": both members say 1 (no disagreement); "7a": 0.5 and 1 -> 0.75 - 2 * 0.25; "ab": 0 and 0
    assert fns[0](["p"] * 3, ["77", "7a", "ab"]) == [1.0, 0.25, 0.0]
    plain, plain_weights = load_rewards(GRPOConfig(reward=cfg.reward, reward_weights=cfg.reward_weights), "cpu")
    assert len(plain) == 3 and plain_weights == [0.5, 0.5, 0.0]


def test_an_ensemble_needs_two_weighted_sources():
    with pytest.raises(ConfigError, match="at least 2 reward sources with a non-zero weight, got 1"):
        GRPOConfig(data="p.jsonl", model="m", reward=["tests.helpers:digit_fraction", "tests.helpers:contains_seven"],
                   reward_weights=[1.0, 0.0], reward_uncertainty_penalty=1.0).validate()
    with pytest.raises(ConfigError, match="reward_uncertainty_penalty must be >= 0"):
        GRPOConfig(data="p.jsonl", model="m", reward_uncertainty_penalty=-1.0).validate()
