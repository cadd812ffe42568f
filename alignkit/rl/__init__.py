"""RL from first principles: the cat room, exact planning, and learners on the LM trainers' losses.

    alignkit rl --env cat --algo ppo

gridworld   the cat room as a gymnasium Env ("alignkit/CatRoom-v0") and its exact model P, R
planning    policy evaluation, value iteration, policy iteration on that model
learners    Q-learning, SARSA, REINFORCE, A2C, PPO (the last three on alignkit.ops / alignkit.losses)
cli         `alignkit rl`
"""

from alignkit.rl.gridworld import DEFAULT_ROOM, CatRoom, Model
from alignkit.rl.planning import policy_evaluation, policy_iteration, value_iteration

__all__ = ["DEFAULT_ROOM", "CatRoom", "Model", "policy_evaluation", "policy_iteration", "value_iteration"]
