"""Search guided by a process reward model: step-level beam search (Snell et al. 2024, §5).

    from alignkit.models.process_reward import ProcessRewardModel
    from alignkit.rollout.step_search import step_beam_search

    prm = ProcessRewardModel.load("runs/prm")
    out = step_beam_search(model, tokenizer, prm, ["Question: What is 3+4-2?\\nAnswer:"], n=16, beam_width=4,
                           max_new_tokens=32, seed=0)
    out[0]["best"], out[0]["best_score"]

Each round draws n candidate steps: every live beam is extended by n / (live beams) samples of ONE
step (up to the next separator or EOS; the first round's one empty beam by all n); every candidate is scored by the PRM on its steps so far (aggregated as the PRM's
`aggregate`), and the beam_width best survive. A candidate that ended with EOS leaves the beam as a
finished solution. The search stops when no beam is left or `max_new_tokens` are spent, and returns
the finished solution with the best score (a beam cut off at the limit counts when none finished).
PRM-guided best-of-N needs nothing new: a PRM folder (or a ProcessRewardModel) is a reward for
`best_of_n`, which scores each whole completion by its steps' aggregate.
"""

from __future__ import annotations

import torch

from alignkit.models.process_reward import aggregate_steps


def separator_token_ids(tokenizer, separator: str) -> list[int]:
    """The ids of every vocabulary token whose text holds `separator`: a step can end on any of them."""
    ids = [i for i in range(len(tokenizer)) if separator in tokenizer.decode([i], skip_special_tokens=True)]
    if not ids:
        raise ValueError(f"no token of the policy's vocabulary contains the step separator {separator!r}")
    return ids


@torch.no_grad()
def step_beam_search(model, tokenizer, prm, prompts: list[str], n: int, beam_width: int, *, max_new_tokens: int,
                     max_step_tokens: int | None = None, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                     seed: int = 0) -> list[dict]:
    """Step-level beam search of each prompt with `n` candidate steps per round (n // live beams from each). Returns one dict per prompt: prompt, best (text), best_token_ids,
    best_score (the PRM's aggregate of its steps), ended (whether it emitted EOS), rounds and samples
    (candidate steps drawn: the search's cost in samples; best-of-N draws n whole completions)."""
    from alignkit.data import tokenize_prompts
    from alignkit.rollout.sampler import sample

    if beam_width < 1 or n < beam_width or n % beam_width:
        raise ValueError(f"n ({n}) must be a multiple of beam_width ({beam_width}), both >= 1")
    device = next(model.parameters()).device
    stop_ids = [tokenizer.eos_token_id] + separator_token_ids(tokenizer, prm.separator)
    max_step_tokens = max_step_tokens or max_new_tokens
    examples, _ = tokenize_prompts([{"prompt": p} for p in prompts], tokenizer, max_length=2**62)
    results = []
    generator = torch.Generator().manual_seed(seed)
    for ex in examples:
        beams = [[]]  # each a list of completion token ids so far
        finished: list[tuple[float, list[int], bool]] = []
        cut_off: list[tuple[float, list[int], bool]] = []
        rounds = samples = 0
        while beams:
            rounds += 1
            expand = n // len(beams)
            rows = [ex["input_ids"] + b for b in beams]
            width = max(map(len, rows))
            ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows], device=device)
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
            budget = min(max_step_tokens, max_new_tokens - max(map(len, beams)))
            rollout = sample(model, ids, mask, num_samples=expand, max_new_tokens=budget, eos_token_id=stop_ids,
                             pad_token_id=tokenizer.pad_token_id, temperature=temperature, top_k=top_k, top_p=top_p,
                             generator=generator)
            samples += len(rollout.ended)
            candidates = [beams[r // expand] + step[m.bool()].tolist()
                          for r, (step, m) in enumerate(zip(rollout.completion_ids.cpu(), rollout.completion_mask.cpu()))]
            texts = tokenizer.batch_decode(candidates, skip_special_tokens=True)
            steps = [prm.split(t) for t in texts]
            scores = [aggregate_steps(s, prm.aggregate) for s in prm.step_scores([ex["prompt"]] * len(texts), steps)]
            beams = []
            for score, completion in sorted(zip(scores, candidates), key=lambda c: -c[0]):
                if completion and completion[-1] == tokenizer.eos_token_id:
                    finished.append((score, completion, True))
                elif len(completion) >= max_new_tokens:
                    cut_off.append((score, completion, False))
                elif len(beams) < beam_width:
                    beams.append(completion)
            if len(finished) >= beam_width:  # as many solutions as beams: the search is done
                beams = []
        score, best, ended = max(finished or cut_off, key=lambda c: c[0])
        results.append({"prompt": ex["prompt"], "best": tokenizer.decode(best, skip_special_tokens=True),
                        "best_token_ids": best, "best_score": score, "ended": ended, "rounds": rounds,
                        "samples": samples})
    return results
