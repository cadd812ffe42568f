import random
import re
from collections import Counter

import pytest

from alignkit.tasks import arithmetic_steps as task
from alignkit.tasks.arithmetic_steps import Question, check_steps, first_error

# 37+48-12: running values 37, 85, 73 (by hand).
Q = Question((37, 48, 12), ("+", "-"))
T, F = True, False
EQ = re.compile(r"([0-9]+)([+-])([0-9]+)=([0-9]+)")


def test_question_text_prompt_answer_and_true_steps():
    assert Q.text == "37+48-12"
    assert Q.answer == 73
    assert Q.values == (37, 85, 73)
    assert Q.prompt == "Question: What is 37+48-12?\nAnswer:"
    assert Q.true_steps() == ["37+48=85", "85-12=73", "so 73"]
    assert task.format_completion(Q.true_steps()) == " 37+48=85; 85-12=73; so 73"
    assert Question([5, 3], ["-"]) == Question((5, 3), ("-",))  # lists are coerced, so equal and hashable
    with pytest.raises(ValueError, match="negative"):
        Question((3, 5), ("-",))
    with pytest.raises(ValueError):
        Question((3, 5), ("*",))
    with pytest.raises(ValueError):
        Question((3,), ())


@pytest.mark.parametrize(
    "steps, labels",
    [
        (["37+48=85", "85-12=73", "so 73"], [T, T, T]),
        ([" 37 + 48 = 85 ", "85-12 =73", "so  73"], [T, T, T]),  # whitespace-tolerant
        ([], []),
        # A wrong step stays wrong even when a later step happens to reach the right number.
        (["37+48=84", "84-12=73", "so 73"], [F, F, T]),
        # A step copying a wrong previous result is wrong, and so is everything carried on it.
        (["37+48=84", "84-12=72", "so 72"], [F, F, F]),
        # Steps are judged against the truth, not the previous step: a true step after a slip is right.
        (["37+48=84", "85-12=73", "so 73"], [F, T, T]),
        # Right chain, wrong final "so": only the last step is wrong.
        (["37+48=85", "85-12=73", "so 74"], [T, T, F]),
        # A missing step shifts the rest to wrong positions.
        (["85-12=73", "so 73"], [F, F]),
        (["37+48=85", "so 73"], [T, F]),
        # Steps beyond the final "so" are wrong.
        (["37+48=85", "85-12=73", "so 73", "so 73"], [T, T, T, F]),
        # Wrong operation, wrong operand, swapped operands: not the question's operation.
        (["37+48=85", "85+12=97", "so 97"], [T, F, F]),
        (["37+47=84", "84-12=72", "so 72"], [F, F, F]),
        (["48+37=85", "85-12=73", "so 73"], [F, T, T]),
        # Wrong shape at a position: "so" too early, equation where "so" belongs, non-integers, empty.
        (["so 85", "85-12=73", "85-12=73"], [F, T, F]),
        (["37+48=85.0", "", "so seventy-three"], [F, F, F]),
        (["37+48=85", "85-12=73", "so 73."], [T, T, F]),
    ],
)
def test_check_steps_hand_cases(steps, labels):
    assert check_steps(Q, steps) == labels


def test_first_error():
    assert first_error([T, T, F, T]) == 2
    assert first_error([F, T]) == 0
    assert first_error([T, T, T]) == 3
    assert first_error([]) == 0


def test_parse_question_round_trip_and_bad_prompts():
    assert task.parse_question("Question: What is 37+48-12?\nAnswer:") == Q
    for q in task.questions(200, seed=5):
        assert task.parse_question(q.prompt) == q
    for bad in [
        "Question: What is 12*7?\nAnswer:",
        "Question: What is 12?\nAnswer:",
        "What is 37+48-12?",
        "Question: What is 37+48-12?\nAnswer: 73",
        "Question: What is -3+4?\nAnswer:",
    ]:
        with pytest.raises(ValueError, match="not an arithmetic_steps prompt"):
            task.parse_question(bad)
    with pytest.raises(ValueError, match="negative"):
        task.parse_question("Question: What is 3-5?\nAnswer:")


