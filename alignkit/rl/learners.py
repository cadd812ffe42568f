"""Learners for the cat room: Q-learning and SARSA on a table; REINFORCE, A2C and PPO on torch policies.

    alignkit rl --env cat --algo q_learning
    alignkit rl --env cat --algo ppo --episodes 3000 --seed 1

Value-based learners keep a table Q[s, a] and act epsilon-greedily or by Boltzmann
exploration, both annealed. Policy-based learners keep pi(a | s) as a small torch
module over the one-hot state, and their losses are the language-model trainers'
own functions: an episode is a sequence and a move is a token, so a batch of E
episodes padded to [E, T] with a mask is exactly a batch of E completions.

    log pi(a_t | s_t), H_t   token_logprobs, entropy_from_logits   (alignkit.ops.logprobs)
    A_t and R_t              gae(rewards, values, mask, gamma, lam) (alignkit.ops.advantages)
    policy loss              clipped_policy_loss                    (alignkit.losses.policy)
    value loss (PPO)         clipped_value_loss                     (alignkit.losses.policy)
    reduction                aggregate(loss, mask, "token")         (alignkit.losses.policy)

With one update per batch, pi_old = pi and the ratio is 1, where the clipped
surrogate's gradient is -A grad log pi: the REINFORCE gradient. So REINFORCE and A2C
call clipped_policy_loss(logp, logp.detach(), ...), as alignkit's GRPO and RLOO do;
PPO makes several passes over a batch, and there the clip acts. The advantages differ:

    REINFORCE              A_t = G_t = sum_k gamma^k r_{t+k}       gae with V = 0, lam = 1
    REINFORCE + baseline   A_t = G_t - V(s_t)                      gae with the critic, lam = 1
    A2C                    A_t = sum_k (gamma lam)^k delta_{t+k}   gae with the critic, lam < 1
    PPO                    the same, whitened, clipped surrogate, several epochs
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from alignkit.losses import aggregate, clipped_policy_loss, clipped_value_loss
from alignkit.ops import entropy_from_logits, gae, masked_whiten, token_logprobs
from alignkit.rl.gridworld import CatRoom
from alignkit.rl.planning import one_hot_policy

Log = Callable[[int, float], None]
"""Called after every training episode with (episodes so far, that episode's discounted return)."""


@dataclass
class LearnResult:
    probs: np.ndarray
    """The learned policy pi(a | s) without exploration, [S, A] (one-hot for the tabular learners)."""
    returns: list[float]
    """The discounted return of every training episode, in order."""
    values: np.ndarray | None
    """The agent's own estimate of V(s), [S]: max_a Q, or the critic; None without one."""

    @property
    def actions(self) -> np.ndarray:
        """The greedy policy argmax_a pi(a | s), [S]."""
        return self.probs.argmax(axis=1)


# --- episodes ------------------------------------------------------------------------------


@dataclass
class Episodes:
    """E episodes padded to the longest, T moves: the layout of E completions of T tokens."""

    states: Tensor
    """s_t, long [E, T] (0 after an episode's end)."""
    actions: Tensor
    """a_t, long [E, T]."""
    rewards: Tensor
    """r_{t+1}, the reward of the move a_t, float [E, T]."""
    mask: Tensor
    """True at the moves of each episode, bool [E, T]."""
    final_states: Tensor
    """The state after each episode's last move, long [E]."""
    truncated: Tensor
    """The episode hit the step limit instead of ending, bool [E]."""
    returns: Tensor
    """Discounted return sum_t gamma^t r_{t+1} of each episode, float64 [E]."""


def run_episodes(env: CatRoom, probs: np.ndarray, n: int, rng: np.random.Generator) -> Episodes:
    """n episodes from env.reset(), acting with pi(a | s) = probs[s, a] ([S, A], rows sum to 1)."""
    cdf = np.cumsum(probs, axis=1)
    cdf /= cdf[:, -1:]  # float rounding must not leave a gap above the last action
    runs, finals, truncs = [], [], []
    for _ in range(n):
        s, _ = env.reset()
        steps, done, truncated = [], False, False
        while not (done or truncated):
            a = int(np.searchsorted(cdf[s], rng.random(), side="right"))
            s_next, r, done, truncated, _ = env.step(a)
            steps.append((s, a, r))
            s = s_next
        runs.append(steps)
        finals.append(s)
        truncs.append(truncated)
    T = max(len(steps) for steps in runs)
    states = torch.zeros(n, T, dtype=torch.long)
    actions = torch.zeros(n, T, dtype=torch.long)
    rewards = torch.zeros(n, T)
    mask = torch.zeros(n, T, dtype=torch.bool)
    for e, steps in enumerate(runs):
        ss, aa, rr = zip(*steps)
        states[e, : len(steps)] = torch.tensor(ss)
        actions[e, : len(steps)] = torch.tensor(aa)
        rewards[e, : len(steps)] = torch.tensor(rr)
        mask[e, : len(steps)] = True
    returns = (rewards.double() * env.gamma ** torch.arange(T, dtype=torch.float64)).sum(dim=1)  # 0 after the end
    return Episodes(states, actions, rewards, mask, torch.tensor(finals), torch.tensor(truncs), returns)


def evaluate(env: CatRoom, probs: np.ndarray, episodes: int = 200, seed: int = 0) -> dict[str, float]:
    """The policy probs [S, A] over `episodes` episodes: mean discounted return, its
    standard error, and the fractions that end at the meat and in the bathtub.
    Pass one_hot_policy(actions) to evaluate the greedy policy.
    """
    env.reset(seed=seed)
    batch = run_episodes(env, probs, episodes, np.random.default_rng(seed))
    ended = ~batch.truncated
    final = np.array([env.symbols[s] for s in batch.final_states.tolist()])
    return {
        "return": float(batch.returns.mean()),
        "stderr": float(batch.returns.std() / episodes**0.5) if episodes > 1 else 0.0,
        "meat": float((ended.numpy() & (final == "M")).mean()),
        "bathtub": float((ended.numpy() & (final == "T")).mean()),
    }


# --- tabular: Q-learning and SARSA -----------------------------------------------------------


@dataclass
class TabularConfig:
    """Q-learning / SARSA on a table Q[s, a] that starts at 0."""

    episodes: int = 1000
    """Training episodes."""
    alpha: float = 0.5
    """Step size of the TD update Q <- Q + alpha (target - Q)."""
    exploration: Literal["epsilon", "boltzmann"] = "boltzmann"
    """epsilon-greedy, or Boltzmann (softmax of Q / temperature)."""
    epsilon_start: float = 1.0
    """Probability of a uniformly random action at the first episode."""
    epsilon_end: float = 0.0
    """... and after the decay."""
    temperature_start: float = 5.0
    """Boltzmann temperature at the first episode (in reward units)."""
    temperature_end: float = 0.05
    """... and after the decay."""
    decay_fraction: float = 0.5
    """Fraction of the episodes over which epsilon / temperature fall linearly from start to end."""


def linear_schedule(start: float, end: float, progress: float) -> float:
    """start + (end - start) min(progress, 1): the value after `progress` of the decay."""
    return start + (end - start) * min(progress, 1.0)


def greedy(q_row: np.ndarray, rng: np.random.Generator) -> int:
    """argmax_a Q(s, a), ties broken at random (always taking the first would make a
    zero table walk into the first wall forever)."""
    best = np.flatnonzero(q_row == q_row.max())
    return int(best[0] if len(best) == 1 else rng.choice(best))


def epsilon_greedy(q_row: np.ndarray, epsilon: float, rng: np.random.Generator) -> int:
    """A uniformly random action with probability epsilon, else greedy(q_row)."""
    if rng.random() < epsilon:
        return int(rng.integers(len(q_row)))
    return greedy(q_row, rng)


def boltzmann(q_row: np.ndarray, temperature: float, rng: np.random.Generator) -> int:
    """An action drawn from pi(a) = exp(Q(s, a) / tau) / sum_b exp(Q(s, b) / tau)."""
    p = np.exp((q_row - q_row.max()) / temperature)  # shifted: exp cannot overflow
    cdf = np.cumsum(p)
    return min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), len(q_row) - 1)


