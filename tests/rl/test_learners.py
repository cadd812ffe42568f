"""Learners on the cat room reach the planner's optimum, and share the LM trainers' loss code.

Every learning test trains with a fixed seed and evaluates the GREEDY policy (argmax_a
pi(a | s), or argmax_a Q(s, a)) over 200 episodes against V*(start) from value iteration.
"""

import numpy as np
import pytest
import torch

import alignkit.train.ppo as lm_ppo
from alignkit.rl import learners
from alignkit.rl.gridworld import CatRoom
from alignkit.rl.planning import one_hot_policy, value_iteration

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def room():
    env = CatRoom()
    return env, value_iteration(env.model()).values[env.start]


def greedy_share(env, result, optimal):
    """Mean return of the greedy policy over 200 episodes, as a share of V*(start)."""
    return learners.evaluate(env, one_hot_policy(result.actions), episodes=200, seed=1)["return"] / optimal


@pytest.mark.parametrize("algo, cfg", [
    ("q_learning", learners.TabularConfig(exploration="epsilon")),
    ("q_learning", learners.TabularConfig(exploration="boltzmann")),
    ("sarsa", learners.TabularConfig(exploration="boltzmann")),
    ("reinforce", learners.ReinforceConfig(baseline=True)),
    ("reinforce", learners.ReinforceConfig(baseline=False)),
    ("a2c", learners.A2CConfig()),
    ("ppo", learners.PPOConfig()),
])
def test_learner_reaches_95_percent_of_the_optimal_return(room, algo, cfg):
    env, optimal = room
    result = learners.LEARNERS[algo](env, cfg, seed=0)
    assert len(result.returns) == cfg.episodes
    assert np.mean(result.returns[:50]) < 0.5 * optimal  # it starts out not knowing the room
    assert greedy_share(env, result, optimal) >= 0.95


# A room built for exploration: the meat lies behind four brooms. Every broom stings at once
# and the meat pays only at the far end (crossing is worth it: V*(start) = 2.53 > 0).
BROOM_CORRIDOR = """\
. . . # # # # #
C . . B B B B M
. . . # # # # #
"""


def test_exploration_matters():
    # A greedy cat from a zero table tries a broom, gets -1, and from then on prefers the
    # 0-valued moves of the left room, which stay at 0 forever: it never learns the meat.
    # An epsilon-greedy cat keeps stepping on brooms at random until it reaches the meat once.
    env = CatRoom(BROOM_CORRIDOR, max_steps=50)
    optimal = value_iteration(env.model()).values[env.start]
    greedy_cfg = learners.TabularConfig(episodes=300, exploration="epsilon", epsilon_start=0.0, epsilon_end=0.0)
    explore_cfg = learners.TabularConfig(episodes=300, exploration="epsilon", epsilon_start=1.0, epsilon_end=0.0)
    lucky = 0
    for seed in range(10):
        greedy = learners.q_learning(env, greedy_cfg, seed=seed)
        # the learned greedy policy never reaches the meat, and in training it rarely did: a
        # lucky first walk over the brooms can reach it once, but by then the first broom's
        # Q is negative and the cat never crosses again to carry the news back
        assert learners.evaluate(env, one_hot_policy(greedy.actions), 200, seed=1)["meat"] == 0, seed
        lucky += max(greedy.returns) > 0
        explorer = learners.q_learning(env, explore_cfg, seed=seed)
        assert greedy_share(env, explorer, optimal) >= 0.95, seed
    assert lucky <= 2


def test_gridworld_ppo_shares_the_lm_trainers_functions():
    # the same objects, not copies
    from alignkit.models import forward

    for name in ("gae", "clipped_policy_loss", "clipped_value_loss", "aggregate"):
        assert getattr(learners, name) is getattr(lm_ppo, name), name
    # the LM trainers' entropy comes through token_stats (the full-logits path uses this function)
    assert learners.entropy_from_logits is forward.entropy_from_logits


