from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from alignkit.app.agreement import (
    coincidence_matrix,
    cohen_kappa,
    krippendorff_alpha,
    majority_agreement,
    pairwise_kappas,
)

# --- Cohen's kappa ----------------------------------------------------------------------


def test_cohen_kappa_classic_2x2():
    # 50 items: yes/yes 20, yes/no 5, no/yes 10, no/no 15
    # p_o = (20 + 15) / 50 = 0.7
    # A said yes 25, no 25; B said yes 30, no 20
    # p_e = 0.5 * 0.6 + 0.5 * 0.4 = 0.5
    # kappa = (0.7 - 0.5) / (1 - 0.5) = 0.4
    a = ["yes"] * 20 + ["yes"] * 5 + ["no"] * 10 + ["no"] * 15
    b = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    assert cohen_kappa(b, a) == pytest.approx(0.4)


def test_cohen_kappa_perfect_agreement_is_one():
    labels = ["a", "b", "c", "a", "b"]
    assert cohen_kappa(labels, list(labels)) == 1.0


def test_cohen_kappa_three_labels():
    # a = [x, x, y, z], b = [x, y, y, x]: p_o = 2/4 = 0.5
    # a: x 2, y 1, z 1; b: x 2, y 2 -> p_e = (2*2 + 1*2 + 1*0) / 16 = 6/16 = 0.375
    # kappa = (0.5 - 0.375) / 0.625 = 0.2
    assert cohen_kappa(["x", "x", "y", "z"], ["x", "y", "y", "x"]) == pytest.approx(0.2)


def test_cohen_kappa_systematic_disagreement_is_negative():
    # a = [p, q], b = [q, p]: p_o = 0, p_e = 0.5*0.5 + 0.5*0.5 = 0.5, kappa = -0.5 / 0.5 = -1
    assert cohen_kappa(["p", "q"], ["q", "p"]) == pytest.approx(-1.0)


def test_cohen_kappa_single_shared_label_is_one():
    # p_e = 1 * 1 = 1 and p_o = 1: 0/0, defined as 1.0
    assert cohen_kappa(["ok"] * 4, ["ok"] * 4) == 1.0
    assert cohen_kappa([1], [1]) == 1.0


def test_cohen_kappa_rejects_bad_input():
    with pytest.raises(ValueError, match="equal-length"):
        cohen_kappa(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="at least one item"):
        cohen_kappa([], [])


# --- Krippendorff's alpha ---------------------------------------------------------------

# Two coders, 5 units, no missing data (labels a, b):
#   unit:  1  2  3  4  5
#   A:     a  a  b  b  a
#   B:     a  b  b  b  a
# each unit has m_u = 2, so it adds both ordered pairs with weight 1/(2-1) = 1:
#   coincidence matrix      a   b  | n_c
#                      a    4   1  |  5
#                      b    1   4  |  5        n = 10
# sum o_ck delta_ck = o_ab + o_ba = 2; sum n_c n_k delta_ck = 2 * 5 * 5 = 50
# alpha = 1 - (n - 1) * 2 / 50 = 1 - 9 * 2 / 50 = 0.64
TWO_CODERS = [["a", "a"], ["a", "b"], ["b", "b"], ["b", "b"], ["a", "a"]]


def test_alpha_nominal_two_coders_hand_value():
    o = coincidence_matrix(TWO_CODERS, ["a", "b"])
    np.testing.assert_allclose(o, [[4.0, 1.0], [1.0, 4.0]])
    assert krippendorff_alpha(TWO_CODERS) == pytest.approx(0.64)


