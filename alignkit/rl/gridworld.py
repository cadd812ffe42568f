"""The cat room: a gridworld MDP (S, A, P, R, gamma) behind the gymnasium Env API.

    alignkit rl --env cat --algo value_iteration

A cat walks a room drawn as text, one symbol per cell:

    C  the cat's start (an empty cell)     B  a broom: -1 on arrival
    .  an empty cell: 0 on arrival         T  the bathtub: -5, the episode ends
    #  a wall                              M  the meat: +10, the episode ends

States are the non-wall cells, numbered in reading order; actions are up, down,
left, right. A move into a wall or off the grid leaves the cat where it is. The
reward is that of the cell the cat lands in, so a move into a wall while standing
on the broom costs -1 again. With probability `slip` the floor is slippery: the cat
takes one of the three OTHER actions instead, uniformly at random, so

    P(s' | s, a) = (1 - slip) [move(s, a) = s'] + (slip / 3) sum_{b != a} [move(s, b) = s'].

An episode ends on the bathtub or the meat (terminated; the next reset puts the cat
back at C) or after `max_steps` moves (truncated). `model()` gives P, R and the
terminal flags as arrays for exact planning, where a terminal state is absorbing
with reward 0 and the step limit is ignored (an infinite-horizon discounted MDP).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np

ACTIONS = ("up", "down", "left", "right")
MOVES = ((-1, 0), (1, 0), (0, -1), (0, 1))  # (row, col) offsets, in ACTIONS order
ARROWS = "↑↓←→"
REWARDS = {".": 0.0, "C": 0.0, "B": -1.0, "T": -5.0, "M": 10.0}
TERMINAL = frozenset("TM")
SYMBOLS = frozenset(REWARDS) | {"#"}

# The default room: a wall with one door, and the broom lies in the doorway. The meat is
# 8 moves away, and every way to it crosses the broom (-1 on the 5th move, worth it for
# the +10 three moves later) just after passing beside the bathtub, one wrong step from -5.
DEFAULT_ROOM = """\
C . . # .
. # . # .
. . . B .
. . T # .
. . . # M
"""


@dataclass(frozen=True)
class Model:
    """The exact MDP of a room, for planning.

    P[s, a, s'] = P(s' | s, a), R[s, a, s'] = the reward of that transition,
    terminal[s] = the episode ends on arrival in s (absorbing, reward 0 after).
    Shapes: P, R [S, A, S]; terminal [S] bool.
    """

    P: np.ndarray
    R: np.ndarray
    terminal: np.ndarray
    gamma: float
    start: int

    @property
    def expected_reward(self) -> np.ndarray:
        """r(s, a) = sum_s' P(s' | s, a) R(s, a, s'), [S, A]."""
        return (self.P * self.R).sum(axis=-1)


def parse_room(text: str) -> list[str]:
    """The rows of a room map, spaces removed; ValueError naming the row and column of a fault.

    A valid room is rectangular, uses only the symbols C . # B T M, has exactly one C
    and at least one M.
    """
    rows = ["".join(line.split()) for line in text.strip("\n").splitlines()]
    rows = [r for r in rows if r]
    if not rows:
        raise ValueError("room map is empty")
    for i, row in enumerate(rows):
        if len(row) != len(rows[0]):
            raise ValueError(f"room map row {i + 1} has {len(row)} cells, row 1 has {len(rows[0])}")
        for j, ch in enumerate(row):
            if ch not in SYMBOLS:
                raise ValueError(f"room map row {i + 1}, column {j + 1}: unknown symbol {ch!r} (use C . # B T M)")
    text = "".join(rows)
    if text.count("C") != 1:
        raise ValueError(f"room map needs exactly one cat start C, found {text.count('C')}")
    if "M" not in text:
        raise ValueError("room map needs at least one meat cell M")
    return rows


def load_room(path: str | Path) -> str:
    """The text of a room map file (validated)."""
    text = Path(path).read_text(encoding="utf-8")
    parse_room(text)
    return text


class CatRoom(gym.Env):
    """The cat room as a gymnasium Env: Discrete(S) observations, Discrete(4) actions.

    room: the map text (default DEFAULT_ROOM); slip: probability of taking a random
    other action; gamma: the discount of the MDP (kept here for planning and for the
    learners, the dynamics do not use it); max_steps: moves per episode before the
    episode is truncated. step() returns info {"cell": the symbol landed on,
    "slipped": bool}.
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(
        self,
        room: str = DEFAULT_ROOM,
        slip: float = 0.0,
        gamma: float = 0.9,
        max_steps: int = 100,
        render_mode: str | None = None,
    ):
        if not 0.0 <= slip <= 1.0:
            raise ValueError(f"slip must be in [0, 1], got {slip}")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {gamma}")
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        if render_mode not in (None, *self.metadata["render_modes"]):
            raise ValueError(f"render_mode must be None or 'ansi', got {render_mode!r}")
        self.rows = parse_room(room)
        self.slip, self.gamma, self.max_steps, self.render_mode = slip, gamma, max_steps, render_mode
        self.shape = (len(self.rows), len(self.rows[0]))
        self.cells = [(i, j) for i, row in enumerate(self.rows) for j, ch in enumerate(row) if ch != "#"]
        self.index = {cell: s for s, cell in enumerate(self.cells)}
        self.symbols = [self.rows[i][j] for i, j in self.cells]
        self.start = self.symbols.index("C")
        self.terminal = np.array([ch in TERMINAL for ch in self.symbols])
        self.rewards = np.array([REWARDS[ch] for ch in self.symbols])
        # next_state[s, a]: where action a takes the cat from s when it does not slip
        self.next_state = np.array([[self._move(s, a) for a in range(4)] for s in range(len(self.cells))])
        self.observation_space = gym.spaces.Discrete(len(self.cells))
        self.action_space = gym.spaces.Discrete(4)
        self.state, self.steps = self.start, 0

    @property
    def n_states(self) -> int:
        return len(self.cells)

    def _move(self, s: int, a: int) -> int:
        (i, j), (di, dj) = self.cells[s], MOVES[a]
        return self.index.get((i + di, j + dj), s)  # a wall or the edge is not in the index

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.state, self.steps = self.start, 0
        return self.state, {}

    def step(self, action):
        if self.terminal[self.state]:
            raise RuntimeError("step() after the episode ended; call reset()")
        a = int(action)
        slipped = self.slip > 0 and self.np_random.random() < self.slip
        if slipped:
            a = (a + 1 + int(self.np_random.integers(3))) % 4  # one of the 3 other actions, uniformly
        self.state = int(self.next_state[self.state, a])
        self.steps += 1
        terminated = bool(self.terminal[self.state])
        truncated = not terminated and self.steps >= self.max_steps
        info = {"cell": self.symbols[self.state], "slipped": bool(slipped)}
        return self.state, float(self.rewards[self.state]), terminated, truncated, info

    def render(self):
        if self.render_mode == "ansi":
            return render_room(self, self.state)
        return None

    def model(self) -> Model:
        """P[s, a, s'], R[s, a, s'] and terminal[s] of this room (see Model)."""
        S = self.n_states
        P = np.zeros((S, 4, S))
        for s in range(S):
            if self.terminal[s]:
                P[s, :, s] = 1.0  # absorbing
                continue
            for a in range(4):
                for b in range(4):
                    P[s, a, self.next_state[s, b]] += (1.0 - self.slip) if b == a else self.slip / 3
        # the reward of arriving in s', from every non-terminal s
        R = np.where(self.terminal[:, None, None], 0.0, np.broadcast_to(self.rewards, (S, 4, S)))
        return Model(P=P, R=R, terminal=self.terminal.copy(), gamma=self.gamma, start=self.start)


# gym.make("alignkit/CatRoom-v0", slip=0.1) builds it behind gymnasium's standard wrappers
gym.register(id="alignkit/CatRoom-v0", entry_point="alignkit.rl.gridworld:CatRoom")


# --- text and pictures -------------------------------------------------------------------


def _grid(env: CatRoom, cell_text, wall: str) -> str:
    """One line per row: cell_text(s) for a state s, `wall` for a wall."""
    lines = []
    for i, row in enumerate(env.rows):
        lines.append(" ".join(wall if ch == "#" else cell_text(env.index[(i, j)]) for j, ch in enumerate(row)))
    return "\n".join(lines)


def render_room(env: CatRoom, cat: int | None = None) -> str:
    """The room as text; C marks the cat at state `cat` (default: its start)."""
    cat = env.start if cat is None else cat
    return _grid(env, lambda s: "C" if s == cat else ("." if env.symbols[s] == "C" else env.symbols[s]), "#")


def render_policy(env: CatRoom, actions: np.ndarray) -> str:
    """A deterministic policy (actions [S]) as arrows; terminal cells keep their symbol."""
    return _grid(env, lambda s: env.symbols[s] if env.terminal[s] else ARROWS[int(actions[s])], "#")


def render_values(env: CatRoom, values: np.ndarray) -> str:
    """V(s) per cell, two decimals; walls as #####."""
    return _grid(env, lambda s: f"{values[s]:6.2f}", "  ####")


def plot_values(
    env: CatRoom, values: np.ndarray, actions: np.ndarray | None, path: str | Path, title: str = ""
) -> Path:
    """A PNG heat map of V(s) with the value and the policy's arrow in each cell; walls grey."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, no display needed
    from matplotlib.patches import Rectangle

    grid = np.full(env.shape, np.nan)
    for s, (i, j) in enumerate(env.cells):
        if not env.terminal[s]:  # V = 0 there by definition; drawn in their own colours below
            grid[i, j] = values[s]
    fig = Figure(figsize=(1.1 * env.shape[1] + 1.5, 1.1 * env.shape[0] + 0.6))
    ax = fig.subplots()
    ax.set_facecolor("0.35")  # NaN cells are left transparent: walls show this grey
    im = ax.imshow(grid, cmap="viridis")
    fig.colorbar(im, ax=ax, label="V(s)")
    for s, (i, j) in enumerate(env.cells):
        ch = env.symbols[s]
        if env.terminal[s]:
            colour = "#6baed6" if ch == "T" else "#e6550d"
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, color=colour))
            text = f"{'bathtub' if ch == 'T' else 'meat'}\n{REWARDS[ch]:+g}, ends"
        else:
            arrow = "" if actions is None else ARROWS[int(actions[s])] + "\n"
            mark = {"B": "\nbroom", "C": "\nstart"}.get(ch, "")
            text = f"{arrow}{values[s]:.2f}{mark}"
        ax.text(j, i, text, ha="center", va="center", fontsize=8, color="w")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or "V(s)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
