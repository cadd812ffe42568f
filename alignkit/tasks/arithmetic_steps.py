"""Multi-step arithmetic: a generated task whose every step is verifiable.

A question chains 2..4 additions and subtractions; the completion works it out one
operation per step, steps separated by SEPARATOR, and ends with the answer:

    prompt:     "Question: What is 37+48-12?\\nAnswer:"
    completion: " 37+48=85; 85-12=73; so 73"     (then EOS)
    steps:      ["37+48=85", "85-12=73", "so 73"]

Subtraction is only drawn while the running value stays >= 0, so every value is a
non-negative integer. `check_steps` gives the gold label of each step (for process
reward models), `exact_match` the outcome reward, and `corrupt` wrong solutions whose
first wrong step is known, including ones that reach the right answer by luck.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

SEPARATOR = ";"
OPS = ("+", "-")
CORRUPTIONS = ("slip", "final", "operand", "recovery")

_PROMPT = re.compile(r"Question: What is ([0-9]+(?:[+-][0-9]+)+)\?\nAnswer:")
# [0-9], not \d: \d also matches non-ASCII digits, which int() would quietly accept.
_EQUATION = re.compile(r"\s*([0-9]+)\s*([+-])\s*([0-9]+)\s*=\s*([0-9]+)\s*")
_SO = re.compile(r"\s*so\s+([0-9]+)\s*")
_OFFSETS = (-3, -2, -1, 1, 2, 3)


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b


@dataclass(frozen=True)
class Question:
    """operands[0] ops[0] operands[1] ops[1] ... evaluated left to right."""

    operands: tuple[int, ...]
    ops: tuple[str, ...]

    def __post_init__(self):
        # Coerce lists to tuples so questions stay hashable and comparable.
        object.__setattr__(self, "operands", tuple(self.operands))
        object.__setattr__(self, "ops", tuple(self.ops))
        if not self.ops or len(self.operands) != len(self.ops) + 1:
            raise ValueError(f"need one operand more than ops and at least one op, got {self.operands} {self.ops}")
        if any(op not in OPS for op in self.ops):
            raise ValueError(f"ops must be '+' or '-', got {self.ops}")
        if any(not isinstance(x, int) or x < 0 for x in self.operands):
            raise ValueError(f"operands must be non-negative integers, got {self.operands}")
        if min(self.values) < 0:
            raise ValueError(f"running value goes negative in {self.text}")

    @property
    def values(self) -> tuple[int, ...]:
        """The running value after 0, 1, ..., len(ops) operations."""
        values = [self.operands[0]]
        for op, b in zip(self.ops, self.operands[1:]):
            values.append(_apply(values[-1], op, b))
        return tuple(values)

    @property
    def text(self) -> str:
        return str(self.operands[0]) + "".join(f"{op}{b}" for op, b in zip(self.ops, self.operands[1:]))

    @property
    def answer(self) -> int:
        return self.values[-1]

    @property
    def prompt(self) -> str:
        return f"Question: What is {self.text}?\nAnswer:"

    def true_steps(self) -> list[str]:
        """The correct solution: one "a+b=c" per operation, then "so <answer>"."""
        v = self.values
        return [f"{v[k]}{op}{b}={v[k + 1]}" for k, (op, b) in enumerate(zip(self.ops, self.operands[1:]))] + [
            f"so {self.answer}"
        ]


def parse_question(prompt: str) -> Question:
    """The Question a prompt asks; ValueError when `prompt` is not one of this task's prompts."""
    m = _PROMPT.fullmatch(prompt)
    if m is None:
        raise ValueError(f"not an arithmetic_steps prompt (want 'Question: What is 37+48-12?\\nAnswer:'): {prompt!r}")
    text = m.group(1)
    return Question(tuple(int(x) for x in re.findall(r"[0-9]+", text)), tuple(re.findall(r"[+-]", text)))


