"""Exact planning on a known model: policy evaluation, value iteration, policy iteration.

    alignkit rl --env cat --algo value_iteration

These are the reference every learner is judged against: given P(s' | s, a) and
R(s, a, s') (a `gridworld.Model`), they compute V and Q without a single episode.
Terminal states are absorbing with reward 0, so V = 0 there. Policies are tables:
`probs` [S, A] (a stochastic policy) or `actions` [S] (a deterministic one).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from alignkit.rl.gridworld import Model


def one_hot_policy(actions: np.ndarray, n_actions: int = 4) -> np.ndarray:
    """A deterministic policy (actions [S]) as probabilities [S, A]."""
    return np.eye(n_actions)[np.asarray(actions)]


def q_from_v(model: Model, values: np.ndarray) -> np.ndarray:
    """One Bellman backup: Q(s, a) = sum_s' P(s' | s, a) [R(s, a, s') + gamma V(s')].

    values [S]; returns [S, A].
    """
    return (model.P * (model.R + model.gamma * values[None, None, :])).sum(axis=-1)


def policy_evaluation(model: Model, probs: np.ndarray) -> np.ndarray:
    """V^pi, solved exactly from the Bellman expectation equation V = r_pi + gamma P_pi V:

        V^pi = (I - gamma P_pi)^-1 r_pi,   P_pi(s, s') = sum_a pi(a|s) P(s'|s, a),
                                           r_pi(s)     = sum_a pi(a|s) r(s, a).

    probs [S, A] (rows sum to 1). Returns V [S]. Needs gamma < 1 (with gamma = 1 a
    policy that never ends an episode has no finite value and the system is singular).
    """
    if not model.gamma < 1.0:
        raise ValueError(f"exact policy evaluation needs gamma < 1, got {model.gamma}")
    P_pi = np.einsum("sa,sat->st", probs, model.P)
    r_pi = (probs * model.expected_reward).sum(axis=1)
    return np.linalg.solve(np.eye(len(r_pi)) - model.gamma * P_pi, r_pi)


@dataclass
class PlanResult:
    values: np.ndarray
    """V [S]."""
    q: np.ndarray
    """Q [S, A]."""
    actions: np.ndarray
    """The greedy policy argmax_a Q(s, a), [S] (the first best action on ties)."""
    iterations: int
    """Sweeps (value iteration) or improvement steps (policy iteration) until convergence."""
    history: list[np.ndarray]
    """V after each sweep or of each policy in turn, [S] each: how the planner converged."""


def value_iteration(model: Model, tol: float = 1e-10, max_iterations: int = 100_000) -> PlanResult:
    """V*, Q* by repeated Bellman optimality backups (synchronous sweeps):

        V_{k+1}(s) = max_a sum_s' P(s' | s, a) [R(s, a, s') + gamma V_k(s')]

    from V_0 = 0, until max_s |V_{k+1}(s) - V_k(s)| < tol. The backup is a
    gamma-contraction, so the error of V_k is at most gamma / (1 - gamma) times
    the last change.
    """
    values = np.zeros(model.P.shape[0])
    history = []
    for k in range(1, max_iterations + 1):
        q = q_from_v(model, values)
        new = q.max(axis=1)
        delta = np.abs(new - values).max()
        values = new
        history.append(values)
        if delta < tol:
            break
    else:
        raise RuntimeError(f"value iteration did not converge in {max_iterations} sweeps (last change {delta:.3g})")
    q = q_from_v(model, values)
    return PlanResult(values=values, q=q, actions=q.argmax(axis=1), iterations=k, history=history)


def policy_iteration(model: Model, max_iterations: int = 1000) -> PlanResult:
    """Alternate exact evaluation and greedy improvement until the policy is stable:

        V^pi_k = policy_evaluation(pi_k);  pi_{k+1}(s) = argmax_a Q^pi_k(s, a).

    Starts from "always up". An action only replaces the current one when it is
    strictly better (by more than 1e-12), so ties cannot make it cycle. Each step
    improves V (policy improvement theorem); a finite MDP has finitely many
    deterministic policies, so it stops at an optimal one.
    """
    actions = np.zeros(model.P.shape[0], dtype=np.int64)
    history = []
    for k in range(1, max_iterations + 1):
        values = policy_evaluation(model, one_hot_policy(actions, model.P.shape[1]))
        history.append(values)
        q = q_from_v(model, values)
        current = np.take_along_axis(q, actions[:, None], axis=1)[:, 0]
        better = q.max(axis=1) > current + 1e-12
        if not better.any():
            return PlanResult(values=values, q=q, actions=actions, iterations=k, history=history)
        actions = np.where(better, q.argmax(axis=1), actions)
    raise RuntimeError(f"policy iteration did not converge in {max_iterations} steps")
