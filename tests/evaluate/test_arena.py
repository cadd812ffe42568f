import math
import random

import pytest

from alignkit.evaluate import arena


def test_elo_update_by_hand():
    # E_a = 1 / (1 + 10^(200/400)) = 1 / (1 + 3.16228) = 0.240253
    assert arena.elo_expected(1000, 1200) == pytest.approx(0.240253, abs=1e-6)
    # a wins: R'_a = 1000 + 32 (1 - 0.240253) = 1024.3119, R'_b = 1200 - 24.3119 = 1175.6881
    ra, rb = arena.elo_update(1000, 1200, 1.0, k=32)
    assert (ra, rb) == (pytest.approx(1024.3119, abs=1e-4), pytest.approx(1175.6881, abs=1e-4))
    # a tie between equals changes nothing; K scales the step.
    assert arena.elo_update(1000, 1000, 0.5) == (1000, 1000)
    assert arena.elo_update(1000, 1000, 1.0, k=16) == (1008, 992)


def test_elo_ratings_in_order():
    # Two battles by hand with K = 32: a beats b (1000,1000 -> 1016, 984), then b beats a:
    # E_b = 1 / (1 + 10^(32/400)) = 1 / 2.202264 = 0.454078, R'_b = 984 + 32 * 0.545922 = 1001.4695.
    r = arena.elo_ratings([("a", "b", 1.0), ("b", "a", 1.0)], k=32)
    assert r["b"] == pytest.approx(1001.4695, abs=1e-4) and r["a"] == pytest.approx(998.5305, abs=1e-4)


def test_bradley_terry_by_hand():
    # a beats b 3 times of 4: p_a / p_b = 3, so R_a - R_b = 400 log10 3 = 190.85, centred on 1000.
    battles = [("a", "b", 1.0)] * 3 + [("b", "a", 1.0)]
    bt = arena.bradley_terry(battles)
    assert bt["a"] - bt["b"] == pytest.approx(400 * math.log10(3), abs=1e-6)
    assert (bt["a"] + bt["b"]) / 2 == pytest.approx(1000)
    # A tie is half a win each: 2 wins + 2 ties for a = 3 of 4.
    assert arena.bradley_terry([("a", "b", 1.0)] * 2 + [("a", "b", 0.5)] * 2)["a"] == pytest.approx(bt["a"])
    with pytest.raises(ValueError, match="never lost"):
        arena.bradley_terry([("a", "b", 1.0)])
    assert math.isfinite(arena.bradley_terry([("a", "b", 1.0)], prior=1.0)["a"])


def test_bradley_terry_recovers_known_strengths():
    true = {"w": 0.0, "x": 100.0, "y": 250.0, "z": 400.0}  # Elo-scale ratings
    rng = random.Random(0)
    battles = []
    names = list(true)
    for _ in range(6000):
        a, b = rng.sample(names, 2)
        battles.append((a, b, 1.0 if rng.random() < arena.elo_expected(true[a], true[b]) else 0.0))
    fit = arena.bradley_terry(battles)
    for n in names:
        assert fit[n] - fit["w"] == pytest.approx(true[n], abs=25)
    ci = arena.bootstrap_intervals(battles, rounds=50)
    assert all(ci[n][0] < fit[n] < ci[n][1] for n in names)
    rows = arena.leaderboard(battles, rounds=20)
    assert [r["model"] for r in rows] == ["z", "y", "x", "w"]
    assert rows[0]["elo"] > rows[-1]["elo"] and 0 < rows[-1]["win_rate"] < rows[0]["win_rate"] < 1
