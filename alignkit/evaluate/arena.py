"""Pairwise arena: online Elo and a Bradley-Terry maximum-likelihood leaderboard.

A battle is (a, b, s) with s = 1 when a wins, 0 when b wins, 0.5 for a tie.

Elo (online, order-dependent; Chatbot Arena's first table):

    E_a  = 1 / (1 + 10^((R_b - R_a) / 400))
    R'_a = R_a + K (s - E_a),      R'_b = R_b + K ((1 - s) - (1 - E_a))

Bradley-Terry (order-free): P(a beats b) = p_a / (p_a + p_b), fit by maximum likelihood
with Hunter's (2004) minorisation-maximisation iteration, a tie counting half a win each:

    p_i <- W_i / sum_{j != i} n_ij / (p_i + p_j)

(W_i: wins of i, n_ij: battles between i and j), reported on the Elo scale
R_i = 1000 + 400 log10(p_i), the p normalised to geometric mean 1. `prior` adds that
many tied battles between every two players: it keeps a player who never lost (or never
won) finite. Confidence intervals: refit on battles resampled with replacement.
"""

from __future__ import annotations

import math
import random

import numpy as np

Battle = tuple[str, str, float]


def elo_expected(r_a: float, r_b: float) -> float:
    """E_a = 1 / (1 + 10^((R_b - R_a) / 400)): a's expected score against b."""
    return 1.0 / (1.0 + 10 ** ((r_b - r_a) / 400))


def elo_update(r_a: float, r_b: float, s_a: float, k: float = 32.0) -> tuple[float, float]:
    """One battle: R'_a = R_a + K (S_a - E_a) and the mirror update of b (the sum is conserved)."""
    delta = k * (s_a - elo_expected(r_a, r_b))
    return r_a + delta, r_b - delta


def elo_ratings(battles: list[Battle], k: float = 32.0, initial: float = 1000.0) -> dict[str, float]:
    """Online Elo over `battles` in the order given."""
    ratings: dict[str, float] = {}
    for a, b, s in battles:
        ra, rb = ratings.setdefault(a, initial), ratings.setdefault(b, initial)
        ratings[a], ratings[b] = elo_update(ra, rb, s, k)
    return ratings


def _players(battles: list[Battle]) -> list[str]:
    return sorted({a for a, _, _ in battles} | {b for _, b, _ in battles})


def bradley_terry(battles: list[Battle], prior: float = 0.0, iters: int = 1000, tol: float = 1e-10,
                  players: list[str] | None = None) -> dict[str, float]:
    """Maximum-likelihood Bradley-Terry strengths on the Elo scale (mean 1000)."""
    players = players or _players(battles)
    index = {p: i for i, p in enumerate(players)}
    m = len(players)
    wins = np.full((m, m), prior / 2)  # wins[i, j]: i's wins over j (a tie is half a win each)
    np.fill_diagonal(wins, 0.0)
    for a, b, s in battles:
        wins[index[a], index[b]] += s
        wins[index[b], index[a]] += 1 - s
    games = wins + wins.T
    w = wins.sum(axis=1)
    if np.any(w <= 0) or np.any(games.sum(axis=1) - w <= 0):
        raise ValueError("bradley_terry: a player never won or never lost, so its strength is infinite; set prior > 0")
    p = np.ones(m)
    for _ in range(iters):
        denom = (games / (p[:, None] + p[None, :])).sum(axis=1)
        new = w / denom
        new /= math.exp(np.log(new).mean())
        if np.max(np.abs(np.log(new) - np.log(p))) < tol:
            p = new
            break
        p = new
    return {name: 1000 + 400 * math.log10(p[index[name]]) for name in players}


def bootstrap_intervals(battles: list[Battle], rounds: int = 200, prior: float = 1.0, level: float = 0.95,
                        seed: int = 0) -> dict[str, tuple[float, float]]:
    """Percentile confidence intervals of the Bradley-Terry ratings: refit on `rounds` resamples of the battles."""
    rng = random.Random(seed)
    players = _players(battles)
    samples = {p: [] for p in players}
    for _ in range(rounds):
        fit = bradley_terry(rng.choices(battles, k=len(battles)), prior=prior, players=players)
        for p in players:
            samples[p].append(fit[p])
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    return {p: (float(np.percentile(v, lo)), float(np.percentile(v, hi))) for p, v in samples.items()}


def leaderboard(battles: list[Battle], k: float = 32.0, prior: float = 1.0, rounds: int = 200,
                seed: int = 0) -> list[dict]:
    """Rows {"model", "bt", "bt_low", "bt_high", "elo", "battles", "win_rate"}, best Bradley-Terry rating first.

    Elo runs over the battles in a seeded random order (its result depends on order; the
    Bradley-Terry fit does not)."""
    order = list(battles)
    random.Random(seed).shuffle(order)
    elo = elo_ratings(order, k)
    bt = bradley_terry(battles, prior=prior)
    ci = bootstrap_intervals(battles, rounds, prior, seed=seed)
    rows = []
    for p in bt:
        scores = [s for a, _, s in battles if a == p] + [1 - s for _, b, s in battles if b == p]
        rows.append({"model": p, "bt": bt[p], "bt_low": ci[p][0], "bt_high": ci[p][1], "elo": elo[p],
                     "battles": len(scores), "win_rate": sum(scores) / len(scores)})
    return sorted(rows, key=lambda r: -r["bt"])
