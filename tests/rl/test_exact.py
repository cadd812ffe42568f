"""The exact KL-regularised optimum: the closed form by hand, then alignkit's trainers against it."""

import math

import pytest
import torch

from alignkit.rl import exact


def test_reward_and_enumeration():
    assert len(exact.all_responses()) == 4 + 16 + 64
    assert exact.reward(["p0", "p1", "p0", "p1"], ["a a b", "b", "a b c d", ""]) == [2.0, 1.0, -3.0, -3.0]


def test_closed_form_by_hand():
    # one prompt, two responses, pi_ref uniform, r = (1, 0), beta = 1: pi* = (e, 1) / (e + 1)
    ref = torch.log(torch.tensor([[0.5, 0.5]]))
    r = torch.tensor([[1.0, 0.0]])
    pi = exact.optimal_policy(ref, r, 1.0)
    torch.testing.assert_close(pi, torch.tensor([[math.e, 1.0]]) / (math.e + 1))
    # max_pi E[r] - beta KL = beta log E_ref exp(r / beta) = log((e + 1) / 2)
    assert exact.objective(pi.log(), ref, r, 1.0) == pytest.approx(math.log((math.e + 1) / 2), abs=1e-6)
    # beta -> 0: pi* -> argmax r; beta -> inf: pi* -> pi_ref
    torch.testing.assert_close(exact.optimal_policy(ref, r, 1e-3), torch.tensor([[1.0, 0.0]]))
    torch.testing.assert_close(exact.optimal_policy(ref, r, 1e6), torch.tensor([[0.5, 0.5]]))


def test_tv_and_kl_by_hand():
    p, q = torch.tensor([[0.5, 0.5]]), torch.tensor([[0.75, 0.25]])
    assert exact.total_variation(p, q) == pytest.approx(0.25)
    # 0.5 log(0.5 / 0.75) + 0.5 log(0.5 / 0.25) = 0.5 log(4 / 3)
    assert exact.kl_divergence(p.log(), q.log()) == pytest.approx(0.5 * math.log(4 / 3), abs=1e-6)
    assert exact.expected_reward(p, torch.tensor([[1.0, 3.0]])) == pytest.approx(2.0)
    # mass outside S is one more atom: p puts 0.2 there, q none
    assert exact.total_variation(torch.tensor([[0.4, 0.4]]), p) == pytest.approx(0.5 * (0.1 + 0.1 + 0.2))


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_pi_star_beats_every_perturbation(beta):
    g = torch.Generator().manual_seed(0)
    ref = torch.log_softmax(torch.randn(3, 10, generator=g), -1)
    r = torch.randn(3, 10, generator=g)
    pi = exact.optimal_policy(ref, r, beta)
    best = exact.objective(pi.log(), ref, r, beta)
    assert best == pytest.approx(beta * float(torch.logsumexp(ref + r / beta, -1).mean()), abs=1e-5)
    for _ in range(200):
        other = torch.log_softmax(pi.log() + 0.3 * torch.randn(3, 10, generator=g), -1)
        assert exact.objective(other, ref, r, beta) < best


@pytest.fixture(scope="module")
def problem(tmp_path_factory, one_thread):
    return exact.make_problem(tmp_path_factory.mktemp("exact"))


def test_reference_is_the_known_non_uniform_distribution(problem):
    p = problem.ref_logprobs.exp()
    assert exact.total_variation(p, exact.target_probs(problem.responses)) < 0.02
    assert float(exact.outside_mass(p).max()) < 0.005
    assert exact.total_variation(p, torch.full_like(p, 1 / p.shape[1])) > 0.3  # far from uniform
    assert problem.evaluate(problem.ref_dir, 1.0)["tv"] > 0.2  # and far from pi*: training has work to do