def test_questions_respect_bounds_and_stay_non_negative():
    seen_ops, seen_lengths = Counter(), Counter()
    for seed in range(40):
        for q in task.questions(50, seed=seed, max_operand=9, min_ops=2, max_ops=3):
            assert all(0 <= x <= 9 for x in q.operands)
            assert 2 <= len(q.ops) <= 3 and len(q.operands) == len(q.ops) + 1
            # Recompute the running values by hand rather than trusting q.values.
            value = q.operands[0]
            for op, b in zip(q.ops, q.operands[1:]):
                value = value + b if op == "+" else value - b
                assert value >= 0
            assert value == q.answer
            seen_ops.update(q.ops)
            seen_lengths[len(q.ops)] += 1
    assert set(seen_ops) == {"+", "-"} and set(seen_lengths) == {2, 3}
    default = task.questions(500, seed=1)
    assert {len(q.ops) for q in default} == {2, 3, 4} and max(max(q.operands) for q in default) == 19
    assert task.questions(20, seed=3) == task.questions(20, seed=3) != task.questions(20, seed=4)
    with pytest.raises(ValueError):
        task.questions(1, min_ops=3, max_ops=2)
    with pytest.raises(ValueError):
        task.questions(1, min_ops=0)


def test_format_and_split_round_trip():
    steps = ["37+48=85", "85-12=73", "so 73"]
    assert task.format_completion(steps) == " 37+48=85; 85-12=73; so 73"
    assert task.split_steps(" 37+48=85; 85-12=73; so 73") == steps
    assert task.split_steps(task.format_completion(["so 5"])) == ["so 5"]
    assert task.split_steps("") == [] and task.split_steps("  ") == []
    # Empty pieces are kept so malformed completions stay visible.
    assert task.split_steps(" 1+2=3;; so 3") == ["1+2=3", "", "so 3"]
    assert task.split_steps(" 1+2=3;") == ["1+2=3", ""]
    for q in task.questions(50, seed=2):
        assert task.split_steps(task.format_completion(q.true_steps())) == q.true_steps()


def test_final_answer_and_exact_match_reward_outcome_only():
    assert task.final_answer(" 37+48=85; 85-12=73; so 73") == 73
    assert task.final_answer(" 37+48=85; 85-12=73") is None
    assert task.final_answer(" so 73.") is None
    assert task.final_answer("") is None
    lucky = " 37+48=84; 84-12=73; so 73"  # wrong step, right answer by luck
    assert task.exact_match([Q.prompt], [lucky], [73]) == [1.0]
    assert check_steps(Q, task.split_steps(lucky)) == [F, F, T]
    assert task.exact_match(
        [Q.prompt] * 3, [" 37+48=85; 85-12=73; so 74", " 73", " 37+48=85; 85-12=73; so 73"], ["73", 73, 73]
    ) == [0.0, 0.0, 1.0]


def _kind(q: Question, steps: list[str]) -> str:
    """Which corruption produced `steps`, read off the steps by hand-written rules."""
    labels = check_steps(q, steps)
    if task.final_answer(task.format_completion(steps)) == q.answer:
        return "recovery"
    if all(labels[:-1]):
        return "final"
    k = first_error(labels)
    b = int(EQ.fullmatch(steps[k]).group(3))
    return "operand" if b != q.operands[k + 1] else "slip"


def _arith_ok(step: str) -> bool:
    a, op, b, c = EQ.fullmatch(step).groups()
    return int(c) == (int(a) + int(b) if op == "+" else int(a) - int(b))


def test_corrupt_always_has_a_wrong_step_and_every_kind_appears():
    kinds = Counter()
    for seed in range(400):
        q = task.questions(1, seed=seed)[0]
        steps = task.corrupt(q, random.Random(seed))
        labels = check_steps(q, steps)
        assert not all(labels)
        # Well formed: one equation per operation (non-negative integers), then "so N".
        assert len(steps) == len(q.ops) + 1
        assert all(EQ.fullmatch(s) for s in steps[:-1]) and re.fullmatch(r"so [0-9]+", steps[-1])
        kind = _kind(q, steps)
        kinds[kind] += 1
        k = first_error(labels)
        if kind in ("slip", "operand"):
            # Carried forward: after the error every step computes correctly from the
            # previous (wrong) result, and "so" states the wrong final value.
            assert all(_arith_ok(s) for s in steps[k + 1 : -1])
            eqs = [EQ.fullmatch(s).groups() for s in steps[:-1]]
            assert all(eqs[j][0] == eqs[j - 1][3] for j in range(k + 1, len(eqs)))
            assert steps[-1] == f"so {EQ.fullmatch(steps[-2]).group(4)}" != f"so {q.answer}"
            assert _arith_ok(steps[k]) == (kind == "operand")
        if kind == "recovery":
            assert steps[-1] == f"so {q.answer}" and not labels[k] and labels[-1]
    assert set(kinds) == set(task.CORRUPTIONS), kinds


