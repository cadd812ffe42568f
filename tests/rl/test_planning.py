"""Exact planning on the cat room: hand-computed values, the optimal path, and V* against simulation."""

import numpy as np
import pytest

from alignkit.rl.gridworld import CatRoom
from alignkit.rl.learners import evaluate
from alignkit.rl.planning import one_hot_policy, policy_evaluation, policy_iteration, value_iteration

# The default room, gamma = 0.9, rewards on arrival: empty 0, broom -1, bathtub -5 (ends), meat +10 (ends).
#
#     C . . # .      row 0
#     . # . # .      row 1
#     . . . B .      row 2     the broom at (2, 3) is the only door through the wall
#     . . T # .      row 3
#     . . . # M      row 4
#
# By hand, walking back from the meat (V(terminal) = 0):
#   (3, 4): down onto the meat                    V = 10
#   (2, 4): down to (3, 4)                        V = 0 + 0.9 * 10    = 9
#   (2, 3) the broom: right to (2, 4)             V = 0 + 0.9 * 9     = 8.1
#   (2, 2): right onto the broom                  V = -1 + 0.9 * 8.1  = 6.29
#           (down into the bathtub would be -5; any other move only delays the same path)
#   (0, 4): down, down to (2, 4)                  V = 0.9^2 * 9       = 7.29
#   (0, 0) the start: four empty moves to (2, 2)  V = 0.9^4 * 6.29    = 0.6561 * 6.29 = 4.126869
HAND = {(3, 4): 10.0, (2, 4): 9.0, (2, 3): 8.1, (2, 2): 6.29, (0, 4): 7.29, (0, 0): 4.126869}


def test_value_iteration_matches_hand_values():
    env = CatRoom(gamma=0.9)
    result = value_iteration(env.model())
    for cell, v in HAND.items():
        assert result.values[env.index[cell]] == pytest.approx(v, abs=1e-9), cell
    tub, meat = env.index[(3, 2)], env.index[(4, 4)]
    assert result.values[tub] == result.values[meat] == 0.0


def test_optimal_policy_reaches_the_meat_and_never_steps_into_the_bathtub():
    env = CatRoom()
    actions = value_iteration(env.model()).actions
    # from every cell the cat may stand on, the optimal move never lands in the bathtub
    tub = env.index[(3, 2)]
    assert all(env.next_state[s, actions[s]] != tub for s in range(env.n_states) if not env.terminal[s])
    # and from the start it walks the shortest way, 8 moves, over the broom, to the meat
    s, _ = env.reset(seed=0)
    path = []
    for _ in range(20):
        s, r, terminated, truncated, info = env.step(actions[s])
        path.append(info["cell"])
        if terminated or truncated:
            break
    assert path[-1] == "M" and "T" not in path and len(path) == 8 and path.count("B") == 1


def test_policy_iteration_and_evaluation_agree_with_value_iteration():
    env = CatRoom(slip=0.1)
    m = env.model()
    vi, pi = value_iteration(m), policy_iteration(m)
    np.testing.assert_allclose(pi.values, vi.values, atol=1e-8)
    np.testing.assert_allclose(policy_evaluation(m, one_hot_policy(vi.actions)), vi.values, atol=1e-8)
    assert pi.iterations < 20
    # a stochastic policy's V satisfies the Bellman expectation equation V = r_pi + gamma P_pi V
    uniform = np.full((env.n_states, 4), 0.25)
    v = policy_evaluation(m, uniform)
    backup = (uniform * (m.P * (m.R + m.gamma * v)).sum(-1)).sum(1)
    np.testing.assert_allclose(v, backup, atol=1e-10)


def test_value_iteration_with_slip_equals_the_simulated_return():
    # slip 0.2: one move in five goes a random other way. The step limit is far beyond any
    # episode this policy plays, so the planner's infinite horizon is the simulator's.
    env = CatRoom(slip=0.2, max_steps=1000)
    result = value_iteration(env.model())
    v_star = result.values[env.start]
    sim = evaluate(env, one_hot_policy(result.actions), episodes=5000, seed=0)
    assert abs(sim["return"] - v_star) < 3 * sim["stderr"], (sim, v_star)
    assert v_star < 4.126869 - 0.5  # the slips cost something: this is not the deterministic room's value
    assert 0 < sim["bathtub"] < 0.2 and sim["meat"] > 0.8
