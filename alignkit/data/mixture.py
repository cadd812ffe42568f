"""Several data sources as one training set: plain concatenation, or a weighted mixture.

    sources = split_sources("alpaca.jsonl,flan.jsonl")            # ["alpaca.jsonl", "flan.jsonl"]
    records, counts = mix([alpaca_rows, flan_rows], [0.7, 0.3], seed=0)
    print(describe(sources, counts))  # mixture: alpaca.jsonl 704 rows (70.4%), flan.jsonl 296 (29.6%)

The sampling rule (`mix`): with no weights the sources are concatenated, each row once,
in order. With weights w_1..w_k the mixture has N = n_1 + ... + n_k rows (the sources'
sizes added up). `random.Random(seed)` first draws, for each of the N positions, the
source it comes from: source i with probability w_i / sum(w), independently
(`Random.choices`). Each source i then fills its c_i positions, in order, with the first
c_i rows of a sequence of fresh seeded shuffles of its rows: one shuffle while c_i <= n_i,
and a new shuffle each time it runs out (an up-weighted source repeats rows, every row
at most once more than any other; a down-weighted one leaves rows out). The same seed,
sources and weights give the same rows in the same order. c_i is Binomial(N, p_i) with
p_i = w_i / sum(w), so its share c_i / N is within a few sqrt(p_i (1 - p_i) / N) of p_i.

Nothing here reads files: the trainers load each source (`load_records`) and call this
(`alignkit.train.common.load_train_eval`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from pathlib import Path


def split_sources(value: str) -> list[str]:
    """The sources named by `data` / `eval_data`: comma-separated (`a.jsonl,b.jsonl`), spaces
    around names ignored. A value that names an existing path is one source, commas and all.
    Raises ValueError for an empty name (`a.jsonl,,b.jsonl`, a trailing comma)."""
    if Path(value).expanduser().exists():
        return [value]
    names = [name.strip() for name in value.split(",")]
    if any(not name for name in names):
        raise ValueError(f"{value!r}: an empty source name; name the sources separated by commas, "
                         "like a.jsonl,b.jsonl")
    return names


def weights_problem(weights: Sequence[float], n_sources: int) -> str | None:
    """What is wrong with `weights` for `n_sources` sources, or None. No weights is fine
    (concatenation); otherwise one weight per source, each finite and >= 0, not all 0."""
    if not weights:
        return None
    if len(weights) != n_sources:
        return (f"{len(weights)} weight{'s' if len(weights) != 1 else ''} for {n_sources} "
                f"source{'s' if n_sources != 1 else ''}; give one weight per data source, in order")
    for i, weight in enumerate(weights, 1):
        if not math.isfinite(weight) or weight < 0:
            return f"weight {i} is {weight}; weights must be finite and >= 0"
    if not any(weight > 0 for weight in weights):
        return "every weight is 0; at least one source needs a weight > 0"
    return None


def mix(sources: Sequence[Sequence[dict]], weights: Sequence[float] = (), seed: int = 0
        ) -> tuple[list[dict], list[int]]:
    """(mixture records, rows drawn from each source), by the rule in the module docstring.

    `weights` empty: concatenation, counts = the sources' sizes. Otherwise as many rows as all
    sources together, drawn by source with probability w_i / sum(w) (seeded by `seed`); a row
    drawn more than once comes back as separate shallow copies. Raises ValueError for bad
    weights (see `weights_problem`) or a weighted source with no rows.
    """
    problem = weights_problem(weights, len(sources))
    if problem:
        raise ValueError(problem)
    if not weights:
        return [record for source in sources for record in source], [len(source) for source in sources]
    for i, (source, weight) in enumerate(zip(sources, weights), 1):
        if weight > 0 and not source:
            raise ValueError(f"source {i} has weight {weight} but no rows")
    total = sum(len(source) for source in sources)
    rng = random.Random(seed)
    drawn = rng.choices(range(len(sources)), weights=weights, k=total)
    counts = [0] * len(sources)
    for i in drawn:
        counts[i] += 1
    taken: list[list[dict]] = []
    for source, count in zip(sources, counts):
        rows: list[dict] = []
        while len(rows) < count:
            order = list(range(len(source)))
            rng.shuffle(order)
            rows += [source[j] for j in order[:count - len(rows)]]
        taken.append(rows)
    positions = [0] * len(sources)
    records = []
    for i in drawn:
        records.append(dict(taken[i][positions[i]]))
        positions[i] += 1
    return records, counts


def describe(names: Sequence[str], counts: Sequence[int], label: str = "mixture") -> str:
    """One line: `mixture: a.jsonl 704 rows (70.4%), b.jsonl 296 (29.6%)`."""
    total = sum(counts) or 1
    parts = [f"{name} {count}{' rows' if i == 0 else ''} ({100 * count / total:.1f}%)"
             for i, (name, count) in enumerate(zip(names, counts))]
    return f"{label}: {', '.join(parts)}"
