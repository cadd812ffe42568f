"""PRM-guided step-level beam search and Monte-Carlo step labels, on a tiny model."""

import pytest
import torch

from alignkit.models.load import load_causal_lm
from alignkit.models.process_reward import ProcessRewardModel, aggregate_steps, load_prm_backbone
from alignkit.rollout.step_labels import monte_carlo_step_labels
from alignkit.rollout.step_search import separator_token_ids, step_beam_search


@pytest.fixture(scope="module")
def prm(tiny_model_dir, tiny_tokenizer):
    torch.manual_seed(0)
    return ProcessRewardModel(load_prm_backbone(str(tiny_model_dir)), tiny_tokenizer, separator="+")


def test_beam_search_keeps_the_best_scored_solution(tiny_model_dir, tiny_tokenizer, prm, one_thread):
    policy = load_causal_lm(str(tiny_model_dir)).eval()
    prompts = ["What is 3+4?", "What is 12+"]
    out = step_beam_search(policy, tiny_tokenizer, prm, prompts, n=6, beam_width=2, max_new_tokens=12, seed=0)
    again = step_beam_search(policy, tiny_tokenizer, prm, prompts, n=6, beam_width=2, max_new_tokens=12, seed=0)
    assert [o["best"] for o in out] == [o["best"] for o in again]  # seeded
    plus = set(separator_token_ids(tiny_tokenizer, "+"))
    for o, prompt in zip(out, prompts):
        ids = o["best_token_ids"]
        assert len(ids) <= 12 + 12 and (o["ended"] == (ids[-1] == tiny_tokenizer.eos_token_id))
        assert tiny_tokenizer.decode(ids, skip_special_tokens=True) == o["best"]
        # its score is the PRM's aggregate of its own steps, recomputed
        steps = prm.split(o["best"])
        assert o["best_score"] == pytest.approx(aggregate_steps(prm.step_scores([prompt], [steps])[0], "min"), abs=1e-5)
        # every round drew n candidate steps (n divides evenly among 1 or 2 live beams)
        assert o["samples"] == 6 * o["rounds"]
        # a step ends at a separator token or EOS: the rounds are at least the separators written + 1
        assert o["rounds"] >= sum(t in plus for t in ids[:-1]) + 1 or not o["ended"]
    with pytest.raises(ValueError, match="multiple"):
        step_beam_search(policy, tiny_tokenizer, prm, prompts, n=5, beam_width=2, max_new_tokens=8)


def test_monte_carlo_labels_score_prefix_plus_continuation(tiny_model_dir, tiny_tokenizer, one_thread):
    policy = load_causal_lm(str(tiny_model_dir)).eval()
    seen = []

    def starts_right(prompts, completions, answer, **_):
        """1 when the whole completion starts with the solution's first step: every continuation of a prefix
        that holds that step is right, and no other."""
        seen.extend(zip(prompts, completions))
        return [1.0 if c.startswith(f" {a}+") else 0.0 for c, a in zip(completions, answer)]

    prompts = ["Q: 1+2+3?", "Q: 4+4+1?"]
    steps = [[" 1", "2=3", " so 6"], [" 7", "4=8", " so 9"]]
    labels = monte_carlo_step_labels(policy, tiny_tokenizer, prompts, steps, starts_right, {"answer": [1, 4]},
                                     separator="+", k=4, max_new_tokens=6)
    # solution 0 starts with " 1+": every prefix keeps it; solution 1 starts " 7+", never right
    assert labels == [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]
    # the reward saw the original prompts, and completions = prefix + continuation
    assert {p for p, _ in seen} == set(prompts)
    assert any(c.startswith(" 1+2=3+") for _, c in seen)
    with pytest.raises(ValueError, match="mode"):
        monte_carlo_step_labels(policy, tiny_tokenizer, prompts, steps, starts_right, {"answer": [1, 4]},
                                separator="+", k=2, max_new_tokens=4, mode="all")