def test_alpha_two_coders_small_sample_form():
    # With D_o = (1/n) sum o_ck delta_ck = 2/10 = 0.2 (observed disagreement) and
    # D_e = (1/n^2) sum n_c n_k delta_ck = 50/100 = 0.5 (expected, from pooled marginals):
    #   alpha = 1 - ((n - 1)/n) D_o / D_e = 1 - (9/10) * 0.2 / 0.5 = 0.64
    # and Scott's pi = 1 - D_o / D_e = 0.6, so alpha = pi + (1 - pi) / n = 0.6 + 0.4 / 10 = 0.64.
    n, d_o, d_e = 10, 0.2, 0.5
    assert krippendorff_alpha(TWO_CODERS) == pytest.approx(1 - (n - 1) / n * d_o / d_e)
    pi = 1 - d_o / d_e
    assert krippendorff_alpha(TWO_CODERS) == pytest.approx(pi + (1 - pi) / n)


def test_alpha_two_coders_matches_scott_pi_correction_on_random_data():
    rng = random.Random(0)
    for _ in range(20):
        a = [rng.choice("xyz") for _ in range(15)]
        b = [rng.choice("xyz") if rng.random() < 0.5 else x for x in a]
        n = 2 * len(a)
        pooled = Counter(a + b)
        p_o = sum(x == y for x, y in zip(a, b)) / len(a)
        p_e = sum((c / n) ** 2 for c in pooled.values())
        if p_e == 1:
            continue
        pi = (p_o - p_e) / (1 - p_e)
        alpha = krippendorff_alpha([[x, y] for x, y in zip(a, b)])
        assert alpha == pytest.approx(pi + (1 - pi) / n)


# Three coders with missing data (labels a, b):
#   unit 1: a a a   (m=3) ordered pairs: 6 x (a,a), weight 1/2      -> o_aa += 3
#   unit 2: a b     (m=2) (a,b), (b,a), weight 1                    -> o_ab += 1, o_ba += 1
#   unit 3: b b a   (m=3) 2 x (b,b), 2 x (b,a), 2 x (a,b), weight 1/2
#                                                   -> o_bb += 1, o_ab += 1, o_ba += 1
#   unit 4: b       (m=1) not pairable, ignored
#   coincidence matrix      a   b  | n_c
#                      a    3   2  |  5
#                      b    2   1  |  3        n = 8
# alpha = 1 - (8 - 1) * (2 + 2) / (2 * 5 * 3) = 1 - 28/30 = 1/15
MISSING = [["a", "a", "a"], ["a", "b"], ["b", "b", "a"], ["b"]]


def test_alpha_nominal_missing_data_hand_value():
    o = coincidence_matrix(MISSING, ["a", "b"])
    np.testing.assert_allclose(o, [[3.0, 2.0], [2.0, 1.0]])
    assert krippendorff_alpha(MISSING) == pytest.approx(1 / 15)


def test_coincidence_matrix_matches_explicit_pair_loop():
    rng = random.Random(1)
    values = [1, 2, 3, 4]
    units = [[rng.choice(values) for _ in range(rng.randint(0, 5))] for _ in range(30)]
    expected = np.zeros((4, 4))
    for unit in units:
        m = len(unit)
        for i in range(m):
            for j in range(m):
                if i != j:
                    expected[unit[i] - 1, unit[j] - 1] += 1 / (m - 1)
    np.testing.assert_allclose(coincidence_matrix(units, values), expected)


# Ordinal / interval on units [1,2], [2,3], [1,1]:
#   o_11 = 2, o_12 = o_21 = 1, o_23 = o_32 = 1;  n_1 = 3, n_2 = 2, n_3 = 1, n = 6
#   ordinal delta^2: d12 = (3+2 - (3+2)/2)^2 = 2.5^2 = 6.25
#                    d23 = (2+1 - (2+1)/2)^2 = 1.5^2 = 2.25
#                    d13 = (3+2+1 - (3+1)/2)^2 = 4^2 = 16
#     observed = 2*6.25 + 2*2.25 = 17
#     expected = 2 * (3*2*6.25 + 2*1*2.25 + 3*1*16) = 2 * (37.5 + 4.5 + 48) = 180
#     alpha = 1 - 5 * 17 / 180 = 95/180 = 19/36
#   interval delta^2: d12 = 1, d23 = 1, d13 = 4
#     observed = 2 + 2 = 4; expected = 2 * (6*1 + 2*1 + 3*4) = 40; alpha = 1 - 5 * 4 / 40 = 0.5
SMALL_ORDERED = [[1, 2], [2, 3], [1, 1]]