BETAS = [1.0, 0.1]


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("method", ["rloo", "grpo", "ppo"])
def test_online_with_kl_in_the_reward_reaches_pi_star(problem, method, beta, tmp_path):
    """RLOO and GRPO (kl_in_reward, no std scaling) and PPO, 300 steps each: ~6-12 s each here.

    Measured TV: beta 1.0: rloo 0.011, grpo 0.011; beta 0.1: rloo 0.024, grpo 0.024. PPO at beta 1.0,
    seeds 0/1/2: 0.013/0.011/0.008 (after 150 steps, the earlier budget: 0.056/0.011/0.026).
    """
    result = problem.evaluate(exact.train(method, problem, beta, tmp_path / method), beta)
    assert result["tv"] < 0.05, result
    if method == "rloo" and beta == 1.0:  # `alignkit rloo --beta 1` with RLOO's own defaults (TRL 1.16: 0.011)
        assert result["tv"] <= 0.02, result


def test_dpo_reaches_pi_star_and_its_implicit_reward_is_r(problem, tmp_path):
    from alignkit.models.load import load_causal_lm

    out = exact.train("dpo", problem, 1.0, tmp_path / "dpo")
    result = problem.evaluate(out, 1.0)
    assert result["tv"] < 0.1, result  # measured 0.062 (4000 pairs, 3 epochs, ~4 s)
    # measured 0.947 with 4000 pairs: rare responses are seldom compared, so their implicit reward is
    # loosely pinned. 16000 pairs give 0.993 (the issue's >= 0.99) but TV 0.128: the loss only sees
    # log-ratio differences within a prompt, so mass drifts to responses outside S unpunished.
    assert exact.implicit_reward_correlation(load_causal_lm(str(out)), problem, 1.0) > 0.9


def test_dpo_implicit_reward_is_r_up_to_a_per_prompt_constant(problem, tmp_path):
    """With 16,000 pairs every response is compared often enough: beta log(pi / pi_ref) = r + c(x).

    Measured 0.993 (TV 0.128 in the same run: mass outside S is not seen by the DPO loss)."""
    from alignkit.models.load import load_causal_lm

    out = exact.train("dpo", problem, 1.0, tmp_path / "dpo16k", pairs=16000)
    assert exact.implicit_reward_correlation(load_causal_lm(str(out)), problem, 1.0) >= 0.99


def test_robust_dpo_on_noisy_labels_lands_nearer_pi_star_than_dpo(problem, tmp_path):
    """20% of the labels flipped: DPO learns a flattened optimum; robust DPO told the noise rate
    (label_smoothing 0.2) corrects for it. Measured TV 0.154 (sigmoid) vs 0.130 (robust), and
    conservative DPO (sigmoid, label_smoothing 0.2: flattens further) 0.185."""
    tv = {name: problem.evaluate(exact.train("dpo", problem, 1.0, tmp_path / name, loss_type=[name], label_noise=0.2,
                                             **({"label_smoothing": 0.2} if name == "robust" else {})), 1.0)["tv"]
          for name in ("sigmoid", "robust")}
    assert tv["robust"] < tv["sigmoid"] - 0.01, tv


@pytest.mark.parametrize("loss_type", ["robust", "bco_pair", "hinge", "discopop"])
def test_losses_near_pi_star_on_clean_pairs(problem, tmp_path, loss_type):
    """Clean Bradley-Terry pairs at beta 1 (4000, as DPO's test): robust with no noise is DPO (TV 0.064);
    bco_pair 0.075, hinge 0.070 and discopop 0.111 land near pi* too though none is derived for it
    (docs/rl.md's table has every loss)."""
    result = problem.evaluate(exact.train("dpo", problem, 1.0, tmp_path / loss_type, loss_type=[loss_type]), 1.0)
    assert result["tv"] < 0.13, result


@pytest.mark.slow
@pytest.mark.parametrize("keys", [{"loss_level": "dr_grpo"}, {"loss_level": "bnpo"},
                                  {"num_iterations": 2, "clip_eps_high": 0.28},
                                  {"num_iterations": 2, "importance_sampling_level": "sequence"}],
                         ids=["dr_grpo", "bnpo", "clip_higher", "gspo"])
def test_grpo_options_that_keep_pi_star(problem, tmp_path, keys):
    """docs/rl.md's GRPO options table, beta 1: measured TV 0.008 (dr_grpo), 0.014 (bnpo), 0.014 (clip-higher),
    0.006 (GSPO), against the recipe's 0.014."""
    result = problem.evaluate(exact.train("grpo", problem, 1.0, tmp_path / "grpo", **keys), 1.0)
    assert result["tv"] < 0.03, result
