"""Search at inference, compared at equal samples: best-of-N by each verifier, and PRM-guided step beam search.

    rows = compare_search(policy, tokenizer, prompts, answers, exact_match,
                          verifiers={"orm": orm, "prm": prm}, ns=(4, 16), beam=prm, beam_width=4, max_new_tokens=32)

For each prompt the policy samples max(ns) completions once; best-of-N for N in `ns` reads the first N of
them, so every verifier picks from the same samples. A row per (method, N) gives the exact match of the
picked completion, averaged over prompts:

    first       the first sample (best-of-1: what the policy does alone)
    majority    the most common final answer among the N (self-consistency; ties to the earliest)
    <verifier>  the completion the verifier scores highest (ties to the earliest)
    gold        any of the N is right (pass@N: what a perfect verifier would reach)
    beam        step beam search guided by `beam`, n = N candidate steps per round (`step_beam_search`)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable


def majority_pick(answers: list) -> int:
    """Index of the first completion whose answer is the most common non-None one (0 when none has one)."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return 0
    top = max(counts.values())
    return next(i for i, a in enumerate(answers) if a is not None and counts[a] == top)


def compare_search(policy, tokenizer, prompts: list[str], answers: list, gold: Callable,
                   verifiers: dict[str, Callable], ns: tuple[int, ...] = (4, 16), *, max_new_tokens: int,
                   final_answer: Callable[[str], object] | None = None, beam=None, beam_width: int = 4,
                   beam_prompts: int | None = None, temperature: float = 1.0, seed: int = 0) -> list[dict]:
    """Rows {"method", "n", "exact_match", "prompts"} (module docstring). `gold(prompts, completions, answer=...)`
    scores 1.0 for a right completion; `verifiers` are reward functions f(prompts, completions); `final_answer`
    reads a completion's answer for majority voting (no majority rows without it); `beam` a ProcessRewardModel
    (beam search on the first `beam_prompts` prompts, each N of `ns` divisible by beam_width)."""
    from alignkit.data import tokenize_prompts
    from alignkit.rollout.best_of_n import sample_and_score

    n_max = max(ns)
    examples, _ = tokenize_prompts([{"prompt": p, "answer": a} for p, a in zip(prompts, answers)], tokenizer,
                                   max_length=2**62)
    samples = sample_and_score(policy, tokenizer, examples, n_max, [gold], [1.0], max_new_tokens=max_new_tokens,
                               temperature=temperature, seed=seed)
    repeated = [p for p in prompts for _ in range(n_max)]
    scores = {name: fn(repeated, samples.texts) for name, fn in verifiers.items()}
    right = [r > 0.5 for r in samples.rewards]
    rows = []

    def row(method: str, n: int, hits: list[bool]) -> None:
        rows.append({"method": method, "n": n, "exact_match": sum(hits) / len(hits), "prompts": len(hits)})

    row("first", 1, [right[i * n_max] for i in range(len(prompts))])
    for n in ns:
        groups = [list(samples.group(i))[:n] for i in range(len(prompts))]
        if final_answer is not None:
            row("majority", n, [right[g[majority_pick([final_answer(samples.texts[r]) for r in g])]] for g in groups])
        for name, s in scores.items():
            # max keeps the first of equal scores: ties go to the earliest sample
            row(name, n, [right[max(g, key=lambda r: s[r])] for g in groups])
        row("gold", n, [any(right[r] for r in g) for g in groups])
    if beam is not None:
        from alignkit.rollout.step_search import step_beam_search

        k = len(prompts) if beam_prompts is None else min(beam_prompts, len(prompts))
        for n in ns:
            found = step_beam_search(policy, tokenizer, beam, prompts[:k], n=n, beam_width=min(beam_width, n),
                                     max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
            hits = gold(prompts[:k], [f["best"] for f in found], answer=answers[:k])
            row("beam", n, [h > 0.5 for h in hits])
    return rows


def table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The rows as (headers, cells): one row per method, one column per N, "-" where a method has no such N."""
    ns = sorted({r["n"] for r in rows})
    cell = {(r["method"], r["n"]): f"{r['exact_match']:.3f}" for r in rows}
    methods = dict.fromkeys(r["method"] for r in rows)
    return ["method"] + [f"N={n}" for n in ns], [[m] + [cell.get((m, n), "-") for n in ns] for m in methods]


def format_rows(rows: list[dict]) -> str:
    """The rows as a text table (`table`)."""
    headers, cells = table(rows)
    return "\n".join(f"{line[0]:<12}" + "".join(f"{c:<9}" for c in line[1:]) for line in [headers] + cells)
