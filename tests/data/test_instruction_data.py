"""Instruction data as sft: Stanford Alpaca's `instruction` / `input` / `output` and FLAN's (T0's)
`inputs` / `targets` load as one user message and one assistant message, go through the chat
template like any message record, and bad rows name file:line and field."""

from __future__ import annotations

import json

import pytest

from alignkit.data import DataError, load_records, tokenize_sft


def jsonl(*records):
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


def write(tmp_path, name, *records):
    path = tmp_path / name
    path.write_text(jsonl(*records), encoding="utf-8")
    return path


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def chat(prompt, completion):
    """The (prompt, completion) message lists an instruction row becomes."""
    return [user(prompt)], [assistant(completion)]


def error_lines(path, kind="sft"):
    with pytest.raises(DataError) as info:
        load_records(path, kind)
    return str(info.value).split("\n")


ALPACA = [
    {"instruction": "Add the two numbers.", "input": "12 and 30", "output": "42", "source": "alpaca"},
    {"instruction": "Name a primary colour.", "input": "", "output": "Red."},
    {"instruction": "Name a primary colour.", "output": "Blue."},  # no `input` at all
    {"instruction": "Say hi.", "input": "  \n", "output": "Hi"},  # a blank input is no input
]


def test_alpaca_rows_load_as_a_user_and_an_assistant_message(tmp_path):
    path = write(tmp_path, "alpaca.jsonl", *ALPACA)
    records = load_records(path, "sft")
    assert [(r["prompt"], r["completion"]) for r in records] == [
        chat("Add the two numbers.\n\n12 and 30", "42"),
        chat("Name a primary colour.", "Red."),
        chat("Name a primary colour.", "Blue."),
        chat("Say hi.", "Hi"),
    ]
    assert records[0]["source"] == "alpaca" and records[0]["instruction"] == "Add the two numbers."  # kept
    assert [r["_where"] for r in records] == [f"{path}:{n}" for n in range(1, 5)]


def test_alpaca_rows_tokenize_as_the_same_conversation_in_messages(tiny_tokenizer):
    alpaca = load_records(ALPACA[:2], "sft")
    messages = load_records([{"messages": [user("Add the two numbers.\n\n12 and 30"), assistant("42")]},
                             {"messages": [user("Name a primary colour."), assistant("Red.")]}], "sft")
    examples, report = tokenize_sft(alpaca, tiny_tokenizer, max_length=256)
    expected, _ = tokenize_sft(messages, tiny_tokenizer, max_length=256)
    assert [(e["input_ids"], e["loss_mask"]) for e in examples] == [(e["input_ids"], e["loss_mask"]) for e in expected]
    assert report.examples == 2
    for example, output in zip(examples, ("42", "Red.")):
        answer = [t for t, m in zip(example["input_ids"], example["loss_mask"]) if m]
        assert output in tiny_tokenizer.decode(answer)  # the loss covers the output
        prompt = tiny_tokenizer.decode([t for t, m in zip(example["input_ids"], example["loss_mask"]) if not m])
        assert output not in prompt


def test_bad_alpaca_rows_name_file_line_and_field(tmp_path):
    good = ALPACA[1]
    path = write(tmp_path, "alpaca.jsonl",
                 good,
                 {"instruction": "Add.", "input": "1 and 2"},  # 2: no output
                 {"instruction": 7, "output": "x"},  # 3: instruction not a string
                 {"instruction": "Add.", "input": ["1", "2"], "output": "3"},  # 4: input not a string
                 {"instruction": "Add.", "output": "   "},  # 5: blank output
                 {"input": "1 and 2", "output": "3"},  # 6: no instruction
                 good)
    head, *listed = error_lines(path)
    assert head == f"{path}: 5 bad rows (of 7):"
    assert listed == [
        f"{path}:2: field 'output': missing (a sft record needs 'instruction' and 'output' "
        "(Alpaca's layout; 'input' optional))",
        f"{path}:3: field 'instruction': expected a string, got int",
        f"{path}:4: field 'input': expected a string (it may be empty), got list",
        f"{path}:5: field 'output': whitespace-only string",
        f"{path}:6: field 'instruction': missing (a sft record needs 'instruction' and 'output' "
        "(Alpaca's layout; 'input' optional))",
    ]


