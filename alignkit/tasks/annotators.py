"""Simulated annotators: human-like, noisy labels drawn from a gold reward.

People do not report a reward; they compare. An annotator who prefers answers with a
higher gold reward g, but not always, is the Bradley-Terry model with temperature T:

    P(a preferred to b) = sigmoid((g_a - g_b) / T)

T -> 0 is an annotator who always agrees with the gold reward; larger T disagrees more
often on close pairs. The three kinds of label the offline methods read:

    pairs     {"prompt", "chosen", "rejected"}      one Bradley-Terry draw per pair
    rankings  {"prompt", "responses"} best first    a Plackett-Luce draw: sort by g/T + Gumbel noise
    thumbs    {"prompt", "completion", "label"}     up with probability sigmoid((g - threshold) / T)

A pair whose gold rewards tie (|g_a - g_b| <= min_gap) carries no preference: the label
would be a coin flip, so it is skipped and counted rather than kept. An empty completion
(the sampler emitted EOS at once) cannot be a data row; it is skipped and counted too.
"""

from __future__ import annotations

import math
import random


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def prefers_first(gold_a: float, gold_b: float, temperature: float, rng: random.Random) -> bool:
    """One Bradley-Terry draw: True with probability sigmoid((g_a - g_b) / T); T = 0 always picks the higher."""
    if temperature <= 0:
        return gold_a > gold_b
    return rng.random() < sigmoid((gold_a - gold_b) / temperature)


def _groups(prompts: list[str], completions: list[str], gold: list[float]):
    if not (len(completions) == len(gold)) or len(completions) % max(len(prompts), 1):
        raise ValueError(f"{len(completions)} completions and {len(gold)} gold rewards for {len(prompts)} prompts: "
                         "expected the same number of completions for every prompt, prompt-major")
    n = len(completions) // len(prompts)
    for i, p in enumerate(prompts):
        yield p, completions[i * n:(i + 1) * n], gold[i * n:(i + 1) * n]


def preference_pairs(prompts: list[str], completions: list[str], gold: list[float], temperature: float = 0.1,
                     seed: int = 0, min_gap: float = 1e-6) -> tuple[list[dict], dict[str, int]]:
    """Label consecutive completions of each prompt (0 vs 1, 2 vs 3, ...) as preference pairs.

    `completions` holds n >= 2 per prompt, prompt-major. Returns the records and counts
    {"pairs", "ties_skipped", "against_gold"} (labels that disagree with the gold order:
    the annotators' noise, which the reward model has to average out).
    """
    rng = random.Random(seed)
    records, ties, against, empty = [], 0, 0, 0
    for prompt, texts, g in _groups(prompts, completions, gold):
        for a in range(0, len(texts) - 1, 2):
            b = a + 1
            if not texts[a].strip() or not texts[b].strip():
                empty += 1
                continue
            if abs(g[a] - g[b]) <= min_gap:
                ties += 1
                continue
            first = prefers_first(g[a], g[b], temperature, rng)
            chosen, rejected = (a, b) if first else (b, a)
            against += g[chosen] < g[rejected]
            records.append({"prompt": prompt, "chosen": texts[chosen], "rejected": texts[rejected]})
    return records, {"pairs": len(records), "ties_skipped": ties, "empty_skipped": empty, "against_gold": against}


def rankings(prompts: list[str], completions: list[str], gold: list[float], temperature: float = 0.1,
             seed: int = 0) -> list[dict]:
    """Rank the non-empty completions of each prompt, best first, by a Plackett-Luce draw.

    Sorting by g/T + Gumbel(0, 1) noise draws the order from Plackett-Luce with weights
    exp(g/T): the first place goes to i with probability exp(g_i/T) / sum_j exp(g_j/T),
    and so on down; its pairwise marginals are the Bradley-Terry draw above. T = 0 sorts by g.
    """
    rng = random.Random(seed)
    out = []
    for prompt, texts, g in _groups(prompts, completions, gold):
        if temperature <= 0:
            keys = list(g)
        else:
            keys = [gi / temperature - math.log(-math.log(rng.random() or 1e-300)) for gi in g]
        order = [i for i in sorted(range(len(texts)), key=lambda i: -keys[i]) if texts[i].strip()]
        if len(order) >= 2:
            out.append({"prompt": prompt, "responses": [texts[i] for i in order]})
    return out


def thumbs(prompts: list[str], completions: list[str], gold: list[float], temperature: float = 0.1,
           threshold: float | None = None, seed: int = 0) -> tuple[list[dict], float]:
    """Thumbs up (label True) with probability sigmoid((g - threshold) / T), one non-empty completion at a time.

    `threshold` defaults to the median gold reward of the completions shown, so about half
    get a thumbs up: an annotator judges against what they typically see. Returns the
    records and the threshold used.
    """
    if threshold is None:
        ordered = sorted(gold)
        mid = len(ordered) // 2
        threshold = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
    rng = random.Random(seed)
    out = []
    for prompt, texts, g in _groups(prompts, completions, gold):
        for text, gi in zip(texts, g):
            if not text.strip():
                continue
            up = gi > threshold if temperature <= 0 else rng.random() < sigmoid((gi - threshold) / temperature)
            out.append({"prompt": prompt, "completion": text, "label": bool(up)})
    return out, threshold