def explore(cfg: TabularConfig, q_row: np.ndarray, progress: float, rng: np.random.Generator) -> int:
    """The behaviour policy's action after `progress` (0 to 1, then held) of the decay."""
    if cfg.exploration == "epsilon":
        return epsilon_greedy(q_row, linear_schedule(cfg.epsilon_start, cfg.epsilon_end, progress), rng)
    return boltzmann(q_row, linear_schedule(cfg.temperature_start, cfg.temperature_end, progress), rng)


def td_target(reward: float, q_next: np.ndarray, a_next: int, gamma: float, terminated: bool, sarsa: bool) -> float:
    """The one line where SARSA and Q-learning differ:

        SARSA (on-policy):       r + gamma Q(s', a'),        a' the action the cat will take
        Q-learning (off-policy): r + gamma max_b Q(s', b)

    and r alone when s' ends the episode (a truncated episode still bootstraps:
    the step limit is not a state of the world).
    """
    if terminated:
        return reward
    return reward + gamma * (q_next[a_next] if sarsa else q_next.max())


def _td_control(env: CatRoom, cfg: TabularConfig, seed: int, log: Log | None, sarsa: bool) -> LearnResult:
    rng = np.random.default_rng(seed)
    q = np.zeros((env.n_states, env.action_space.n))
    env.reset(seed=seed)
    returns = []
    for episode in range(cfg.episodes):
        progress = episode / max(1.0, cfg.decay_fraction * cfg.episodes)
        s, _ = env.reset()
        a = explore(cfg, q[s], progress, rng)
        ret, discount, done = 0.0, 1.0, False
        while not done:
            s_next, r, terminated, truncated, _ = env.step(a)
            a_next = explore(cfg, q[s_next], progress, rng)
            q[s, a] += cfg.alpha * (td_target(r, q[s_next], a_next, env.gamma, terminated, sarsa) - q[s, a])
            ret += discount * r
            discount *= env.gamma
            s, a, done = s_next, a_next, terminated or truncated
        returns.append(ret)
        if log:
            log(len(returns), ret)
    probs = one_hot_policy(q.argmax(axis=1), q.shape[1])
    return LearnResult(probs=probs, returns=returns, values=q.max(axis=1))


