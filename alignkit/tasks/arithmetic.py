"""Arithmetic: a generated task with a verifiable answer.

The pretraining corpus states sums in prose ("The sum of 12 and 7 is 19."); the SFT
data asks them in a fixed question/answer format the base model has never seen:

    prompt:     "Question: What is 12+7?\\nAnswer:"
    completion: " 19"            (then EOS)

so SFT has a format to teach, and exact match gives a gold reward for later stages.
"""

from __future__ import annotations

import random
import re

PHRASINGS = [
    "The sum of {a} and {b} is {c}.",
    "{a} plus {b} equals {c}.",
    "Adding {b} to {a} gives {c}.",
    "If you add {a} and {b} you get {c}.",
    "{a} and {b} make {c} together.",
]
ANSWER_FORMAT = re.compile(r"^ (-?\d+)$")


def _pairs(n: int, rng: random.Random, max_operand: int) -> list[tuple[int, int]]:
    return [(rng.randint(0, max_operand), rng.randint(0, max_operand)) for _ in range(n)]


def corpus(n: int = 4000, seed: int = 0, max_operand: int = 49) -> list[dict]:
    """Pretraining text records: sums stated in prose."""
    rng = random.Random(seed)
    return [{"text": rng.choice(PHRASINGS).format(a=a, b=b, c=a + b)} for a, b in _pairs(n, rng, max_operand)]


def prompt(a: int, b: int) -> str:
    return f"Question: What is {a}+{b}?\nAnswer:"


def sft_data(n: int = 1000, seed: int = 1, max_operand: int = 49) -> list[dict]:
    """SFT records in the question/answer format, with the answer kept for scoring."""
    rng = random.Random(seed)
    return [{"prompt": prompt(a, b), "completion": f" {a + b}", "answer": a + b} for a, b in _pairs(n, rng, max_operand)]


def score(completion: str, answer: int) -> dict[str, bool]:
    """follows_format: the completion is exactly ' <integer>'; correct: and the integer is the answer."""
    m = ANSWER_FORMAT.match(completion)
    return {"follows_format": m is not None, "correct": m is not None and int(m.group(1)) == answer}


def exact_match(prompts: list, completions: list[str], answer: list, **_) -> list[float]:
    """Verifiable reward: 1.0 when the completion is exactly ' <answer>', else 0.0."""
    return [1.0 if score(c, int(a))["correct"] else 0.0 for c, a in zip(completions, answer)]
