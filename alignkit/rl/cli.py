"""`alignkit rl`: a cat learns a room, and exact planning says how well it did.

    alignkit rl --env cat --algo ppo
    alignkit rl --env cat --algo q_learning --episodes 500 --seed 1 --output_dir runs/rl
    alignkit rl --env cat --algo value_iteration --slip 0.2

Prints the room, the optimal return V*(start) from value iteration on the exact
model, the return of the training episodes as they go, the learned policy as arrows
and its value per cell (exact policy evaluation), and a summary of the greedy policy
over `eval_episodes` episodes; saves learning_curve.png and values.png in output_dir.
Returns are discounted: sum_t gamma^t r_{t+1}, the quantity V* is the maximum of.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

PLANNERS = ("value_iteration", "policy_iteration")


@dataclass
class RLConfig:
    """Reinforcement learning from first principles: the cat room, planners and learners."""

    env: Literal["cat"] = "cat"
    """The environment: the cat room (its map is `room`)."""
    algo: Literal["value_iteration", "policy_iteration", "q_learning", "sarsa", "reinforce", "a2c", "ppo"] = "ppo"
    """Exact planner (value_iteration, policy_iteration) or learner."""
    episodes: int = 0
    """Training episodes (0: the learner's default)."""
    seed: int = 0
    """Seed of the learner and of the room's slips."""
    output_dir: str = "runs/rl"
    """Where learning_curve.png and values.png are written."""
    room: str = ""
    """A room map file, a row per line: C start, . empty, # wall, B broom, T bathtub, M meat (empty: the default)."""
    slip: float = 0.0
    """Probability that the cat takes one of the other three actions, uniformly, instead of the chosen one."""
    gamma: float = 0.9
    """Discount factor."""
    max_steps: int = 100
    """Moves per episode before it is cut off."""
    exploration: Literal["epsilon", "boltzmann"] = "boltzmann"
    """q_learning / sarsa: annealed epsilon-greedy or Boltzmann exploration."""
    baseline: bool = True
    """reinforce: subtract a learned V(s) from the return."""
    eval_episodes: int = 200
    """Episodes of the final greedy policy in the summary."""


def learner_config(cfg: RLConfig):
    """The learner's own config with the command line's choices applied."""
    from alignkit.rl import learners

    if cfg.algo in ("q_learning", "sarsa"):
        out = learners.TabularConfig(exploration=cfg.exploration)
    elif cfg.algo == "reinforce":
        out = learners.ReinforceConfig(baseline=cfg.baseline)
    else:
        out = {"a2c": learners.A2CConfig, "ppo": learners.PPOConfig}[cfg.algo]()
    return dataclasses.replace(out, episodes=cfg.episodes) if cfg.episodes else out


def plot_curve(returns: list[float], optimal: float, path: Path, title: str, xlabel: str, label: str) -> Path:
    """One value per episode or sweep, its moving average when there are many, and the optimum (dashed)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    x = np.arange(1, len(returns) + 1)
    window = max(1, len(returns) // 50)
    if window == 1:
        ax.plot(x, returns, marker="o", label=label)
    else:
        ax.plot(x, returns, lw=0.6, alpha=0.35, label=label)
        smooth = np.convolve(returns, np.ones(window) / window, mode="valid")
        ax.plot(x[window - 1 :], smooth, lw=1.8, label=f"mean of {window}")
    ax.axhline(optimal, color="k", ls="--", lw=1, label=f"optimal {optimal:.3f}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("discounted return")
    ax.set_title(title)
    ax.legend(loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def run(cfg: RLConfig) -> dict:
    """Plan or learn on the room, print the maps and the summary, write the two PNGs."""
    import torch

    from alignkit.config import ConfigError
    from alignkit.rl import learners
    from alignkit.rl.gridworld import (
        DEFAULT_ROOM, CatRoom, load_room, plot_values, render_policy, render_room, render_values,
    )
    from alignkit.rl.planning import one_hot_policy, policy_evaluation, policy_iteration, value_iteration

    try:
        room = load_room(cfg.room) if cfg.room else DEFAULT_ROOM
    except (OSError, ValueError) as e:
        raise ConfigError(f"{cfg.room}: {e}") from None
    try:
        env = CatRoom(room, slip=cfg.slip, gamma=cfg.gamma, max_steps=cfg.max_steps)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not cfg.gamma < 1:
        raise ConfigError("gamma must be < 1 for exact planning (the reference every learner is judged against)")
    if cfg.episodes < 0 or cfg.eval_episodes < 1:
        raise ConfigError(f"episodes must be >= 0 and eval_episodes >= 1, got {cfg.episodes} and {cfg.eval_episodes}")
    model = env.model()
    optimal = value_iteration(model)
    v_star = float(optimal.values[env.start])
    print(f"== the cat room: {env.shape[0]}x{env.shape[1]}, slip {cfg.slip}, gamma {cfg.gamma}, "
          f"at most {cfg.max_steps} moves per episode ==")
    print(render_room(env))
    print(f"optimal return from the start (value iteration): V*(start) = {v_star:.3f}", flush=True)

    out = Path(cfg.output_dir)
    start = time.perf_counter()
    own_values = None
    if cfg.algo in PLANNERS:
        plan = optimal if cfg.algo == "value_iteration" else policy_iteration(model)
        actions, curve = plan.actions, [float(v[env.start]) for v in plan.history]
        if cfg.algo == "value_iteration":
            xlabel, trained = "sweep", f"{plan.iterations} sweeps"
        else:
            xlabel, trained = "policy (improvement step)", f"{plan.iterations} policies evaluated"
    else:
        lcfg = learner_config(cfg)
        every = max(1, lcfg.episodes // 10)
        curve = []

        def log(n: int, ret: float) -> None:
            curve.append(ret)
            if n % every == 0 or n == lcfg.episodes:
                recent = curve[-every:]
                print(f"episode {n:6d}  return {ret:7.3f}  mean of last {len(recent)} {np.mean(recent):7.3f}  "
                      f"optimal {v_star:.3f}", flush=True)

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # 20-state tables: more threads only add overhead
        try:
            result = learners.LEARNERS[cfg.algo](env, lcfg, seed=cfg.seed, log=log)
        finally:
            torch.set_num_threads(threads)
        actions, own_values, xlabel = result.actions, result.values, "episode"
        trained = f"{lcfg.episodes} episodes"
    seconds = time.perf_counter() - start

    values = policy_evaluation(model, one_hot_policy(actions))
    print("learned policy (greedy):" if cfg.algo not in PLANNERS else f"optimal policy ({cfg.algo}):")
    print(render_policy(env, actions))
    print("V of this policy per cell (exact policy evaluation):")
    print(render_values(env, values))
    if own_values is not None:
        print("the agent's own estimate of V:")
        print(render_values(env, own_values))
    ev = learners.evaluate(env, one_hot_policy(actions), cfg.eval_episodes, seed=cfg.seed + 1)
    label = "V(start) of this sweep / policy" if cfg.algo in PLANNERS else "return of the episode"
    curve_png = plot_curve(curve, v_star, out / "learning_curve.png", f"{cfg.algo} on the cat room", xlabel, label)
    values_png = plot_values(env, values, actions, out / "values.png", f"V of the {cfg.algo} policy")
    share = ev["return"] / v_star if v_star else float("nan")
    print(f"== rl {cfg.algo} finished: {trained} in {seconds:.1f} s; greedy policy over {cfg.eval_episodes} episodes: "
          f"return {ev['return']:.3f} ± {ev['stderr']:.3f} = {100 * share:.1f}% of optimal {v_star:.3f}; "
          f"meat {100 * ev['meat']:.0f}%, bathtub {100 * ev['bathtub']:.0f}% ==")
    print(f"wrote {curve_png}, {values_png}")
    return {"optimal": v_star, "eval": ev, "actions": actions, "values": values, "curve": curve,
            "files": [curve_png, values_png]}


def main(argv: list[str] | None = None) -> dict:
    from alignkit.config import parse_config

    return run(parse_config(RLConfig, sys.argv[1:] if argv is None else argv, prog="alignkit rl"))