def test_flan_rows_load_with_inputs_as_the_user_message(tmp_path):
    path = write(tmp_path, "flan.jsonl",
                 {"inputs": "Premise: It rains.\nHypothesis: It is wet.\nOPTIONS:\n- yes\n- no", "targets": "yes",
                  "task_name": "anli", "template_type": "zs_opt"},
                 # T0's P3: the text is in *_pretokenized, `inputs` / `targets` are token ids
                 {"inputs_pretokenized": "Question: 2+2?", "inputs": [3, 4], "targets_pretokenized": "4",
                  "targets": [5]},
                 # `input` / `target` (singular) in a row without Alpaca's fields
                 {"input": "Translate to French: cat", "target": "chat"})
    records = load_records(path, "sft")
    assert [(r["prompt"], r["completion"]) for r in records] == [
        chat("Premise: It rains.\nHypothesis: It is wet.\nOPTIONS:\n- yes\n- no", "yes"),
        chat("Question: 2+2?", "4"),
        chat("Translate to French: cat", "chat"),
    ]
    assert records[0]["task_name"] == "anli"


def test_bad_flan_rows_and_the_detection_order(tmp_path):
    path = write(tmp_path, "flan.jsonl",
                 {"inputs": "Q?"},  # 1: no targets
                 {"targets": "A"},  # 2: no inputs
                 {"inputs": [1, 2], "targets": "A"},  # 3: token ids and no *_pretokenized text
                 {"inputs": "Q?", "targets": ""},  # 4: empty target
                 {"input": "Q?", "target": "A", "output": "B"})  # 5: Alpaca's output wins: no instruction
    assert error_lines(path)[1:] == [
        f"{path}:1: field 'targets': missing (a sft record needs 'inputs' and 'targets' (FLAN's layout))",
        f"{path}:2: field 'inputs': missing (a sft record needs 'inputs' and 'targets' (FLAN's layout))",
        f"{path}:3: field 'inputs': expected a string, got list",
        f"{path}:4: field 'targets': empty string",
        f"{path}:5: field 'instruction': missing (a sft record needs 'instruction' and 'output' "
        "(Alpaca's layout; 'input' optional))",
    ]


def test_explicit_layouts_win_over_instruction_fields():
    rows = [{"messages": [user("Hi"), assistant("Hello")], "instruction": "ignored"},
            {"prompt": "2+2=", "completion": " 4", "inputs": "ignored", "targets": "ignored"},
            # a `datasets` table mixing layouts: None where a row lacks a column
            {"prompt": None, "completion": None, "messages": None, "instruction": "Hi", "input": None,
             "output": "Hello", "inputs": None, "targets": None},
            {"prompt": None, "completion": None, "instruction": None, "output": None, "inputs": "Q", "targets": "A"}]
    records = load_records(rows, "sft")
    assert "prompt" not in records[0]
    assert (records[1]["prompt"], records[1]["completion"]) == ("2+2=", " 4")
    assert (records[2]["prompt"], records[2]["completion"]) == chat("Hi", "Hello")
    assert (records[3]["prompt"], records[3]["completion"]) == chat("Q", "A")


def test_no_layout_names_them_all_and_other_kinds_get_the_sft_hint(tmp_path):
    path = write(tmp_path, "x.jsonl", {"input": "just an input"})
    assert error_lines(path) == [
        f"{path}:1: field 'messages': missing (a sft record needs 'prompt' and 'completion', or 'messages', "
        "or Alpaca's 'instruction' and 'output', or FLAN's 'inputs' and 'targets')"]
    alpaca = write(tmp_path, "alpaca.jsonl", *ALPACA[:2])
    assert error_lines(alpaca, "preference")[-1] == "these rows look like sft data (instruction, output): use `alignkit sft`"
    flan = write(tmp_path, "flan.jsonl", {"inputs": "Q", "targets": "A"}, {"inputs": "Q2", "targets": "B"})
    assert error_lines(flan, "prompts")[-1] == "these rows look like sft data (inputs, targets): use `alignkit sft`"


def test_alpaca_from_csv_with_empty_input_cells(tmp_path):
    path = tmp_path / "alpaca.csv"
    path.write_text('instruction,input,output\nSay hi.,,Hi\n"Add.","1 and 2",3\n', encoding="utf-8")
    records = load_records(path, "sft")
    assert [(r["prompt"], r["completion"]) for r in records] == [chat("Say hi.", "Hi"), chat("Add.\n\n1 and 2", "3")]
