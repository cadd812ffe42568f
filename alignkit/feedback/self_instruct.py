"""Self-Instruct: a teacher model writes new instruction data from a few human-written tasks.

    alignkit self-instruct --seed_tasks seed_tasks.jsonl --output tasks.jsonl \\
        --teacher openai-chat:MODEL@http://127.0.0.1:8000/v1 --num_instructions 1000

The loop of Wang et al. (2022), "Self-Instruct", as Stanford Alpaca ran it:
1. draw `prompt_examples` tasks: `generated_examples` of them from the tasks kept so far
   (as many as there are), the rest from the seed tasks; shuffle them;
2. prompt the teacher with them as numbered Instruction / Input / Output blocks, each ended
   by a line `###`, asking for `tasks_per_request` more in the same format (PROMPT);
3. parse the reply strictly (parse_tasks): a block that is not exactly one numbered
   Instruction / Input / Output triple, or is not closed by `###` (cut off by
   max_new_tokens), is counted as unparsed, never guessed at;
4. filter each task, in order:
   - format: an empty instruction or output, a word of `blocklist` (tasks a text model
     cannot do: "image", "draw", "go to", ...), an instruction that does not start with a
     letter or digit;
   - length: the instruction has min_words <= words <= max_words;
   - novelty: ROUGE-L F against every instruction of the pool (the seed tasks and the tasks
     kept so far), F = 2 P R / (P + R) with P = LCS / |candidate|, R = LCS / |reference|
     over `rouge_score`'s tokens (lowercased words); dropped when max F > rouge_threshold;
5. keep the rest, with their provenance, until `num_instructions` are kept or
   `max_requests` requests were sent (a teacher that only repeats itself ends, reported).

Requests go out `concurrency` at a time, all drawing from the pool as it was before them.
The output is Alpaca rows (`instruction`, `input`, `output`: `alignkit sft` reads them) with
`teacher`, `request` (the request's index), `most_similar` (the closest pool instruction) and
its `rouge_l`, and the prompt's examples: `prompt_seeds` (indices of seed tasks) and
`prompt_generated` (indices of rows of this file). Novelty costs one ROUGE-L per pool
instruction per candidate: O(N^2) for N instructions.
"""

from __future__ import annotations

import json
import math
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

# Self-Instruct's and Alpaca's blocklist: what a text-only model cannot do.
BLOCKLIST = ["image", "images", "picture", "pictures", "graph", "graphs", "file", "files", "map", "maps", "draw",
             "plot", "go to", "video", "audio", "music", "flowchart", "diagram"]
NO_INPUT = "<noinput>"
PROMPT = """You are asked to come up with {n} new, diverse tasks to teach a language model to follow instructions.
Each task has an instruction, an input (write {no_input} when the task needs none) and a correct output.
- Do not repeat the examples or each other: vary the verbs, the topics and the kinds of task.
- A language model must be able to do the task in text alone: no images, audio, files or actions in the world.
- The instruction is one or two sentences; the output answers it correctly and briefly.
- Number the new tasks from {start} to {end}, in exactly the format of the examples, each ended by a line ###.

{examples}"""
TASK = "{i}. Instruction: {instruction}\n{i}. Input:\n{input}\n{i}. Output:\n{output}\n###\n"
BLOCK = re.compile(r"(\d+)\.[ \t]*Instruction:(.*?)\n\1\.[ \t]*Input:(.*?)\n\1\.[ \t]*Output:(.*)", re.DOTALL)
LABEL = re.compile(r"^\s*\d+\.\s*(Instruction|Input|Output):", re.MULTILINE)


