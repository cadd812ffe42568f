"""Step labels without a step checker: Monte-Carlo estimates from rollouts (Math-Shepherd, Wang et al. 2024).

    labels = monte_carlo_step_labels(model, tokenizer, prompts, steps, reward_fn, fields={"answer": answers},
                                     separator=";", k=8, max_new_tokens=32)

From the prefix that ends with step i (the prompt, steps 1..i, each followed by the separator), the policy
completes the solution k times; the outcome reward (1 = the right answer) of each completion says whether
the prefix can still reach it. Step i's label is the fraction that did (soft, `mode` "fraction") or
whether any did (hard, "any"). The last step's label is the solution's own outcome: nothing is left to
sample. A PRM trained on these labels needs only an outcome reward, not a step checker.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def monte_carlo_step_labels(model, tokenizer, prompts: list[str], steps: list[list[str]], reward_fn,
                            fields: dict[str, list] | None = None, *, separator: str, k: int, max_new_tokens: int,
                            mode: str = "fraction", temperature: float = 1.0, batch_size: int = 64,
                            seed: int = 0) -> list[list[float]]:
    """One label per step of each solution (see the module docstring). `reward_fn(prompts, completions,
    **fields)` scores a whole completion (prefix + continuation), > 0.5 meaning right; `fields` holds one
    value per solution (e.g. its answer)."""
    from alignkit.data import tokenize_prompts
    from alignkit.rollout.best_of_n import sample_and_score

    if mode not in ("fraction", "any"):
        raise ValueError(f"mode must be 'fraction' or 'any', got {mode!r}")
    fields = fields or {}
    prefixes = []  # (solution, step, prompt + prefix text, the prefix alone)
    for i, (prompt, solution) in enumerate(zip(prompts, steps)):
        for j in range(len(solution) - 1):
            prefix = separator.join(solution[: j + 1]) + separator
            prefixes.append((i, j, prompt + prefix, prefix))
    records = [{"prompt": text, "prefix_index": n, **{name: values[i] for name, values in fields.items()}}
               for n, (i, _, text, _) in enumerate(prefixes)]
    labels = [[0.0] * len(s) for s in steps]
    finals = reward_fn(prompts, [separator.join(s) for s in steps], **fields)
    for i, solution in enumerate(steps):
        if solution:
            labels[i][-1] = float(finals[i] > 0.5)
    if not records:
        return labels
    examples, _ = tokenize_prompts(records, tokenizer, max_length=2**62)

    def outcome(texts, completions, prefix_index, **kw):  # the continuation scored as part of the whole solution
        at = [prefixes[n] for n in prefix_index]
        return reward_fn([prompts[i] for i, *_ in at], [p + c for (*_, p), c in zip(at, completions)], **kw)

    samples = sample_and_score(model, tokenizer, examples, k, [outcome], [1.0], max_new_tokens=max_new_tokens,
                               temperature=temperature, batch_size=batch_size, seed=seed)
    for n, (i, j, _, _) in enumerate(prefixes):
        hits = [samples.rewards[r] > 0.5 for r in samples.group(n)]
        labels[i][j] = float(any(hits)) if mode == "any" else sum(hits) / k
    return labels