def q_learning(env: CatRoom, cfg: TabularConfig | None = None, seed: int = 0, log: Log | None = None) -> LearnResult:
    """Tabular Q-learning (Watkins 1989): Q(s, a) += alpha (r + gamma max_b Q(s', b) - Q(s, a))."""
    return _td_control(env, cfg or TabularConfig(), seed, log, sarsa=False)


def sarsa(env: CatRoom, cfg: TabularConfig | None = None, seed: int = 0, log: Log | None = None) -> LearnResult:
    """Tabular SARSA (Rummery & Niranjan 1994): Q(s, a) += alpha (r + gamma Q(s', a') - Q(s, a))."""
    return _td_control(env, cfg or TabularConfig(), seed, log, sarsa=True)


# --- policy gradient: REINFORCE, A2C, PPO ---------------------------------------------------------


class StateNet(nn.Module):
    """A linear map of the one-hot state, out(s) = W[:, s]: one learned column per state.

    As the policy it outputs logits [..., A]; as the critic, V(s) in [..., 1].
    Initialised at 0, so the policy starts uniform and the critic at V = 0. No bias:
    a bias is shared by every state, and what the cat learns near the bathtub
    would leak into every other cell.
    """

    def __init__(self, n_states: int, n_out: int):
        super().__init__()
        self.n_states = n_states
        self.linear = nn.Linear(n_states, n_out, bias=False)
        nn.init.zeros_(self.linear.weight)

    def forward(self, states: Tensor) -> Tensor:
        return self.linear(nn.functional.one_hot(states, self.n_states).to(self.linear.weight.dtype))


def policy_table(policy: StateNet) -> np.ndarray:
    """pi(a | s) for every state, float64 [S, A]."""
    with torch.no_grad():
        return torch.softmax(policy(torch.arange(policy.n_states)).double(), dim=-1).numpy()


def value_table(value: StateNet) -> np.ndarray:
    """V(s) for every state, float64 [S]."""
    with torch.no_grad():
        return value(torch.arange(value.n_states)).squeeze(-1).double().numpy()


def policy_terms(policy: StateNet, states: Tensor, actions: Tensor) -> tuple[Tensor, Tensor]:
    """log pi(a_t | s_t) and the entropy H(pi(. | s_t)), each [E, T], from logits [E, T, A]."""
    logits = policy(states)
    return token_logprobs(logits, actions), entropy_from_logits(logits)


def bootstrap_truncated(batch: Episodes, final_values: Tensor, gamma: float) -> Tensor:
    """The rewards [E, T] with gamma V(s_T) added to the last move of each truncated episode.

    gae treats a row's end as the end of the episode (V = 0 after it); a step limit
    is not, so a truncated episode's value is carried in through its last reward.
    """
    rewards = batch.rewards.clone()
    rows = torch.nonzero(batch.truncated).squeeze(-1)
    last = batch.mask.sum(dim=1) - 1
    rewards[rows, last[rows]] += gamma * final_values[rows]
    return rewards