@dataclass
class SelfInstructConfig:
    """Self-Instruct: a teacher model writes instruction data (Alpaca rows) from a few seed tasks."""

    seed_tasks: str = ""
    """Human-written tasks: Alpaca rows (instruction, input, output) or Self-Instruct's seed_tasks.jsonl."""
    teacher: str = ""
    """The teacher: openai-chat:MODEL@URL, lm:PATH (a local model) or module:function (f(conversations) -> replies)."""
    output: str = ""
    """The file written (.jsonl): Alpaca rows with provenance."""
    num_instructions: int = 100
    """Stop when this many new tasks are kept."""
    prompt_examples: int = 8
    """Example tasks shown in each request."""
    generated_examples: int = 2
    """Of those, how many are drawn from the tasks kept so far (Self-Instruct: 2 of 8); the rest are seed tasks."""
    tasks_per_request: int = 8
    """New tasks asked for in each request."""
    rouge_threshold: float = 0.7
    """Drop a task whose instruction has ROUGE-L F above this with any instruction of the pool."""
    min_words: int = 4
    """Drop an instruction of fewer words."""
    max_words: int = 150
    """Drop an instruction of more words."""
    blocklist: list[str] = field(default_factory=lambda: list(BLOCKLIST))
    """Drop a task whose instruction contains one of these words or phrases (case-insensitive, whole words)."""
    max_requests: int = 1000
    """Stop after this many requests even when fewer than num_instructions tasks were kept."""
    temperature: float = 1.0
    """Sampling temperature of the teacher."""
    max_new_tokens: int = 1536
    """Longest reply of the teacher (a block it cuts off is counted as unparsed)."""
    seed: int = 0
    """Seed of the examples drawn for each request (and of a local teacher's sampling)."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the endpoint's key (never a config value)."""
    concurrency: int = 8
    """Requests sent at once: endpoint requests in flight, or one batch of a local or Python teacher."""
    timeout: float = 60.0
    """Seconds an endpoint request may take before it is retried."""
    max_retries: int = 3
    """Retries of a failed endpoint request (429, 5xx, timeout), with exponential backoff."""

    def validate(self) -> None:
        from alignkit.config import ConfigError

        if min(self.num_instructions, self.prompt_examples, self.tasks_per_request, self.max_requests) < 1:
            raise ConfigError("num_instructions, prompt_examples, tasks_per_request and max_requests must be >= 1")
        if not 0 <= self.generated_examples <= self.prompt_examples:
            raise ConfigError(f"generated_examples must be in [0, prompt_examples], got {self.generated_examples}")
        if not 0 < self.rouge_threshold <= 1:
            raise ConfigError(f"rouge_threshold must be in (0, 1], got {self.rouge_threshold}")
        if not 1 <= self.min_words <= self.max_words:
            raise ConfigError(f"need 1 <= min_words <= max_words, got {self.min_words} and {self.max_words}")
        if self.concurrency < 1 or self.timeout <= 0 or self.max_retries < 0:
            raise ConfigError("concurrency must be >= 1, timeout > 0 and max_retries >= 0")


def load_seed_tasks(path: str) -> list[dict]:
    """[{instruction, input, output}] of Alpaca rows, or of Self-Instruct's rows
    ({instruction, instances: [{input, output}, ...]}: the first instance)."""
    from alignkit.data import DataError, load_records

    lines = Path(path).read_text(encoding="utf-8").splitlines() if Path(path).suffix == ".jsonl" else []
    first = next((line for line in lines if line.strip()), "")
    if '"instances"' not in first:
        tasks = []
        for r in load_records(path, "sft"):
            if not isinstance(r.get("instruction"), str):
                raise DataError(r["_where"], "instruction", "a seed task is an Alpaca row (instruction, input, output)")
            tasks.append({"instruction": r["instruction"].strip(), "input": (r.get("input") or "").strip(),
                          "output": r["output"].strip()})
        return tasks
    tasks = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            instance = row["instances"][0]
            task = {"instruction": row["instruction"], "input": instance.get("input") or "",
                    "output": instance["output"]}
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
            raise DataError(f"{path}:{n}", "instances", "expected Self-Instruct's {instruction, instances: "
                            f"[{{input, output}}]}} ({type(e).__name__}: {e})") from None
        if not all(isinstance(v, str) for v in task.values()) or not task["instruction"].strip():
            raise DataError(f"{path}:{n}", "instruction", "instruction, input and output must be strings, "
                            "the instruction not empty")
        tasks.append({k: v.strip() for k, v in task.items()})
    if not tasks:
        raise DataError(path, None, "no records")
    return tasks


def format_prompt(examples: list[dict], n: int) -> str:
    """The generation prompt: `examples` as numbered blocks, asking for `n` more."""
    blocks = "".join(TASK.format(i=i, instruction=t["instruction"], input=t["input"] or NO_INPUT, output=t["output"])
                     for i, t in enumerate(examples, 1))
    k = len(examples)
    return PROMPT.format(n=n, no_input=NO_INPUT, start=k + 1, end=k + n, examples=blocks)


def parse_tasks(reply: str) -> tuple[list[dict], int]:
    """(tasks, unparsed blocks) of a teacher's reply. Blocks are the text between lines `###`;
    each must be exactly `i. Instruction: ...`, `i. Input: ...`, `i. Output: ...` (one number,
    no further label inside a field); the text after the last `###` is an unclosed block."""
    *closed, tail = re.split(r"^[ \t]*###[ \t]*$", reply, flags=re.MULTILINE)
    tasks, unparsed = [], int(bool(tail.strip()))
    for block in filter(str.strip, closed):
        m = BLOCK.fullmatch(block.strip())
        fields = [f.strip() for f in m.groups()[1:]] if m else []
        if not m or any(LABEL.search(f) for f in fields):
            unparsed += 1
            continue
        instruction, input_, output = fields
        tasks.append({"instruction": instruction, "input": "" if input_ == NO_INPUT else input_, "output": output})
    return tasks, unparsed


def format_problem(task: dict, blocklist: list[str]) -> str | None:
    """Why a task fails the format filter, or None."""
    instruction = task["instruction"]
    if not instruction or not task["output"]:
        return "empty instruction or output"
    for word in blocklist:
        if re.search(rf"\b{re.escape(word.lower())}\b", instruction.lower()):
            return f"blocklisted {word!r}"
    if not instruction[0].isalnum():
        return "starts with a non-alphanumeric character"
    return None


def length_ok(instruction: str, min_words: int, max_words: int) -> bool:
    """min_words <= number of whitespace-separated words <= max_words."""
    return min_words <= len(instruction.split()) <= max_words