def _check_bounds(max_operand: int, min_ops: int, max_ops: int) -> None:
    if max_operand < 0:
        raise ValueError(f"max_operand must be >= 0, got {max_operand}")
    if not 1 <= min_ops <= max_ops:
        raise ValueError(f"need 1 <= min_ops <= max_ops, got {min_ops}, {max_ops}")


def _draw(rng: random.Random, max_operand: int, min_ops: int, max_ops: int) -> Question:
    value = rng.randint(0, max_operand)
    operands, ops = [value], []
    for _ in range(rng.randint(min_ops, max_ops)):
        b = rng.randint(0, max_operand)
        # Draw '-' only where it keeps the running value non-negative.
        op = rng.choice(OPS) if b <= value else "+"
        value = _apply(value, op, b)
        operands.append(b)
        ops.append(op)
    return Question(tuple(operands), tuple(ops))


def questions(n: int, seed: int = 0, max_operand: int = 19, min_ops: int = 2, max_ops: int = 4) -> list[Question]:
    """`n` random questions of min_ops..max_ops operations over operands 0..max_operand."""
    _check_bounds(max_operand, min_ops, max_ops)
    rng = random.Random(seed)
    return [_draw(rng, max_operand, min_ops, max_ops) for _ in range(n)]


def format_completion(steps: list[str]) -> str:
    """The completion text for `steps`: " step; step; so N"."""
    return " " + f"{SEPARATOR} ".join(steps)


def split_steps(completion: str) -> list[str]:
    """The steps of a completion, stripped; empty pieces stay as "" so malformed text shows."""
    if not completion.strip():
        return []
    return [piece.strip() for piece in completion.split(SEPARATOR)]


def check_steps(question: Question, steps: list[str]) -> list[bool]:
    """Gold label of each step, judged against the true solution, not the previous step.

    Step k < len(ops) is correct iff it reads "a op b = c" with a the true running value,
    op and b the question's k-th operation and c the true result; step len(ops) iff it
    reads "so <answer>". Anything else (wrong shape, extra steps) is incorrect.
    """
    v, n = question.values, len(question.ops)
    labels = []
    for k, step in enumerate(steps):
        if k < n:
            m = _EQUATION.fullmatch(step)
            want = (v[k], question.ops[k], question.operands[k + 1], v[k + 1])
            ok = m is not None and (int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))) == want
        elif k == n:
            m = _SO.fullmatch(step)
            ok = m is not None and int(m.group(1)) == question.answer
        else:
            ok = False
        labels.append(ok)
    return labels


def first_error(labels: list[bool]) -> int:
    """Index of the first incorrect step; len(labels) when every step is correct."""
    return next((k for k, ok in enumerate(labels) if not ok), len(labels))


def final_answer(completion: str) -> int | None:
    """N when the completion's last step is "so N", else None."""
    steps = split_steps(completion)
    m = _SO.fullmatch(steps[-1]) if steps else None
    return int(m.group(1)) if m else None


def exact_match(prompts: list, completions: list[str], answer: list, **_) -> list[float]:
    """Outcome reward: 1.0 when the final "so N" is the answer, whatever the steps say."""
    return [1.0 if final_answer(c) == int(a) else 0.0 for c, a in zip(completions, answer)]


def _offsets(floor: int, ceil: int = max(_OFFSETS)) -> list[int]:
    """The small nonzero offsets d with floor <= d <= ceil."""
    return [d for d in _OFFSETS if floor <= d <= ceil]


def _chain(start: int, ops: tuple[str, ...], operands: tuple[int, ...]) -> list[str]:
    """Arithmetically correct steps from `start` on (a possibly wrong value)."""
    steps, a = [], start
    for op, b in zip(ops, operands):
        c = _apply(a, op, b)
        steps.append(f"{a}{op}{b}={c}")
        a = c
    return steps


def _operand_offsets(question: Question, k: int) -> list[int]:
    """Offsets d for a wrong operand at step k: the result moves by d, as every later value.

    '+' with b+d moves the result by d, '-' with b-d does; d is bounded so that the
    wrong operand and every shifted value stay non-negative.
    """
    b, floor = question.operands[k + 1], -min(question.values[k + 1 :])
    return _offsets(max(floor, -b)) if question.ops[k] == "+" else _offsets(floor, b)