def test_corrupt_by_kind_on_a_hand_question():
    for seed in range(30):
        for kind in task.CORRUPTIONS:
            steps = task.corrupt(Q, random.Random(seed), kind=kind)
            assert _kind(Q, steps) == kind
    # Only one operation: nothing to recover in.
    with pytest.raises(ValueError, match="kind"):
        task.corrupt(Question((2, 3), ("+",)), random.Random(0), kind="recovery")


def test_sft_and_step_data():
    sft = task.sft_data(100, seed=1)
    for r in sft:
        q = task.parse_question(r["prompt"])
        assert r["steps"] == q.true_steps() and r["answer"] == q.answer
        assert r["completion"] == task.format_completion(r["steps"]) and r["completion"].startswith(" ")
        assert all(check_steps(q, r["steps"]))
    data = task.step_data(200, seed=2, error_fraction=0.25)
    assert len(data) == 200 and data == task.step_data(200, seed=2, error_fraction=0.25)
    assert sum(0 in r["labels"] for r in data) == 50
    for r in data:
        q = task.parse_question(r["prompt"])
        assert set(r) == {"prompt", "steps", "labels", "answer"}
        assert r["labels"] == [int(ok) for ok in check_steps(q, r["steps"])] and r["answer"] == q.answer
        assert all(type(x) is int and x in (0, 1) for x in r["labels"])
    assert all(all(r["labels"]) for r in task.step_data(30, seed=0, error_fraction=0.0))
    assert all(0 in r["labels"] for r in task.step_data(30, seed=0, error_fraction=1.0))
    with pytest.raises(ValueError):
        task.step_data(10, error_fraction=1.5)


def test_corpus_is_true_arithmetic_in_several_styles():
    texts = [r["text"] for r in task.corpus(400, seed=0)]
    assert len(texts) == 400 and texts == [r["text"] for r in task.corpus(400, seed=0)]
    # The corpus never shows the SFT format; that is left for SFT to teach.
    assert not any(task.SEPARATOR in t or " so " in t for t in texts)
    for t in texts:
        # Every single-operation equation stated is true.
        for a, op, b, c in re.findall(r"(?<![0-9+-])([0-9]+)([+-])([0-9]+)=([0-9]+)", t):
            assert int(c) == (int(a) + int(b) if op == "+" else int(a) - int(b)), t
        # Whole chains stated as one equation evaluate left to right to their result.
        m = re.fullmatch(r"([0-9]+(?:[+-][0-9]+){2,})=([0-9]+)\.", t)
        if m:
            value, *rest = re.split(r"(?=[+-])", m.group(1))
            assert sum(int(x) for x in rest) + int(value) == int(m.group(2)), t
    for marker in ["Start with", "to begin with", " plus ", " minus ", "Adding", "Taking"]:
        assert any(marker in t for t in texts), marker
    assert any(re.fullmatch(r"[0-9]+[+-][0-9]+=[0-9]+\.", t) for t in texts)
    assert any(re.fullmatch(r"[0-9]+(?:[+-][0-9]+){2,4}=[0-9]+\.", t) for t in texts)
    assert "Start with 37, add 48 to get 85, then take away 12 to get 73." in {
        task._chain_text(Q, random.Random(s)) for s in range(20)
    }


def test_tokenizer_keeps_the_separator_a_token_of_its_own():
    from alignkit.models.tiny import train_tokenizer

    sft = task.sft_data(200, seed=1)
    texts = [r["text"] for r in task.corpus(400, seed=0)] + [r["completion"] for r in sft]
    tok = train_tokenizer(texts, vocab_size=384)
    sep = tok.convert_tokens_to_ids(task.SEPARATOR)
    assert sep != tok.unk_token_id and tok.decode([sep]) == ";"
    for r in sft:
        ids = tok(r["completion"], add_special_tokens=False)["input_ids"]
        assert ids.count(sep) == r["completion"].count(";") == len(r["steps"]) - 1
        # No merged token carries a ";" inside it.
        assert all(tok.decode([i]) == ";" for i in ids if ";" in tok.decode([i]))
        assert tok.decode(ids) == r["completion"]