def rouge_scorer():
    """rouge_score's ROUGE-L scorer (no stemming, as Self-Instruct)."""
    try:
        from rouge_score.rouge_scorer import RougeScorer
    except ImportError:
        from alignkit.feedback.endpoint import FeedbackError

        raise FeedbackError("self-instruct needs rouge-score: pip install 'alignkit[feedback]'") from None
    return RougeScorer(["rougeL"], use_stemmer=False)


def most_similar(instruction: str, pool: list[str], scorer) -> tuple[str, float]:
    """(the pool instruction of highest ROUGE-L F with `instruction`, that F); ("", 0.0) for an empty pool."""
    best, score = "", 0.0
    for other in pool:
        f = scorer.score(other, instruction)["rougeL"].fmeasure
        if f > score:
            best, score = other, f
    return best, score


def draw_examples(rng: random.Random, seeds: list[dict], kept: list[dict], k: int, k_generated: int):
    """k example tasks: min(k_generated, kept) of the kept ones, the rest seed tasks, shuffled; and
    their provenance (seed indices, kept indices)."""
    gen = rng.sample(range(len(kept)), min(k_generated, len(kept)))
    seed = rng.sample(range(len(seeds)), min(k - len(gen), len(seeds)))
    examples = [("seed", i) for i in seed] + [("generated", i) for i in gen]
    rng.shuffle(examples)
    return [(seeds if s == "seed" else kept)[i] for s, i in examples], sorted(seed), sorted(gen)


def run(cfg: SelfInstructConfig) -> dict:
    from alignkit.config import require
    from alignkit.feedback.writers import load_writer
    from alignkit.progress import progress

    require(cfg, "seed_tasks", "teacher", "output")
    cfg.validate()
    seeds, scorer = load_seed_tasks(cfg.seed_tasks), rouge_scorer()
    teacher = load_writer(cfg.teacher, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed,
                          role="teacher", api_key_env=cfg.api_key_env, concurrency=cfg.concurrency,
                          timeout=cfg.timeout, max_retries=cfg.max_retries)
    rng, pool, kept = random.Random(cfg.seed), [t["instruction"] for t in seeds], []
    counts = dict.fromkeys(["requests", "generated", "kept", "dropped_unparsed", "dropped_format", "dropped_length",
                            "dropped_rouge", "surplus"], 0)
    bar = progress(total=cfg.num_instructions, desc="self-instruct", unit="task")
    while len(kept) < cfg.num_instructions and counts["requests"] < cfg.max_requests:
        need = math.ceil((cfg.num_instructions - len(kept)) / cfg.tasks_per_request)
        drawn = [draw_examples(rng, seeds, kept, cfg.prompt_examples, cfg.generated_examples)
                 for _ in range(min(cfg.concurrency, cfg.max_requests - counts["requests"], need))]
        replies = teacher.write([[{"role": "user", "content": format_prompt(ex, cfg.tasks_per_request)}]
                                 for ex, _, _ in drawn])
        for (_, seed_ids, gen_ids), reply in zip(drawn, replies):
            tasks, unparsed = parse_tasks(reply)
            counts["dropped_unparsed"] += unparsed
            counts["generated"] += len(tasks)
            for task in tasks:
                if len(kept) >= cfg.num_instructions:
                    counts["surplus"] += 1
                elif format_problem(task, cfg.blocklist):
                    counts["dropped_format"] += 1
                elif not length_ok(task["instruction"], cfg.min_words, cfg.max_words):
                    counts["dropped_length"] += 1
                elif (similar := most_similar(task["instruction"], pool, scorer))[1] > cfg.rouge_threshold:
                    counts["dropped_rouge"] += 1
                else:
                    pool.append(task["instruction"])
                    kept.append({**task, "teacher": teacher.name, "request": counts["requests"],
                                 "most_similar": similar[0], "rouge_l": round(similar[1], 4),
                                 "prompt_seeds": seed_ids, "prompt_generated": gen_ids})
                    bar.update(1)
            counts["requests"] += 1
        bar.set_postfix(requests=counts["requests"], refresh=False)
    bar.close()
    counts["kept"] = len(kept)
    stopped = "num_instructions" if len(kept) >= cfg.num_instructions else "max_requests"
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")  # renamed into place when complete
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    tmp.replace(out)
    print(teacher.report(), flush=True)
    if stopped == "max_requests":
        print(f"self-instruct: stopped at max_requests={cfg.max_requests} with {len(kept)} of "
              f"{cfg.num_instructions} instructions kept", flush=True)
    print(f"self-instruct: {len(kept)} instructions from {counts['requests']} requests -> {out}; "
          + ", ".join(f"{k} {v}" for k, v in counts.items() if k not in ("kept", "requests")), flush=True)
    return {**counts, "stopped": stopped, "teacher": teacher.name}


def main(argv: list[str] | None = None) -> dict:
    from alignkit.config import parse_config

    return run(parse_config(SelfInstructConfig, sys.argv[1:] if argv is None else argv, prog="alignkit self-instruct"))