def corrupt(question: Question, rng: random.Random, kind: str | None = None) -> list[str]:
    """One wrong solution, of `kind` (drawn at random from CORRUPTIONS when None):

    slip:     step k's result is off by a small amount; later steps compute correctly
              from the wrong value, and "so" states the wrong final value.
    final:    the right chain with a wrong "so" number.
    operand:  step k uses a wrong second operand, carried forward like a slip.
    recovery: a slip at step k, then a later step whose result is the true value again,
              so the final answer is right although steps are wrong.

    Every value written stays a non-negative integer, so each step is well formed and
    only its content is wrong. At least one step is always labelled wrong.
    """
    ops, bs, v, n = question.ops, question.operands[1:], question.values, len(question.ops)
    operand_ks = [k for k in range(n) if _operand_offsets(question, k)]
    # recovery needs an operation after the slip; operand needs a step where a wrong
    # operand keeps every value non-negative (not so for e.g. 3-0-3).
    kinds = tuple(c for c in CORRUPTIONS if not (c == "recovery" and n < 2 or c == "operand" and not operand_ks))
    kind = kind or rng.choice(kinds)
    if kind not in kinds:
        raise ValueError(f"kind must be one of {kinds} for {question.text}, got {kind!r}")
    true = question.true_steps()

    if kind == "final":
        steps = true[:-1] + [f"so {question.answer + rng.choice(_offsets(-question.answer))}"]
    elif kind == "slip":
        k = rng.randrange(n)
        d = rng.choice(_offsets(-min(v[k + 1 :])))
        wrong = f"{v[k]}{ops[k]}{bs[k]}={v[k + 1] + d}"
        steps = true[:k] + [wrong] + _chain(v[k + 1] + d, ops[k + 1 :], bs[k + 1 :]) + [f"so {v[-1] + d}"]
    elif kind == "operand":
        k = rng.choice(operand_ks)
        d = rng.choice(_operand_offsets(question, k))
        b = bs[k] + d if ops[k] == "+" else bs[k] - d
        wrong = f"{v[k]}{ops[k]}{b}={v[k + 1] + d}"
        steps = true[:k] + [wrong] + _chain(v[k + 1] + d, ops[k + 1 :], bs[k + 1 :]) + [f"so {v[-1] + d}"]
    else:  # recovery
        k = rng.randrange(n - 1)
        r = rng.randrange(k + 1, n)
        d = rng.choice(_offsets(-min(v[k + 1 : r + 1])))
        slipped = [f"{v[k]}{ops[k]}{bs[k]}={v[k + 1] + d}"] + _chain(v[k + 1] + d, ops[k + 1 : r], bs[k + 1 : r])
        # Step r starts from the wrong value yet states the true result (a second,
        # compensating slip); from there on the chain is the true one.
        lucky = f"{v[r] + d}{ops[r]}{bs[r]}={v[r + 1]}"
        steps = true[:k] + slipped + [lucky] + true[r + 1 :]

    assert not all(check_steps(question, steps)), (question, kind, steps)
    return steps


SINGLE_PHRASINGS = {
    "+": ["{a}+{b}={c}.", "{a} plus {b} is {c}.", "Adding {b} to {a} gives {c}."],
    "-": ["{a}-{b}={c}.", "{a} minus {b} is {c}.", "Taking {b} away from {a} leaves {c}."],
}
_VERBS = {"+": ("add", "adding"), "-": ("take away", "taking away")}


def _chain_text(q: Question, rng: random.Random) -> str:
    """A chain in prose or as one equation, e.g. "Start with 37, add 48 to get 85, ..."."""
    v, moves = q.values, list(zip(q.ops, q.operands[1:]))
    style = rng.randrange(3)
    if style == 0:
        return f"Start with {v[0]}, " + ", then ".join(
            f"{_VERBS[op][0]} {b} to get {v[k + 1]}" for k, (op, b) in enumerate(moves)
        ) + "."
    if style == 1:
        return f"{v[0]} to begin with. " + " ".join(
            f"After {_VERBS[op][1]} {b} we have {v[k + 1]}." for k, (op, b) in enumerate(moves)
        )
    return f"{q.text}={q.answer}."