@dataclass
class ReinforceConfig:
    """REINFORCE (Williams 1992), with or without a learned baseline V(s)."""

    episodes: int = 2000
    """Training episodes."""
    batch_episodes: int = 8
    """Episodes per gradient step."""
    lr: float = 0.1
    """Adam learning rate (policy and baseline)."""
    baseline: bool = True
    """Subtract a learned V(s_t) from the return (variance reduction, no bias)."""
    entropy_coef: float = 0.05
    """Weight of the entropy bonus."""


@dataclass
class A2CConfig:
    """Advantage actor-critic (synchronous A3C, Mnih et al. 2016): one update per batch."""

    episodes: int = 2000
    """Training episodes."""
    batch_episodes: int = 8
    """Episodes per gradient step."""
    lr: float = 0.1
    """Adam learning rate of the actor."""
    critic_lr: float = 0.5
    """Adam learning rate of the critic (V is in reward units, up to 10 here: it must move faster)."""
    lam: float = 0.9
    """GAE lambda: 0 is the one-step TD advantage delta_t, 1 the Monte-Carlo G_t - V(s_t)."""
    entropy_coef: float = 0.05
    """Weight of the entropy bonus."""


@dataclass
class PPOConfig:
    """PPO (Schulman et al. 2017): clipped surrogate, GAE, several epochs per batch."""

    episodes: int = 2000
    """Training episodes."""
    batch_episodes: int = 16
    """Episodes per rollout batch."""
    lr: float = 0.02
    """Adam learning rate of the actor."""
    critic_lr: float = 0.5
    """Adam learning rate of the critic (V is in reward units, up to 10 here: it must move faster)."""
    lam: float = 0.95
    """GAE lambda."""
    clip_eps: float = 0.2
    """Clip range of the ratio pi / pi_old."""
    epochs: int = 4
    """Passes over each rollout batch."""
    minibatches: int = 4
    """Minibatches (of whole episodes) per pass."""
    vf_clip: float = 10.0
    """Clip range of V around its rollout-time value, in reward units (the meat is +10)."""
    entropy_coef: float = 0.05
    """Weight of the entropy bonus."""


def actor_critic(env: CatRoom, lr: float, critic_lr: float) -> tuple[StateNet, StateNet, torch.optim.Optimizer]:
    """A policy, a critic, and one Adam with a learning rate for each.

    They share no parameters, so a weight on the critic's loss would change nothing
    (Adam divides each parameter's step by its own gradient scale); the critic's
    learning rate is the knob instead.
    """
    policy, value = StateNet(env.n_states, env.action_space.n), StateNet(env.n_states, 1)
    groups = [{"params": policy.parameters()}, {"params": value.parameters(), "lr": critic_lr}]
    return policy, value, torch.optim.Adam(groups, lr=lr)


def _on_policy(
    env: CatRoom, policy: StateNet, value: StateNet | None, episodes: int, batch_episodes: int,
    seed: int, log: Log | None, update: Callable[[Episodes, np.random.Generator], None],
) -> LearnResult:
    """Sample batch_episodes episodes with the current policy, update(batch, rng), repeat."""
    rng = np.random.default_rng(seed)
    env.reset(seed=seed)
    returns: list[float] = []
    while len(returns) < episodes:
        batch = run_episodes(env, policy_table(policy), min(batch_episodes, episodes - len(returns)), rng)
        update(batch, rng)
        for ret in batch.returns.tolist():
            returns.append(ret)
            if log:
                log(len(returns), ret)
    return LearnResult(policy_table(policy), returns, None if value is None else value_table(value))


def _minimise(optimizer: torch.optim.Optimizer, per_step: Tensor, mask: Tensor) -> None:
    """One optimiser step on the mean over the masked-in moves of a per-move loss [E, T]."""
    num, den = aggregate(per_step, mask, "token")
    optimizer.zero_grad()
    (num / den).backward()
    optimizer.step()