def test_alpha_ordinal_hand_value():
    assert krippendorff_alpha(SMALL_ORDERED, "ordinal") == pytest.approx(19 / 36)


def test_alpha_interval_hand_value():
    assert krippendorff_alpha(SMALL_ORDERED, "interval") == pytest.approx(0.5)


# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", the example with
# 4 coders, 12 units, values 1..5 and missing data ("." -> None below).
_ = None
KRIPPENDORFF_2011 = {
    "A": [1, 2, 3, 3, 2, 1, 4, 1, 2, _, _, _],
    "B": [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, _, 3],
    "C": [_, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, _],
    "D": [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, _],
}
KRIPPENDORFF_UNITS = [
    [v for v in unit if v is not None] for unit in zip(*KRIPPENDORFF_2011.values())
]


@pytest.mark.parametrize(
    ("level", "reference"), [("nominal", 0.743), ("ordinal", 0.815), ("interval", 0.849)]
)
def test_alpha_krippendorff_2011_reference_values(level, reference):
    assert round(krippendorff_alpha(KRIPPENDORFF_UNITS, level), 3) == reference


def test_alpha_krippendorff_2011_coincidences():
    # The paper's coincidence matrix: n_1..n_5 = 9, 13, 10, 5, 3 (n = 40 pairable values;
    # unit 12 has one value and is ignored), o_11 = 7 and o_12 = 4/3.
    o = coincidence_matrix(KRIPPENDORFF_UNITS, [1, 2, 3, 4, 5])
    np.testing.assert_allclose(o.sum(axis=1), [9, 13, 10, 5, 3])
    assert o[0, 0] == pytest.approx(7.0)
    assert o[0, 1] == pytest.approx(4 / 3)


def test_alpha_perfect_agreement_is_one():
    units = [["x", "x", "x"], ["y", "y"], ["z", "z", "z"]]
    for level in ("nominal", "ordinal"):
        assert krippendorff_alpha(units, level) == 1.0
    assert krippendorff_alpha([[1, 1], [3, 3, 3]], "interval") == 1.0


def test_alpha_single_value_everywhere_is_one():
    # expected disagreement = 0 (only one value among pairable values): defined as 1.0
    assert krippendorff_alpha([["ok", "ok"], ["ok", "ok", "ok"], ["no"]]) == 1.0


def test_alpha_errors():
    with pytest.raises(ValueError, match=r"valid levels: \['interval', 'nominal', 'ordinal'\]"):
        krippendorff_alpha(TWO_CODERS, "ratio")
    with pytest.raises(ValueError, match="at least one unit"):
        krippendorff_alpha([["a"], [], ["b"]])
    with pytest.raises(ValueError, match="at least one unit"):
        krippendorff_alpha([])
    with pytest.raises(ValueError, match="numeric"):
        krippendorff_alpha([["a", "b"]], "interval")
    with pytest.raises(ValueError, match="sortable"):
        krippendorff_alpha([[1, "b"]], "ordinal")


# --- majority agreement -----------------------------------------------------------------


def test_majority_agreement_contrarian_gets_zero():
    # 4 annotators on 3 items; x, y, w always agree, z always says the other label.
    # For x (and y, w): others are {2 agreeing, z} -> majority is x's own label -> 3/3.
    # For z: others are 3 agreeing -> majority differs from z's label -> 0/3.
    judgements = []
    for item, (good, bad) in enumerate([("a", "b"), ("b", "a"), ("a", "b")]):
        judgements += [(item, "x", good), (item, "y", good), (item, "w", good), (item, "z", bad)]
    result = majority_agreement(judgements)
    assert result["z"] == {"items": 3, "agreement": 0.0}
    for ann in ("x", "y", "w"):
        assert result[ann] == {"items": 3, "agreement": 1.0}


