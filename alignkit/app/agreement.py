"""Inter-annotator agreement for labelling campaigns: Cohen's kappa, Krippendorff's alpha,
leave-one-out majority agreement per annotator, and kappa for every pair of annotators.

    from alignkit.app.agreement import krippendorff_alpha
    krippendorff_alpha([["good", "good", "bad"], ["bad", "bad"], ["good"]])  # -> 1/3

Pure Python plus numpy: no database, no web framework. A judgement is a tuple
`(item_id, annotator_id, label)`; ids and nominal labels are any hashable values.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Iterable, Sequence

import numpy as np

Judgement = tuple[Hashable, Hashable, Hashable]


def cohen_kappa(a: Sequence[Hashable], b: Sequence[Hashable]) -> float:
    """Cohen's kappa for two annotators' nominal labels on the same N items (a[i], b[i]: item i).

        p_o   = (1/N) sum_i [a_i == b_i]                 (observed agreement)
        p_e   = sum_k p_a(k) p_b(k),  p_x(k) = (1/N) #{i : x_i == k}   (chance agreement)
        kappa = (p_o - p_e) / (1 - p_e)

    computed on integer counts, kappa = (N A - S) / (N^2 - S) with A = N p_o and
    S = N^2 p_e, so it is exact up to the final division.

    Degenerate case: p_e == 1 happens only when both annotators used one single identical
    label on every item; then p_o == 1 as well and kappa is defined as 1.0 (0/0 otherwise).

    Raises ValueError if the lists are empty or of unequal length.
    """
    if len(a) != len(b):
        raise ValueError(f"cohen_kappa needs equal-length label lists, got {len(a)} and {len(b)}")
    n = len(a)
    if n == 0:
        raise ValueError("cohen_kappa needs at least one item, got empty label lists")
    agree = sum(x == y for x, y in zip(a, b))
    count_a, count_b = Counter(a), Counter(b)
    chance = sum(count_a[k] * count_b[k] for k in count_a)  # N^2 p_e
    if chance == n * n:  # p_e == 1: one identical label everywhere, so p_o == 1
        return 1.0
    return (n * agree - chance) / (n * n - chance)


def _nominal_delta2(values: list, marginals: np.ndarray) -> np.ndarray:
    """delta^2_ck = 0 if c == k else 1."""
    return 1.0 - np.eye(len(values))


def _ordinal_delta2(values: list, marginals: np.ndarray) -> np.ndarray:
    """delta^2_ck = (sum_{g=c..k} n_g - (n_c + n_k) / 2)^2, values sorted, n_g the marginals."""
    cum = np.concatenate([[0.0], np.cumsum(marginals)])  # cum[i] = n_0 + ... + n_{i-1}
    lo = np.minimum.outer(np.arange(len(values)), np.arange(len(values)))
    hi = np.maximum.outer(np.arange(len(values)), np.arange(len(values)))
    between = cum[hi + 1] - cum[lo]  # sum of n_g for lo <= g <= hi
    return (between - (marginals[:, None] + marginals[None, :]) / 2.0) ** 2


def _interval_delta2(values: list, marginals: np.ndarray) -> np.ndarray:
    """delta^2_ck = (c - k)^2."""
    x = np.asarray(values, dtype=float)
    return (x[:, None] - x[None, :]) ** 2


ALPHA_METRICS: dict[str, Callable[[list, np.ndarray], np.ndarray]] = {
    "nominal": _nominal_delta2,
    "ordinal": _ordinal_delta2,
    "interval": _interval_delta2,
}


def _value_order(values: Iterable[Hashable], level: str) -> list:
    """Distinct values in matrix order: first appearance (nominal), sorted (ordinal, interval)."""
    distinct = list(dict.fromkeys(values))
    if level == "nominal":
        return distinct
    if level == "interval":
        numeric = (int, float, np.number)
        bad = [v for v in distinct if isinstance(v, bool) or not isinstance(v, numeric)]
        if bad:
            raise ValueError(f"interval alpha needs numeric labels, got {bad[:5]!r}")
    try:
        return sorted(distinct)
    except TypeError as err:
        raise ValueError(f"{level} alpha needs mutually sortable labels: {err}") from None


def coincidence_matrix(units: Sequence[Sequence[Hashable]], values: list) -> np.ndarray:
    """Krippendorff's coincidence matrix over `values` (the row/column order).

        o_ck = sum_u #{ordered pairs (i, j), i != j, in u with u_i = c, u_j = k} / (m_u - 1)
             = sum_u n_uc (n_uk - [c == k]) / (m_u - 1)

    where m_u is the number of values in unit u and n_uc how many of them equal c. Units
    with m_u < 2 are not pairable and contribute nothing. Shape [V, V], symmetric; its
    total is n, the number of pairable values.
    """
    index = {v: i for i, v in enumerate(values)}
    o = np.zeros((len(values), len(values)))
    for unit in units:
        m = len(unit)
        if m < 2:
            continue
        n_u = np.zeros(len(values))
        for v in unit:
            n_u[index[v]] += 1
        o += (np.outer(n_u, n_u) - np.diag(n_u)) / (m - 1)
    return o


def krippendorff_alpha(units: Sequence[Sequence[Hashable]], level: str = "nominal") -> float:
    """Krippendorff's alpha for any number of annotators, with missing data.

    `units[u]` holds the labels given to item u (only the given ones, any number; an item
    labelled by fewer than 2 annotators is not pairable and is ignored). With the
    coincidence matrix o_ck (see `coincidence_matrix`),

        n_c   = sum_k o_ck,   n = sum_c n_c                 (pairable values)
        alpha = 1 - (n - 1) sum_{c,k} o_ck delta^2_ck / sum_{c,k} n_c n_k delta^2_ck

    delta^2 by `level` (ALPHA_METRICS):
        nominal   0 if c == k else 1
        ordinal   (sum_{g between c and k, inclusive} n_g - (n_c + n_k) / 2)^2, labels sortable
        interval  (c - k)^2, labels numeric

    Conventions: if the expected disagreement sum_{c,k} n_c n_k delta^2_ck is 0 (a single
    label value among all pairable values) alpha is defined as 1.0. Raises ValueError on an
    unknown level (naming the valid ones), on no pairable values, and on labels the level
    cannot order or subtract.
    """
    if level not in ALPHA_METRICS:
        raise ValueError(f"unknown level {level!r}; valid levels: {sorted(ALPHA_METRICS)}")
    pairable = [unit for unit in units if len(unit) >= 2]
    if not pairable:
        raise ValueError("krippendorff_alpha needs at least one unit with 2 or more labels")
    values = _value_order((v for unit in pairable for v in unit), level)
    o = coincidence_matrix(pairable, values)
    marginals = o.sum(axis=1)
    n = marginals.sum()
    delta2 = ALPHA_METRICS[level](values, marginals)
    expected = float(np.outer(marginals, marginals).ravel() @ delta2.ravel())
    if expected == 0.0:
        return 1.0
    observed = float(o.ravel() @ delta2.ravel())
    return 1.0 - (n - 1) * observed / expected


def _labels_by_item(judgements: Iterable[Judgement]) -> dict[Hashable, dict[Hashable, Hashable]]:
    """{item: {annotator: label}}; a repeated (item, annotator) pair raises ValueError."""
    by_item: dict[Hashable, dict[Hashable, Hashable]] = defaultdict(dict)
    for item, annotator, label in judgements:
        if annotator in by_item[item]:
            raise ValueError(f"annotator {annotator!r} labelled item {item!r} more than once")
        by_item[item][annotator] = label
    return by_item


def majority_agreement(judgements: Iterable[Judgement]) -> dict[Hashable, dict]:
    """How often each annotator agrees with the leave-one-out majority of the others.

    For each judgement (item, annotator, label) the reference is the most frequent label
    among the OTHER annotators of that item (leave-one-out, so an annotator never votes
    themselves into the majority). "Majority" means a strict plurality: one label strictly
    more frequent than every other label (with 1 other label, that label). The judgement
    is skipped when the others have no label (nobody else labelled the item) or when the
    top labels tie. Then, per annotator,

        items     = number of judgements not skipped
        agreement = (1/items) sum [label == leave-one-out majority]   (None when items == 0)

    Returns {annotator: {"items": int, "agreement": float | None}} for every annotator that
    appears. Raises ValueError if an annotator labelled the same item twice.
    """
    by_item = _labels_by_item(judgements)
    compared: Counter = Counter()
    agreed: Counter = Counter()
    annotators: dict[Hashable, None] = {}
    for labels in by_item.values():
        for annotator, label in labels.items():
            annotators[annotator] = None
            others = Counter(lab for ann, lab in labels.items() if ann != annotator)
            top = others.most_common(2)
            if not top or (len(top) == 2 and top[0][1] == top[1][1]):
                continue  # nobody else, or a tie at the top
            compared[annotator] += 1
            agreed[annotator] += label == top[0][0]
    return {
        a: {"items": compared[a], "agreement": agreed[a] / compared[a] if compared[a] else None}
        for a in annotators
    }


def pairwise_kappas(judgements: Iterable[Judgement]) -> dict[tuple[Hashable, Hashable], dict]:
    """Cohen's kappa for every pair of annotators on the items both labelled.

    Returns {(a1, a2): {"items": n, "kappa": cohen_kappa(...) or None}} for every pair with
    n >= 1 common items, keyed with str(a1) < str(a2) (ids ordered by their string form);
    kappa is None when n < 2 (one item says nothing about chance agreement). Pairs with no
    common item are absent. Raises ValueError if an annotator labelled the same item twice.
    """
    by_item = _labels_by_item(judgements)
    common: dict[tuple[Hashable, Hashable], tuple[list, list]] = defaultdict(lambda: ([], []))
    for labels in by_item.values():
        ordered = sorted(labels, key=lambda a: (str(a), repr(a)))
        for i, a1 in enumerate(ordered):
            for a2 in ordered[i + 1 :]:
                first, second = common[(a1, a2)]
                first.append(labels[a1])
                second.append(labels[a2])
    return {
        pair: {"items": len(x), "kappa": cohen_kappa(x, y) if len(x) >= 2 else None}
        for pair, (x, y) in common.items()
    }
