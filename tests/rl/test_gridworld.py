"""The cat room: the gymnasium Env API, its moves and rewards, and its exact model against sampling."""

import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from alignkit.rl.gridworld import DEFAULT_ROOM, CatRoom, parse_room, render_policy, render_room, render_values

UP, DOWN, LEFT, RIGHT = range(4)


def state(env, row, col):
    return env.index[(row, col)]


@pytest.mark.parametrize("kwargs", [{}, {"render_mode": "ansi"}, {"slip": 0.3, "max_steps": 20}])
def test_check_env_passes_with_warnings_as_errors(kwargs):
    env = gym.make("alignkit/CatRoom-v0", **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a gymnasium API warning fails the test
        check_env(env.unwrapped)
    obs, info = env.reset(seed=0)
    assert env.observation_space.contains(obs) and obs == state(env.unwrapped, 0, 0)


def test_a_move_into_a_wall_or_off_the_grid_leaves_the_cat_in_place():
    env = CatRoom()
    env.reset(seed=0)
    for action in (UP, LEFT):  # off the grid from the top-left corner
        s, r, terminated, truncated, info = env.step(action)
        assert (s, r, terminated, truncated, info["cell"]) == (state(env, 0, 0), 0.0, False, False, "C")
    env.state = state(env, 0, 2)
    assert env.step(RIGHT)[:2] == (state(env, 0, 2), 0.0)  # (0, 3) is a wall
    env.state = state(env, 2, 3)  # the broom, walls above and below
    assert env.step(UP)[:3] == (state(env, 2, 3), -1.0, False)  # standing on the broom stings again
    env.state = state(env, 0, 0)
    assert env.step(RIGHT)[:2] == (state(env, 0, 1), 0.0)


def test_rewards_and_episode_ends():
    env = CatRoom()
    env.reset(seed=0)
    env.state = state(env, 2, 2)
    assert env.step(RIGHT)[:4] == (state(env, 2, 3), -1.0, False, False)  # onto the broom
    env.state = state(env, 2, 2)
    s, r, terminated, truncated, info = env.step(DOWN)
    assert (r, terminated, truncated, info["cell"]) == (-5.0, True, False, "T")
    with pytest.raises(RuntimeError, match="reset"):
        env.step(UP)
    assert env.reset()[0] == env.start  # the cat respawns at the start
    env.state = state(env, 3, 4)
    s, r, terminated, truncated, info = env.step(DOWN)
    assert (r, terminated, truncated, info["cell"]) == (10.0, True, False, "M")


def test_step_limit_truncates_and_does_not_terminate():
    env = CatRoom(max_steps=3)
    env.reset(seed=0)
    flags = [env.step(UP)[2:4] for _ in range(3)]
    assert flags == [(False, False), (False, False), (False, True)]


def test_model_matches_the_documented_slip():
    # From (2, 2) with slip 0.3, "right": the broom with 0.7, and each other action's cell
    # with 0.1: up (1, 2), down the bathtub (3, 2), left (2, 1).
    env = CatRoom(slip=0.3)
    m = env.model()
    s = state(env, 2, 2)
    expected = {state(env, 2, 3): 0.7, state(env, 1, 2): 0.1, state(env, 3, 2): 0.1, state(env, 2, 1): 0.1}
    for s2, p in expected.items():
        assert m.P[s, RIGHT, s2] == pytest.approx(p)
    assert m.P.sum(axis=-1) == pytest.approx(np.ones((env.n_states, 4)))
    assert m.expected_reward[s, RIGHT] == pytest.approx(0.7 * -1 + 0.1 * -5)
    # terminal states are absorbing with reward 0
    tub = state(env, 3, 2)
    assert m.terminal[tub] and (m.P[tub, :, tub] == 1).all() and (m.R[tub] == 0).all()
    # and the sampled frequencies agree with P within 4 standard errors
    env.reset(seed=0)
    n, counts = 20_000, np.zeros(env.n_states)
    for _ in range(n):
        env.state = s
        counts[env.step(RIGHT)[0]] += 1
    p = m.P[s, RIGHT]
    assert np.all(np.abs(counts / n - p) <= 4 * np.sqrt(p * (1 - p) / n) + 1e-12)


def test_rendering():
    env = CatRoom()
    assert render_room(env) == "\n".join(line.strip() for line in DEFAULT_ROOM.strip().splitlines())
    env.reset(seed=0)
    env.step(DOWN)
    assert render_room(env, env.state).splitlines()[:2] == [". . . # .", "C # . # ."]
    arrows = render_policy(env, np.full(env.n_states, RIGHT)).splitlines()
    assert arrows[2] == "→ → → → →" and arrows[3] == "→ → T # →" and arrows[4] == "→ → → # M"
    values = render_values(env, np.arange(env.n_states, dtype=float)).splitlines()
    assert values[0].split() == ["0.00", "1.00", "2.00", "####", "3.00"]


@pytest.mark.parametrize("text, message", [
    ("C . #\n. M", "row 2 has 2 cells"),
    ("C . X\n. . M", "row 1, column 3: unknown symbol 'X'"),
    (". . .\n. . M", "exactly one cat start"),
    ("C . .\n. . .", "at least one meat"),
])
def test_bad_maps_are_named(text, message):
    with pytest.raises(ValueError, match=message):
        parse_room(text)