def test_ppo_calls_the_shared_functions(monkeypatch):
    calls = {"gae": 0, "clipped_policy_loss": 0, "clipped_value_loss": 0}

    def spy(name):
        real = getattr(learners, name)

        def wrapped(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)

        return wrapped

    for name in calls:
        monkeypatch.setattr(learners, name, spy(name))
    learners.ppo(CatRoom(), learners.PPOConfig(episodes=32, batch_episodes=16, epochs=2, minibatches=2))
    assert calls == {"gae": 2, "clipped_policy_loss": 8, "clipped_value_loss": 8}


def test_clipped_surrogate_at_ratio_one_is_the_reinforce_gradient():
    # REINFORCE and A2C call clipped_policy_loss(logp, logp.detach(), A, mask): at ratio 1 its
    # gradient must be that of -A log pi, summed over the masked-in moves.
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 4, requires_grad=True)
    actions = torch.randint(0, 4, (3, 5))
    adv = torch.randn(3, 5)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    logp = learners.token_logprobs(logits, actions)
    loss, metrics = learners.clipped_policy_loss(logp, logp.detach(), adv, mask)
    (grad,) = torch.autograd.grad(loss.sum(), logits, retain_graph=True)
    (expected,) = torch.autograd.grad(-(adv * logp)[mask].sum(), logits)
    torch.testing.assert_close(grad, expected)
    assert metrics["clipfrac"].sum() == 0


def test_episode_batch_layout_and_returns(room):
    # the optimal policy's episodes: 8 moves, the broom on the 5th, the meat on the 8th
    env, optimal = room
    actions = value_iteration(env.model()).actions
    env.reset(seed=0)
    batch = learners.run_episodes(env, one_hot_policy(actions), 3, np.random.default_rng(0))
    assert batch.states.shape == batch.mask.shape == (3, 8) and batch.mask.all()
    assert batch.rewards[0].tolist() == [0, 0, 0, 0, -1, 0, 0, 10]
    assert batch.states[:, 0].tolist() == [env.start] * 3 and not batch.truncated.any()
    torch.testing.assert_close(batch.returns, torch.full((3,), optimal, dtype=torch.float64))
    # G_t from gae with V = 0 and lam = 1 is the discounted reward-to-go
    adv, ret = learners.gae(batch.rewards, torch.zeros(3, 8), batch.mask, env.gamma, 1.0)
    assert ret[0, 0].item() == pytest.approx(optimal, rel=1e-6)


def test_truncated_episode_bootstraps_from_the_critic():
    env = CatRoom(max_steps=2)
    env.reset(seed=0)
    up = np.tile([1.0, 0, 0, 0], (env.n_states, 1))  # bumps the top wall until cut off
    batch = learners.run_episodes(env, up, 2, np.random.default_rng(0))
    assert batch.truncated.all() and batch.mask.sum().item() == 4
    rewards = learners.bootstrap_truncated(batch, torch.tensor([3.0, 5.0]), gamma=0.9)
    assert rewards.tolist() == [[0.0, pytest.approx(2.7)], [0.0, pytest.approx(4.5)]]


def test_exploration_rules():
    rng = np.random.default_rng(0)
    q = np.array([0.0, 2.0, 1.0, 2.0])
    assert {learners.greedy(q, rng) for _ in range(200)} == {1, 3}  # ties broken at random
    assert {learners.epsilon_greedy(q, 0.0, rng) for _ in range(200)} == {1, 3}
    assert {learners.epsilon_greedy(q, 1.0, rng) for _ in range(200)} == {0, 1, 2, 3}
    counts = np.bincount([learners.boltzmann(q, 1.0, rng) for _ in range(20_000)], minlength=4) / 20_000
    p = np.exp(q) / np.exp(q).sum()
    np.testing.assert_allclose(counts, p, atol=0.015)
    assert {learners.boltzmann(q, 1e-3, rng) for _ in range(200)} <= {1, 3}
    assert learners.linear_schedule(1.0, 0.1, 0.5) == pytest.approx(0.55)
    assert learners.linear_schedule(1.0, 0.1, 2.0) == pytest.approx(0.1)
