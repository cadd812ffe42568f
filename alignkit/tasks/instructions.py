"""Instructions: the built-in Self-Instruct task, with a scripted stand-in for the teacher.

    alignkit self-instruct --seed_tasks alignkit/tasks/data/seed_tasks.jsonl \\
        --teacher alignkit.tasks.instructions:scripted_teacher --output runs/self-instruct/tasks.jsonl

`data/seed_tasks.jsonl` holds 20 human-written tasks with one right answer each (sums, a
word backwards, counting letters, sorting, ...), as Alpaca rows.

`scripted_teacher` is NOT a language model: it is a stand-in for a real teacher, so that the
Self-Instruct loop runs end to end with no network and no model download. It answers
self-instruct's generation prompt in the requested format with new tasks from a few templates
(arithmetic, words backwards, letter counts, sorting, ...) whose outputs are computed, so
correct. Like a real teacher, it is imperfect on purpose, so that every filter has work:
- a near-duplicate of an example of the prompt ("Please " before it: ROUGE-L F above 0.8);
- a block that breaks the format (no Input line: unparsed);
- a task a text model cannot do ("Draw a map of ...": the blocklist);
- an instruction too short ("Reverse garden.": the length filter).
What it writes is drawn by a random generator seeded with the prompt's text: the same prompt
gets the same reply. For real instruction data, point --teacher at a model.
"""

from __future__ import annotations

import hashlib
import random
import re
from pathlib import Path

SEED_TASKS = Path(__file__).parent / "data" / "seed_tasks.jsonl"
WORDS = ["garden", "river", "pencil", "orange", "window", "dragon", "planet", "silver", "castle", "butter", "candle",
         "forest", "rocket", "summer", "turtle", "violin", "yellow", "basket", "bridge", "cookie", "island", "kitten",
         "ladder", "mirror", "needle", "pepper", "rabbit", "saddle", "tomato", "wallet"]
ANTONYMS = {"hot": "cold", "early": "late", "empty": "full", "heavy": "light", "quiet": "loud", "rich": "poor",
            "wide": "narrow", "strong": "weak", "young": "old", "open": "closed", "happy": "sad", "fast": "slow"}
# Shares of the tasks in a reply that are not new, well-formed tasks (the rest are).
NEAR_DUPLICATE, MALFORMED, BLOCKLISTED, TOO_SHORT = 0.2, 0.05, 0.05, 0.05


def _numbers(rng: random.Random, k: int) -> list[int]:
    return rng.sample(range(2, 100), k)


def _arithmetic(rng):
    a, b = _numbers(rng, 2)
    op = rng.choice(["What is {a} plus {b}?", "Add {a} and {b}.", "Compute the sum of {a} and {b}.",
                     "What is {a} times {b}?", "Multiply {a} by {b}.", "What is {a} minus {b}?"])
    result = a * b if "times" in op or "Multiply" in op else a - b if "minus" in op else a + b
    return op.format(a=a, b=b), "", str(result)


def _sort(rng):
    nums = _numbers(rng, rng.randint(4, 6))
    if rng.random() < 0.5:
        return f"Sort {', '.join(map(str, nums))} from smallest to largest.", "", ", ".join(map(str, sorted(nums)))
    return "Sort the numbers from largest to smallest.", ", ".join(map(str, nums)), ", ".join(
        map(str, sorted(nums, reverse=True)))


def _larger(rng):
    a, b = _numbers(rng, 2)
    question = rng.choice(["Which is larger, {a} or {b}?", "Name the bigger number of {a} and {b}."])
    return question.format(a=a, b=b), "", str(max(a, b))


def _parity(rng):
    n = rng.randint(2, 999)
    return f"Is {n} an even or an odd number?", "", "even" if n % 2 == 0 else "odd"


def _word(rng):
    w = rng.choice(WORDS)
    kind = rng.randrange(4)
    if kind == 0:
        return f"Spell the word {w} backwards.", "", w[::-1]
    if kind == 1:
        return f"How many letters are in the word {w}?", "", str(len(w))
    if kind == 2:
        return f"How many vowels does the word {w} have?", "", str(sum(c in "aeiou" for c in w))
    a, b = rng.sample(WORDS, 2)
    return "Write the two words in capital letters.", f"{a} {b}", f"{a.upper()} {b.upper()}"


def _antonym(rng):
    w = rng.choice(sorted(ANTONYMS))
    return f"What is the opposite of the word {w}?", "", ANTONYMS[w]


def _alphabetical(rng):
    words = rng.sample(WORDS, 3)
    return f"Put {', '.join(words[:2])} and {words[2]} in alphabetical order.", "", ", ".join(sorted(words))


TEMPLATES = [_arithmetic, _arithmetic, _sort, _larger, _parity, _word, _antonym, _alphabetical]


def new_task(rng: random.Random) -> dict:
    """A fresh task from a template, its output computed."""
    instruction, input_, output = rng.choice(TEMPLATES)(rng)
    return {"instruction": instruction, "input": input_, "output": output}


def near_duplicate(task: dict) -> dict:
    """The same task asked with "Please" in front: one more word, ROUGE-L F = 2n / (2n + 1)."""
    text = task["instruction"]
    return {**task, "instruction": "Please " + text[:1].lower() + text[1:]}


def _block(i: int, task: dict) -> str:
    from alignkit.feedback.self_instruct import NO_INPUT, TASK

    return TASK.format(i=i, instruction=task["instruction"], input=task["input"] or NO_INPUT, output=task["output"])


def reply(prompt: str) -> str:
    """The scripted answer to one self-instruct generation prompt (see the module docstring)."""
    from alignkit.feedback.self_instruct import parse_tasks

    asked = re.search(r"come up with (\d+) new", prompt)
    start = prompt.find("1. Instruction:")
    if not asked or start < 0:
        raise ValueError("scripted_teacher answers alignkit self-instruct's generation prompt only")
    examples, _ = parse_tasks(prompt[start:])
    rng = random.Random(hashlib.sha256(prompt.encode()).digest())
    blocks = []
    for i in range(len(examples) + 1, len(examples) + 1 + int(asked.group(1))):
        u = rng.random()
        if u < NEAR_DUPLICATE and examples:
            blocks.append(_block(i, near_duplicate(rng.choice(examples))))
        elif (u := u - NEAR_DUPLICATE) < MALFORMED:
            task = new_task(rng)
            blocks.append(f"{i}. Instruction: {task['instruction']}\n{i}. Output:\n{task['output']}\n###\n")
        elif (u := u - MALFORMED) < BLOCKLISTED:
            blocks.append(_block(i, {"instruction": f"Draw a map of the {rng.choice(WORDS)}.", "input": "",
                                     "output": "(a map)"}))
        elif u - BLOCKLISTED < TOO_SHORT:
            w = rng.choice(WORDS)
            blocks.append(_block(i, {"instruction": f"Reverse {w}.", "input": "", "output": w[::-1]}))
        else:
            blocks.append(_block(i, new_task(rng)))
    return "".join(blocks)


def scripted_teacher(conversations: list[list[dict]]) -> list[str]:
    """A writer (module:function) for `alignkit self-instruct --teacher`: the reply to each
    conversation's last message, a self-instruct generation prompt. A stand-in for a teacher model."""
    return [reply(messages[-1]["content"]) for messages in conversations]
