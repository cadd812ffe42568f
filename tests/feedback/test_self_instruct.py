"""Self-Instruct: the strict parser, the filters by hand, the loop against the scripted teacher
served by a stub OpenAI-compatible server on 127.0.0.1, the max_requests stop, the built-in run."""

import http.server
import json
import re
import threading

import pytest

from alignkit.config import ConfigError
from alignkit.data import DataError, load_records
from alignkit.feedback import self_instruct as si
from alignkit.tasks.instructions import SEED_TASKS, scripted_teacher
from tests.helpers import free_port

SEEDS = si.load_seed_tasks(str(SEED_TASKS))
EXACT = SEEDS[0]  # "Add the two numbers and give only the result."
# SEEDS[3] + ", please": 9 tokens against its 8, LCS 8: P = 8/9, R = 1, F = 16/17 = 0.94
NEAR = {**SEEDS[3], "instruction": "Write the given word backwards, letter by letter, please."}


class _Teacher(http.server.ThreadingHTTPServer):
    """/v1/chat/completions answered by scripted_teacher, with an exact duplicate of a seed task
    and a near-duplicate of another put first in every reply."""

    def __init__(self):
        super().__init__(("127.0.0.1", free_port()), _Handler)
        self.requests, self.lock = [], threading.Lock()


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):  # noqa: N802 - the http.server API
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.requests.append(body)
        duplicates = "".join(si.TASK.format(i=i, instruction=t["instruction"], input=t["input"] or si.NO_INPUT,
                                            output=t["output"]) for i, t in ((98, EXACT), (99, NEAR)))
        text = duplicates + scripted_teacher([body["messages"]])[0]
        payload = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                              "choices": [{"index": 0, "finish_reason": "stop",
                                           "message": {"role": "assistant", "content": text}}],
                              "usage": {"prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 150}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture
def teacher_server():
    server = _Teacher()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


def rouge_l(a: str, b: str) -> float:
    return si.rouge_scorer().score(a, b)["rougeL"].fmeasure


def test_near_duplicates_from_a_served_teacher_are_dropped_by_rouge_l(teacher_server, tmp_path):
    port = teacher_server.server_address[1]
    cfg = si.SelfInstructConfig(seed_tasks=str(SEED_TASKS), teacher=f"openai-chat:scripted@http://127.0.0.1:{port}/v1",
                                output=str(tmp_path / "tasks.jsonl"), num_instructions=30, concurrency=3, seed=1)
    summary = si.run(cfg)

    assert summary["kept"] == 30 and summary["stopped"] == "num_instructions"
    assert len(teacher_server.requests) == summary["requests"] <= cfg.max_requests
    assert summary["generated"] == sum(summary[k] for k in ("kept", "dropped_format", "dropped_length", "dropped_rouge",
                                                            "surplus"))
    # the first reply's two duplicates come before any other task: both examined, both dropped by ROUGE-L
    assert summary["dropped_rouge"] >= 2
    rows = load_records(cfg.output, "sft")
    assert len(rows) == 30
    instructions = [r["instruction"] for r in rows]
    assert EXACT["instruction"] not in instructions and NEAR["instruction"] not in instructions
    seeds = [t["instruction"] for t in SEEDS]
    for i, a in enumerate(instructions):  # F is symmetric: every pair of the pool once
        assert all(rouge_l(a, b) <= cfg.rouge_threshold for b in seeds + instructions[i + 1:]), a
    for i, row in enumerate(rows):
        assert row["teacher"] == cfg.teacher and 0 <= row["request"] < summary["requests"]
        assert row["most_similar"] in seeds + instructions[:i]  # the pool when it was kept
        assert row["rouge_l"] == pytest.approx(rouge_l(row["instruction"], row["most_similar"]), abs=1e-4)
        assert row["rouge_l"] == pytest.approx(max(rouge_l(row["instruction"], b) for b in seeds + instructions[:i]),
                                               abs=1e-4)
        assert all(0 <= j < len(SEEDS) for j in row["prompt_seeds"]) and all(j < i for j in row["prompt_generated"])
        assert len(row["prompt_seeds"]) + len(row["prompt_generated"]) == cfg.prompt_examples
    later = [r for r in rows if r["request"] >= cfg.concurrency]  # after the first round, kept tasks are shown
    assert later and all(len(r["prompt_generated"]) == cfg.generated_examples for r in later)
    prompt = teacher_server.requests[0]["messages"][0]["content"]
    assert "come up with 8 new" in prompt and prompt.count("\n###\n") == cfg.prompt_examples


def test_the_parser_reads_numbered_blocks_strictly_and_counts_the_rest():
    reply = ("3. Instruction: Add 2 and 3.\n3. Input:\n<noinput>\n3. Output:\n5\n###\n"
             "4. Instruction: Sort the numbers.\n4. Input:\n3, 1, 2\n4. Output:\n1, 2, 3\n###\n"
             "5. Instruction: Name a colour.\n5. Output:\nred\n###\n"              # no Input: unparsed
             "6. Instruction: Say yes.\n6. Input:\n<noinput>\n7. Output:\nyes\n###\n"  # numbers differ: unparsed
             "8. Instruction: Say a.\n8. Input:\n<noinput>\n8. Output:\na\n"        # two tasks in one block:
             "9. Instruction: Say b.\n9. Input:\n<noinput>\n9. Output:\nb\n###\n"   # one unparsed block
             "\n###\n"                                                               # an empty block: nothing
             "10. Instruction: Count to three.\n10. Input:\n<noinput>\n10. Output:\n1, 2")  # unclosed: cut off
    tasks, unparsed = si.parse_tasks(reply)
    assert tasks == [{"instruction": "Add 2 and 3.", "input": "", "output": "5"},
                     {"instruction": "Sort the numbers.", "input": "3, 1, 2", "output": "1, 2, 3"}]
    assert unparsed == 4
    assert si.parse_tasks("Sure! Here are some tasks.") == ([], 1)
    # a prompt's examples read back as they were written
    examples = SEEDS[:3]
    prompt = si.format_prompt(examples, 5)
    assert si.parse_tasks(prompt[prompt.index("1. Instruction:"):]) == (examples, 0)


def test_the_filters_by_hand():
    def task(instruction, output="x"):
        return {"instruction": instruction, "input": "", "output": output}

    assert si.format_problem(task("Draw a cat for me."), si.BLOCKLIST) == "blocklisted 'draw'"
    assert si.format_problem(task("Please go to the shop."), si.BLOCKLIST) == "blocklisted 'go to'"
    assert si.format_problem(task("Describe the mapping of keys to values."), si.BLOCKLIST) is None  # whole words
    assert si.format_problem(task("- Sort the list."), si.BLOCKLIST) == "starts with a non-alphanumeric character"
    assert si.format_problem(task("Say hello to me.", output=""), si.BLOCKLIST) == "empty instruction or output"
    assert si.format_problem(task("Draw a cat for me."), []) is None
    assert not si.length_ok("Reverse garden.", 4, 150) and si.length_ok("Reverse the word garden.", 4, 150)
    assert not si.length_ok("one two three four five", 1, 4)

    scorer = si.rouge_scorer()
    # tokens: [reverse, the, word, apple] vs [reverse, the, word, banana]: LCS 3, P = R = 3/4, F = 0.75 > 0.7
    assert si.most_similar("Reverse the word apple.", ["Reverse the word banana."], scorer)[1] == pytest.approx(0.75)
    # [add, 10, and, 16] vs [add, the, two, numbers, and, give, only, the, result]: LCS [add, and] = 2,
    # P = 2/4, R = 2/9, F = 2 P R / (P + R) = (2/9) / (13/18) = 4/13 = 0.3077 <= 0.7: the closer of the pool
    pool = ["Add the two numbers and give only the result.", "Name the day after Thursday."]
    assert si.most_similar("Add 10 and 16.", pool, scorer) == (pool[0], pytest.approx(4 / 13))
    assert si.most_similar("Anything at all.", [], scorer) == ("", 0.0)


CALLS: list[int] = []


def parrot(conversations):
    """A teacher that only repeats the first seed task, whatever it is asked."""
    CALLS.append(len(conversations))
    return [si.TASK.format(i=9, instruction=EXACT["instruction"], input=EXACT["input"] or si.NO_INPUT,
                           output=EXACT["output"])] * len(conversations)


def test_max_requests_stops_a_teacher_that_only_repeats_itself(tmp_path, capsys):
    CALLS.clear()
    out = tmp_path / "tasks.jsonl"
    teacher = "tests.feedback.test_self_instruct:parrot"
    summary = si.run(si.SelfInstructConfig(seed_tasks=str(SEED_TASKS), teacher=teacher, output=str(out), max_requests=5,
                                           concurrency=2))
    assert summary["stopped"] == "max_requests" and summary["requests"] == 5 and CALLS == [2, 2, 1]
    assert summary["kept"] == 0 and summary["generated"] == summary["dropped_rouge"] == 5
    assert out.exists() and out.read_text() == ""
    assert "self-instruct: stopped at max_requests=5 with 0 of 100 instructions kept" in capsys.readouterr().out


def test_the_built_in_run_from_a_config_file(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"seed_tasks: {SEED_TASKS}\nteacher: alignkit.tasks.instructions:scripted_teacher\n"
                      f"output: {tmp_path / 'a.jsonl'}\nnum_instructions: 50\n")
    summary = si.main(["--config", str(config), "--seed", "3"])
    assert summary["kept"] == 50 and summary["stopped"] == "num_instructions"
    assert all(summary[f"dropped_{k}"] > 0 for k in ("unparsed", "format", "length", "rouge"))  # every filter worked
    rows = load_records(tmp_path / "a.jsonl", "sft")
    assert len(rows) == 50 and "self-instruct: 50 instructions from" in capsys.readouterr().out
    for row in rows:  # the scripted teacher's outputs are computed: right
        if m := re.fullmatch(r"What is (\d+) (plus|times|minus) (\d+)\?", row["instruction"]):
            a, op, b = int(m[1]), m[2], int(m[3])
            assert row["output"] == str({"plus": a + b, "times": a * b, "minus": a - b}[op])
    again = si.main(["--config", str(config), "--seed", "3", "--output", str(tmp_path / "b.jsonl")])
    assert again == summary and (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
    with pytest.raises(ValueError, match="generation prompt only"):
        scripted_teacher([[{"role": "user", "content": "Hello"}]])


def test_seed_files_in_self_instructs_format_and_bad_rows(tmp_path):
    native = tmp_path / "seed_tasks.jsonl"
    native.write_text(json.dumps({"id": "seed_task_0", "name": "add", "instruction": "Add the numbers.",
                                  "instances": [{"input": "1, 2", "output": "3"}, {"input": "2, 2", "output": "4"}],
                                  "is_classification": False}) + "\n"
                      + json.dumps({"instruction": "Say hi.", "instances": []}) + "\n")
    with pytest.raises(DataError, match=r"seed_tasks\.jsonl:2: field 'instances'"):
        si.load_seed_tasks(str(native))
    native.write_text(native.read_text().splitlines()[0] + "\n")
    assert si.load_seed_tasks(str(native)) == [{"instruction": "Add the numbers.", "input": "1, 2", "output": "3"}]
    alpaca = tmp_path / "alpaca.jsonl"
    alpaca.write_text(json.dumps({"instruction": "Say hi.", "output": "hi"}) + "\n"
                      + json.dumps({"prompt": "Say hi.", "completion": "hi"}) + "\n")
    with pytest.raises(DataError, match=r"alpaca\.jsonl:2: field 'instruction'"):
        si.load_seed_tasks(str(alpaca))
    with pytest.raises(ConfigError, match="missing required keys seed_tasks, teacher, output"):
        si.run(si.SelfInstructConfig())
    with pytest.raises(ConfigError, match="generated_examples"):
        si.SelfInstructConfig(generated_examples=9).validate()