def test_majority_agreement_leave_one_out_and_skips():
    # item 1: p=a, q=a, r=b
    #   p: others {a, b} tie -> skipped;  q: same -> skipped;  r: others {a, a} -> a, r says b: miss
    # item 2: p=a, q=b
    #   p: others {b} -> b, miss;  q: others {a} -> a, miss
    # item 3: p=c (alone) -> skipped
    # item 4: p=a, q=a, r=a, s=b
    #   p, q, r: others have a 2 vs b 1 -> a: hit each;  s: others a,a,a -> a: miss
    judgements = [
        (1, "p", "a"), (1, "q", "a"), (1, "r", "b"),
        (2, "p", "a"), (2, "q", "b"),
        (3, "p", "c"),
        (4, "p", "a"), (4, "q", "a"), (4, "r", "a"), (4, "s", "b"),
    ]  # fmt: skip
    result = majority_agreement(judgements)
    # p: item 2 miss, item 4 hit -> 1/2;  q: the same -> 1/2
    # r: item 1 miss, item 4 hit -> 1/2;  s: item 4 miss -> 0/1
    assert result == {
        "p": {"items": 2, "agreement": 0.5},
        "q": {"items": 2, "agreement": 0.5},
        "r": {"items": 2, "agreement": 0.5},
        "s": {"items": 1, "agreement": 0.0},
    }


def test_majority_agreement_none_when_nothing_compared():
    # t's only item is tied among the others (a vs b); u labelled an item alone
    judgements = [(1, "t", "a"), (1, "v", "a"), (1, "w", "b"), (2, "u", "a")]
    result = majority_agreement(judgements)
    assert result["t"] == {"items": 0, "agreement": None}
    assert result["u"] == {"items": 0, "agreement": None}
    # v: others {a (t), b (w)} tie -> skipped; w: others {a (t), a (v)} -> a, w says b: miss
    assert result["v"] == {"items": 0, "agreement": None}
    assert result["w"] == {"items": 1, "agreement": 0.0}
    assert majority_agreement([]) == {}


def test_majority_agreement_rejects_duplicate_judgement():
    with pytest.raises(ValueError, match="more than once"):
        majority_agreement([(1, "x", "a"), (1, "x", "b")])


# --- pairwise kappas --------------------------------------------------------------------


def test_pairwise_kappas():
    # bob & alice share items 1..4: alice [y, y, n, n], bob [y, n, n, n]
    #   p_o = 3/4; alice y 2, n 2; bob y 1, n 3 -> p_e = (2*1 + 2*3)/16 = 0.5
    #   kappa = (0.75 - 0.5) / 0.5 = 0.5
    # carol shares only item 4 with alice and bob -> 1 item, kappa None
    # dave shares nothing with anyone -> no pair
    judgements = [
        (1, "bob", "y"), (1, "alice", "y"),
        (2, "bob", "n"), (2, "alice", "y"),
        (3, "bob", "n"), (3, "alice", "n"),
        (4, "bob", "n"), (4, "alice", "n"), (4, "carol", "y"),
        (5, "dave", "y"),
    ]  # fmt: skip
    result = pairwise_kappas(judgements)
    assert set(result) == {("alice", "bob"), ("alice", "carol"), ("bob", "carol")}
    assert result[("alice", "bob")]["items"] == 4
    assert result[("alice", "bob")]["kappa"] == pytest.approx(0.5)
    assert result[("alice", "carol")] == {"items": 1, "kappa": None}
    assert result[("bob", "carol")] == {"items": 1, "kappa": None}


def test_pairwise_kappas_keys_sorted_by_string():
    # ids 10 and 9: str order "10" < "9"; perfect agreement on 2 items -> kappa 1
    result = pairwise_kappas([(1, 9, "a"), (1, 10, "a"), (2, 9, "b"), (2, 10, "b")])
    assert result == {(10, 9): {"items": 2, "kappa": 1.0}}


def test_pairwise_kappas_rejects_duplicate_judgement():
    with pytest.raises(ValueError, match="more than once"):
        pairwise_kappas([(1, "x", "a"), (1, "x", "a")])
