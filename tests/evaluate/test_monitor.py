"""The over-optimisation monitor and the frontier's reference curve, by hand."""

import math

import pytest

from alignkit.evaluate.policies import (EvalConfig, at_kl_budgets, best_of_n_expected, format_table,
                                        gold_fell_while_proxy_rose, monitor_flags, reference_curve)
from alignkit.rollout.best_of_n import best_of_n_for_kl, best_of_n_kl_bound


def test_best_of_n_expected_by_hand():
    # the 2-subsets of {3, 1, 2}: {3,1} -> 3, {3,2} -> 3, {1,2} -> 2
    assert best_of_n_expected([3.0, 1.0, 2.0], 2) == pytest.approx(8 / 3)
    assert best_of_n_expected([3.0, 1.0, 2.0], 1) == pytest.approx(2.0)  # the mean
    assert best_of_n_expected([3.0, 1.0, 2.0], 3) == pytest.approx(3.0)  # the maximum
    # 4 rewards, n = 2: 6 subsets, maxima 4,4,4,3,3,2 (0 ties with itself) -> 20/6
    assert best_of_n_expected([1.0, 2.0, 3.0, 4.0], 2) == pytest.approx(20 / 6)
    with pytest.raises(ValueError, match="best-of-4 needs at least 4"):
        best_of_n_expected([1.0, 2.0], 4)


def test_best_of_n_kl_bound_by_hand():
    assert best_of_n_kl_bound(1) == 0.0
    assert best_of_n_kl_bound(2) == pytest.approx(math.log(2) - 0.5)  # 0.1931
    assert best_of_n_kl_bound(64) == pytest.approx(4.158883 - 63 / 64, abs=1e-6)  # 3.1745
    # the largest n within a budget: bounds 0.193 (n=2), 0.432 (3), 0.636 (4), 1.835 (16), 1.892 (17), 3.175 (64)
    assert [best_of_n_for_kl(b) for b in (0.0, 0.19, 0.2, 0.64, 1.84, 3.18)] == [1, 1, 2, 4, 16, 64]
    with pytest.raises(ValueError):
        best_of_n_for_kl(-1.0)


def test_reference_curve_over_prompts():
    # two prompts, 4 samples each: best-of-1 is the mean, best-of-4 the max, averaged over prompts
    curve = reference_curve([0.0, 1.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0], 4)
    assert [c["n"] for c in curve] == [1, 2, 4]
    assert curve[0]["gold"] == pytest.approx((0.5 + 2.0) / 2)
    assert curve[1]["gold"] == pytest.approx((5 / 6 + 2.0) / 2)  # {0,1,0,1}: 5 of the 6 pairs hold a 1
    assert curve[2]["gold"] == pytest.approx((1.0 + 2.0) / 2)
    assert [c["kl_bound"] for c in curve] == pytest.approx([0.0, math.log(2) - 0.5, math.log(4) - 0.75])


def test_gold_falling_from_its_peak_while_the_proxy_rises():
    proxy = [float(i) for i in range(10)]
    # smoothed over 2 points, gold peaks at 4.0 (step 5) and ends at 0.5 while the proxy keeps rising
    assert gold_fell_while_proxy_rose(proxy, [0, 1, 2, 3, 4, 4, 3, 2, 1, 0], drop=0.05)
    assert not gold_fell_while_proxy_rose(proxy, [float(i) for i in range(10)], drop=0.05)  # gold rises too
    assert not gold_fell_while_proxy_rose(proxy[::-1], [0, 1, 2, 3, 4, 4, 3, 2, 1, 0], drop=0.05)  # proxy fell too
    assert not gold_fell_while_proxy_rose(proxy, [0, 1, 2, 3, 4, 4, 4, 4, 4, 3.98], drop=0.05)  # within the drop
    assert not gold_fell_while_proxy_rose([1.0], [1.0], drop=0.05)


def test_monitor_flags_against_the_reference():
    cfg = EvalConfig()  # distinct ratio 0.8, ended ratio 0.5
    ref = {"gold": 0.2, "proxy": 0.1, "distinct_2": 0.9, "ended": 0.6}
    assert monitor_flags({"gold": 0.5, "proxy": 1.0, "distinct_2": 0.8, "ended": 0.4}, ref, [], cfg) == []
    assert monitor_flags({"gold": 0.9, "proxy": 3.0, "distinct_2": 0.5, "ended": 0.1}, ref, [], cfg) == [
        "collapsed", "unended"]
    # the proxy rose above the reference's while gold fell more than flag_gold_drop (0.05) below it
    assert monitor_flags({"gold": 0.1, "proxy": 2.0, "distinct_2": 0.9, "ended": 0.6}, ref, [], cfg) == [
        "over-optimised"]
    assert monitor_flags({"gold": 0.16, "proxy": 2.0, "distinct_2": 0.9, "ended": 0.6}, ref, [], cfg) == []
    # ... or the training log says so
    history = [{"step": i, "train/reward/rm": float(i), "train/reward/mod:gold_reward": g}
               for i, g in enumerate([0, 1, 2, 3, 4, 4, 3, 2, 1, 0])]
    assert monitor_flags({"gold": 0.5, "proxy": 1.0, "distinct_2": 0.9, "ended": 0.6}, ref, history, cfg) == [
        "over-optimised"]


def test_the_leaderboard_at_a_kl_budget_skips_flagged_policies():
    models = {"sft": {"gold": 0.1, "kl": 0.0, "flags": []}, "dpo": {"gold": 0.5, "kl": 2.5, "flags": []},
              "grpo": {"gold": 0.9, "kl": 2.0, "flags": ["collapsed"]}, "ppo": {"gold": 0.7, "kl": 8.0, "flags": []}}
    curve = reference_curve([0.0, 1.0, 0.0, 1.0], 4)  # kl bounds 0, 0.19, 0.64
    rows = at_kl_budgets(models, [0.1, 3.0, 10.0], curve)
    assert [(r["model"], r["flagged_above"]) for r in rows] == [("sft", []), ("dpo", ["grpo"]), ("ppo", ["grpo"])]
    assert rows[0]["reference_best_of_n"] == {"n": 1, "gold": 0.5}
    assert rows[1]["reference_best_of_n"]["n"] == 4
    table = format_table({"reference": "sft", "models": {k: {**v, "win_rate": 0.5} for k, v in models.items()},
                          "leaderboard": [], "kl_budgets": rows, "reference_best_of_n": curve})
    assert "grpo" in table and "collapsed" in table
    assert "kl <= 3: dpo +0.500 (kl 2.50)   best-of-4 by gold: +1.000   (flagged, higher gold: grpo)" in table