def reinforce(env: CatRoom, cfg: ReinforceConfig | None = None, seed: int = 0, log: Log | None = None) -> LearnResult:
    """REINFORCE: grad J = E[sum_t grad log pi(a_t | s_t) (G_t - b(s_t))], b = V or 0.

    The gamma^t factor of the exact discounted gradient is dropped, as in most
    implementations (it would make late moves learn almost nothing).
    """
    cfg = cfg or ReinforceConfig()
    policy = StateNet(env.n_states, env.action_space.n)
    value = StateNet(env.n_states, 1) if cfg.baseline else None
    params = [*policy.parameters(), *(value.parameters() if value is not None else [])]
    optimizer = torch.optim.Adam(params, lr=cfg.lr)

    def update(batch: Episodes, rng) -> None:
        logp, entropy = policy_terms(policy, batch.states, batch.actions)
        values = value(batch.states).squeeze(-1) if value is not None else torch.zeros_like(logp)
        # lam = 1: A_t = G_t - V(s_t) and R_t = G_t, the Monte-Carlo return
        adv, ret = gae(batch.rewards, values.detach(), batch.mask, env.gamma, lam=1.0)
        pg, _ = clipped_policy_loss(logp, logp.detach(), adv, batch.mask)  # ratio 1: -A grad log pi
        per_step = pg - cfg.entropy_coef * entropy
        if value is not None:
            per_step = per_step + 0.5 * (values - ret) ** 2
        _minimise(optimizer, per_step, batch.mask)

    return _on_policy(env, policy, value, cfg.episodes, cfg.batch_episodes, seed, log, update)


def a2c(env: CatRoom, cfg: A2CConfig | None = None, seed: int = 0, log: Log | None = None) -> LearnResult:
    """A2C: the actor follows -A_t grad log pi with GAE(lambda) advantages from the critic,
    which regresses V(s_t) on R_t = A_t + V(s_t); one gradient step per batch."""
    cfg = cfg or A2CConfig()
    policy, value, optimizer = actor_critic(env, cfg.lr, cfg.critic_lr)

    def update(batch: Episodes, rng) -> None:
        logp, entropy = policy_terms(policy, batch.states, batch.actions)
        values = value(batch.states).squeeze(-1)
        with torch.no_grad():
            rewards = bootstrap_truncated(batch, value(batch.final_states).squeeze(-1), env.gamma)
        adv, ret = gae(rewards, values.detach(), batch.mask, env.gamma, cfg.lam)
        pg, _ = clipped_policy_loss(logp, logp.detach(), adv, batch.mask)  # ratio 1: -A grad log pi
        per_step = pg + 0.5 * (values - ret) ** 2 - cfg.entropy_coef * entropy
        _minimise(optimizer, per_step, batch.mask)

    return _on_policy(env, policy, value, cfg.episodes, cfg.batch_episodes, seed, log, update)


def ppo(env: CatRoom, cfg: PPOConfig | None = None, seed: int = 0, log: Log | None = None) -> LearnResult:
    """PPO: per batch, freeze pi_old and V_old, compute whitened GAE advantages once, then
    `epochs` passes of minibatch steps on the clipped surrogate + the clipped
    value loss - entropy_coef x entropy: the two loss terms of `alignkit ppo`, and an entropy
    bonus that keeps the cat trying the door while it still fears the bathtub."""
    cfg = cfg or PPOConfig()
    policy, value, optimizer = actor_critic(env, cfg.lr, cfg.critic_lr)

    def update(batch: Episodes, rng: np.random.Generator) -> None:
        with torch.no_grad():
            old_logp, _ = policy_terms(policy, batch.states, batch.actions)
            old_values = value(batch.states).squeeze(-1)
            rewards = bootstrap_truncated(batch, value(batch.final_states).squeeze(-1), env.gamma)
        adv, ret = gae(rewards, old_values, batch.mask, env.gamma, cfg.lam)
        adv = masked_whiten(adv, batch.mask)
        for _ in range(cfg.epochs):
            for rows in np.array_split(rng.permutation(len(adv)), cfg.minibatches):
                rows = torch.from_numpy(rows)
                mask = batch.mask[rows]
                logp, entropy = policy_terms(policy, batch.states[rows], batch.actions[rows])
                pg, _ = clipped_policy_loss(logp, old_logp[rows], adv[rows], mask, cfg.clip_eps)
                values = value(batch.states[rows]).squeeze(-1)
                vf, _ = clipped_value_loss(values, old_values[rows], ret[rows], cfg.vf_clip, mask=mask)
                _minimise(optimizer, pg + vf - cfg.entropy_coef * entropy, mask)

    return _on_policy(env, policy, value, cfg.episodes, cfg.batch_episodes, seed, log, update)


LEARNERS: dict[str, Callable[..., LearnResult]] = {
    "q_learning": q_learning,
    "sarsa": sarsa,
    "reinforce": reinforce,
    "a2c": a2c,
    "ppo": ppo,
}