def corpus(n: int = 4000, seed: int = 0, max_operand: int = 19) -> list[dict]:
    """Pretraining text records: single operations and 2..4-step chains, in prose and as equations.

    Chains never use the SFT format ("...; so N"): that is what SFT teaches.
    """
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        # Half single operations, half chains: single steps teach the arithmetic, chains
        # that results feed the next operation.
        q = _draw(rng, max_operand, 1, 1) if rng.random() < 0.5 else _draw(rng, max_operand, 2, 4)
        if len(q.ops) == 1:
            a, b, c = q.operands[0], q.operands[1], q.answer
            text = rng.choice(SINGLE_PHRASINGS[q.ops[0]]).format(a=a, b=b, c=c)
        else:
            text = _chain_text(q, rng)
        records.append({"text": text})
    return records


def sft_data(n: int = 1000, seed: int = 1, max_operand: int = 19, min_ops: int = 2, max_ops: int = 4) -> list[dict]:
    """SFT records: the prompt, the correct worked completion, its steps and the answer."""
    records = []
    for q in questions(n, seed, max_operand, min_ops, max_ops):
        steps = q.true_steps()
        records.append({"prompt": q.prompt, "completion": format_completion(steps), "answer": q.answer, "steps": steps})
    return records


def step_data(
    n: int = 1000,
    seed: int = 2,
    max_operand: int = 19,
    error_fraction: float = 0.5,
    min_ops: int = 2,
    max_ops: int = 4,
) -> list[dict]:
    """Step-labelled solutions for process reward models: {"prompt", "steps", "labels", "answer"}.

    round(n * error_fraction) records hold a `corrupt` solution (at least one 0 label),
    the rest the correct one (all labels 1); which ones is shuffled.
    """
    if not 0.0 <= error_fraction <= 1.0:
        raise ValueError(f"error_fraction must be in [0, 1], got {error_fraction}")
    _check_bounds(max_operand, min_ops, max_ops)
    rng = random.Random(seed)
    n_wrong = round(n * error_fraction)
    # An exact count, not a coin per record, so small sets have the fraction asked for.
    wrong = [i < n_wrong for i in range(n)]
    rng.shuffle(wrong)
    records = []
    for is_wrong in wrong:
        q = _draw(rng, max_operand, min_ops, max_ops)
        steps = corrupt(q, rng) if is_wrong else q.true_steps()
        labels = [int(ok) for ok in check_steps(q, steps)]
        records.append({"prompt": q.prompt, "steps": steps, "labels": labels, "answer": q.answer})
    return records


def labelled_solutions(prompts: list[str], completions: list[str]) -> list[dict]:
    """Completions (a policy's samples) as step-labelled records for `alignkit prm --step_separator ";"`:
    {"prompt", "steps", "labels", "answer", "correct"}. The steps are the completion's pieces between
    separators exactly as written (leading space kept), so prompt + each step + ";" is the completion
    with a ";" after its last step; labels are `check_steps`' (the gold step labels); correct is the
    outcome (the final answer is right). A trailing separator ends the last step (as
    `ProcessRewardModel.split` reads it); a record with an empty step (no text, or ";;") is not a
    valid steps record, and `usable` says so: the caller counts and skips it."""
    records = []
    for prompt, completion in zip(prompts, completions):
        question = parse_question(prompt)
        pieces = completion.split(SEPARATOR)
        if pieces and not pieces[-1].strip():
            pieces.pop()
        labels = check_steps(question, [p.strip() for p in pieces])
        records.append({"prompt": prompt, "steps": pieces, "labels": [int(x) for x in labels],
                        "answer": question.answer, "correct": final_answer(completion) == question.answer,
                        "usable": bool(pieces) and all(p.strip() for p in pieces)})
    return records
