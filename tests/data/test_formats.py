from __future__ import annotations

import json
import sys

import pytest

from alignkit.data import DataError, load_records

U = {"role": "user", "content": "Hi"}
A = {"role": "assistant", "content": "Hello"}


def write(tmp_path, name, content):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def jsonl(*records):
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


def assert_error(path, kind, where, field):
    """Loading `path` raises a DataError that names `where` (file:line) and `field`."""
    with pytest.raises(DataError) as info:
        load_records(path, kind)
    message = str(info.value)
    assert f"{where}: " in message, message
    if field is not None:
        assert f"field '{field}'" in message, message
    return message


# ------------------------------------------------------------------ good files


def test_jsonl_every_kind_loads_with_where(tmp_path):
    cases = {
        "text": [{"text": "Once upon a time."}],
        "sft": [{"prompt": "2+2=", "completion": " 4"}, {"messages": [U, A], "source": "x"}],
        "preference": [
            {"prompt": "Q", "chosen": "good", "rejected": "bad"},
            {"prompt": [U], "chosen": [A], "rejected": [{"role": "assistant", "content": "Go away"}]},
        ],
        "ranking": [{"prompt": "Q", "responses": ["best", "worst"]}],
        "unpaired": [{"prompt": "Q", "completion": "A", "label": False}],
        "prompts": [{"prompt": "What is 2+3?", "answer": "5", "meta": {"level": 1}}],
    }
    for kind, records in cases.items():
        path = write(tmp_path, f"{kind}.jsonl", "\n" + jsonl(*records))  # a blank first line
        loaded = load_records(path, kind)
        assert [{k: v for k, v in r.items() if k != "_where"} for r in loaded] == records, kind
        assert [r["_where"] for r in loaded] == [f"{path}:{n}" for n in range(2, 2 + len(records))]


def test_ranking_sorted_by_score_ties_in_input_order(tmp_path):
    record = {"prompt": "Q", "responses": ["a", "b", "c", "d"], "scores": [0.5, 2, 0.5, -1.0]}
    path = write(tmp_path, "rank.jsonl", jsonl(record))
    (loaded,) = load_records(path, "ranking")
    assert loaded["responses"] == ["b", "a", "c", "d"]
    assert loaded["scores"] == [2, 0.5, 0.5, -1.0]


def test_json_array_and_object_with_list_value_line_numbers(tmp_path):
    array = '[\n  {"text": "one"},\n\n  {\n    "text": "two"\n  }\n]\n'
    path = write(tmp_path, "a.json", array)
    assert [(r["text"], r["_where"]) for r in load_records(path, "text")] == [
        ("one", f"{path}:2"), ("two", f"{path}:4")]
    wrapped = '{"version": 2, "name": "x [y]",\n "data": [\n  {"text": "one"},\n  {"text": "two"}]}'
    path = write(tmp_path, "b.json", wrapped)
    assert [r["_where"] for r in load_records(path, "text")] == [f"{path}:3", f"{path}:4"]


def test_csv_labels_lines_and_json_cells(tmp_path):
    content = (
        "prompt,completion,label\n"
        'Q1,A1,TRUE\n'
        '"Q2\nspans two lines",A2,0\n'
        "Q3,A3,false\n"
        "Q4,A4,1\n"
    )
    path = write(tmp_path, "kto.csv", content)
    loaded = load_records(path, "unpaired")
    assert [r["label"] for r in loaded] == [True, False, False, True]
    assert [r["_where"] for r in loaded] == [f"{path}:{n}" for n in (2, 3, 5, 6)]
    assert loaded[1]["prompt"] == "Q2\nspans two lines"
    ranking = 'prompt,responses,scores\nQ,"[""x"", ""y""]","[1, 3]"\n'
    (loaded,) = load_records(write(tmp_path, "rank.csv", ranking), "ranking")
    assert loaded["responses"] == ["y", "x"]


def test_parquet_good(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    table = pa.table({"prompt": ["Q1", "Q2"], "completion": ["A1", "A2"], "label": [True, False]})
    pq.write_table(table, tmp_path / "kto.parquet")
    loaded = load_records(tmp_path / "kto.parquet", "unpaired")
    assert [(r["prompt"], r["label"], r["_where"]) for r in loaded] == [
        ("Q1", True, f"{tmp_path / 'kto.parquet'}:row 1"), ("Q2", False, f"{tmp_path / 'kto.parquet'}:row 2")]


def test_parquet_bad_row(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"prompt": ["Q1", "  "]}), tmp_path / "p.parquet")
    assert_error(tmp_path / "p.parquet", "prompts", f"{tmp_path / 'p.parquet'}:row 2", "prompt")


def test_in_memory_list():
    loaded = load_records([{"prompt": "a", "answer": 1}, {"prompt": "b"}], "prompts")
    assert [(r["prompt"], r["_where"]) for r in loaded] == [("a", "<list>:item 1"), ("b", "<list>:item 2")]
    assert loaded[0]["answer"] == 1
    with pytest.raises(DataError, match=r"<list>:item 2: field 'prompt': expected a string or a list of messages, got int"):
        load_records([{"prompt": "a"}, {"prompt": 3}], "prompts")


def test_datasets_save_to_disk_dir(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([{"text": "one"}, {"text": "two"}]).save_to_disk(str(tmp_path / "ds"))
    loaded = load_records(tmp_path / "ds", "text")
    assert [(r["text"], r["_where"]) for r in loaded] == [("one", f"{tmp_path / 'ds'}:row 1"), ("two", f"{tmp_path / 'ds'}:row 2")]
    datasets.Dataset.from_list([{"text": "one"}, {"text": ""}]).save_to_disk(str(tmp_path / "bad"))
    assert_error(tmp_path / "bad", "text", f"{tmp_path / 'bad'}:row 2", "text")


def test_unknown_kind_lists_valid_kinds():
    with pytest.raises(ValueError, match="text, sft, preference, ranking, unpaired, prompts"):
        load_records([{"text": "a"}], "pairs")


# ------------------------------------------------------------------ errors

GOOD = json.dumps({"prompt": "Q", "completion": "A"})


@pytest.mark.parametrize(
    "kind, lines, line, field",
    [
        # bad JSON after a blank line: physical line 3
        ("sft", [GOOD, "", '{"prompt": "Q", "completion": '], 3, "<json>"),
        ("sft", [GOOD, "[1, 2]"], 2, "<record>"),
        ("sft", [GOOD, GOOD, {"prompt": "Q"}], 3, "completion"),
        ("sft", [{"text": "Q"}], 1, "messages"),
        ("preference", [{"prompt": "Q", "chosen": 5, "rejected": "b"}], 1, "chosen"),
        ("preference", [{"prompt": [U], "chosen": "a", "rejected": [A]}], 1, "chosen"),
        ("sft", [GOOD, {"prompt": " \t", "completion": "A"}], 2, "prompt"),
        ("text", [{"text": ""}], 1, "text"),
        ("sft", [{"messages": "Hi"}], 1, "messages"),
        ("sft", [{"messages": [U, {"role": "bot", "content": "x"}]}], 1, "messages[1].role"),
        ("sft", [{"messages": [{"role": "user"}, A]}], 1, "messages[0].content"),
        ("sft", [{"messages": [{"content": "x"}, A]}], 1, "messages[0].role"),
        ("sft", [{"messages": [U, {"role": "assistant", "content": ["x"]}]}], 1, "messages[1].content"),
        ("sft", [GOOD, {"messages": [A, U]}], 2, "messages[1].role"),  # last message not from the assistant
        ("preference", [{"prompt": [U], "chosen": [U], "rejected": [A]}], 1, "chosen[0].role"),
        ("ranking", [{"prompt": "Q", "responses": ["only"]}], 1, "responses"),
        ("ranking", [{"prompt": "Q", "responses": ["a", ""]}], 1, "responses[1]"),
        ("ranking", [{"prompt": "Q", "responses": ["a", "b"], "scores": [1]}], 1, "scores"),
        ("ranking", [{"prompt": "Q", "responses": ["a", "b"], "scores": [1, "2"]}], 1, "scores[1]"),
        ("unpaired", [{"prompt": "Q", "completion": "A", "label": "yes"}], 1, "label"),
    ],
)
def test_jsonl_errors_name_file_line_field(tmp_path, kind, lines, line, field):
    path = write(tmp_path, "train.jsonl", jsonl(*lines))
    assert_error(path, kind, f"train.jsonl:{line}", field)


def test_wrong_type_message(tmp_path):
    path = write(tmp_path, "train.jsonl", jsonl({"prompt": "Q", "chosen": 5, "rejected": "b"}))
    message = assert_error(path, "preference", f"{path}:1", "chosen")
    assert message.endswith("expected a string or a list of messages, got int")


def test_non_utf8_reports_line(tmp_path):
    content = (jsonl({"text": "a"}, {"text": "b"}) + '{"text": "caf').encode() + b"\xe9\"}\n"
    assert_error(write(tmp_path, "train.jsonl", content), "text", "train.jsonl:3", "<encoding>")
    csv_content = b"text\nfine\nbad \xff byte\n"
    assert_error(write(tmp_path, "train.csv", csv_content), "text", "train.csv:3", "<encoding>")


def test_json_errors(tmp_path):
    bad_json = '[\n  {"text": "a"},\n  {"text": "b",}\n]'
    assert_error(write(tmp_path, "bad.json", bad_json), "text", "bad.json:3", "<json>")
    not_object = '[\n  {"text": "a"},\n  "b"\n]'
    assert_error(write(tmp_path, "str.json", not_object), "text", "str.json:3", "<record>")
    missing = '{"data": [\n  {"text": "a"},\n  {\n    "txt": "b"\n  }\n]}'
    assert_error(write(tmp_path, "missing.json", missing), "text", "missing.json:3", "text")
    two_lists = '{"train": [{"text": "a"}], "test": []}'
    assert_error(write(tmp_path, "two.json", two_lists), "text", "two.json:1", "<json>")


def test_csv_errors(tmp_path):
    # the bad row starts on line 4: the quoted cell on line 2 spans two lines
    content = 'prompt,completion,label\n"Q1\nmore",A1,true\nQ2,A2,maybe\n'
    assert_error(write(tmp_path, "kto.csv", content), "unpaired", "kto.csv:4", "label")
    missing_column = "prompt,answer\nQ,A\n"
    assert_error(write(tmp_path, "sft.csv", missing_column), "sft", "sft.csv:2", "completion")
    extra_cell = "prompt\nQ1\nQ2,oops\n"
    assert_error(write(tmp_path, "p.csv", extra_cell), "prompts", "p.csv:3", "<csv>")
    bad_cell = 'prompt,responses\nQ,"[""a"", ""b"""\n'
    assert_error(write(tmp_path, "r.csv", bad_cell), "ranking", "r.csv:2", "responses")


def test_missing_file_names_path(tmp_path):
    path = tmp_path / "nowhere" / "train.jsonl"
    message = assert_error(path, "text", str(path), None)
    assert "not found" in message


def test_missing_local_dataset_dir_fails_without_network(tmp_path):
    # An absolute path is never a Hub name: no load_dataset call (which would try the network).
    message = assert_error(tmp_path / "no_such_dataset", "text", str(tmp_path / "no_such_dataset"), None)
    assert "not found" in message


@pytest.mark.parametrize("name, content", [("e.jsonl", "\n\n"), ("e.json", "[]"), ("e.csv", "text\n"), ("e.jsonl", "")])
def test_empty_file_names_file(tmp_path, name, content):
    path = write(tmp_path, name, content)
    message = assert_error(path, "text", str(path), None)
    assert "no records" in message


# ------------------------------------------------------------------ every bad row in one error


def test_all_bad_rows_listed_in_one_error(tmp_path):
    lines = [
        GOOD,
        {"prompt": "Q"},  # 2: no completion
        GOOD,
        '{"prompt": "Q", "completion": ',  # 4: not JSON; the reading goes on
        GOOD,
        {"prompt": 3, "completion": "A"},  # 6: prompt not a string
        GOOD,
    ]
    path = write(tmp_path, "train.jsonl", jsonl(*lines))
    with pytest.raises(DataError) as info:
        load_records(path, "sft")
    error = info.value
    head, *listed = str(error).split("\n")
    assert head == f"{path}: 3 bad rows (of 7):"
    assert listed == [
        f"{path}:2: field 'completion': missing (a sft record needs 'prompt' and 'completion', or 'messages')",
        f"{path}:4: field '<json>': invalid JSON: Expecting value (column 31)",
        f"{path}:6: field 'prompt': expected a string or a list of messages, got int",
    ]
    assert [(e.where, e.field) for e in error.errors] == [
        (f"{path}:2", "completion"), (f"{path}:4", "<json>"), (f"{path}:6", "prompt")]
    assert (error.where, error.field, error.message) == (f"{path}:2", "completion", error.errors[0].message)


def test_sixty_bad_rows_list_fifty_and_count_the_rest(tmp_path):
    lines = [GOOD if n % 2 else {"prompt": "Q", "completion": ""} for n in range(120)]  # even indexes bad
    path = write(tmp_path, "train.jsonl", jsonl(*lines))
    with pytest.raises(DataError) as info:
        load_records(path, "sft")
    head, *listed = str(info.value).split("\n")
    assert head == f"{path}: 60 bad rows (of 120):"
    assert len(listed) == 51 and listed[-1] == "... and 10 more bad rows, not listed"
    assert listed[:2] == [f"{path}:1: field 'completion': empty string", f"{path}:3: field 'completion': empty string"]
    assert listed[49].startswith(f"{path}:99: ")
    assert len(info.value.errors) == 60 and info.value.errors[-1].where == f"{path}:119"


def test_bad_rows_listed_for_csv_json_and_lists(tmp_path):
    content = "prompt,completion,label\nQ1,A1,true\nQ2,A2,maybe\nQ3,A3\nQ4,A4,0\n,A5,1\n"
    message = str(pytest.raises(DataError, load_records, write(tmp_path, "k.csv", content), "unpaired").value)
    assert message.split("\n") == [
        f"{tmp_path / 'k.csv'}: 3 bad rows (of 5):",
        f"{tmp_path / 'k.csv'}:3: field 'label': expected a bool (true/false, 1/0), got str 'maybe'",
        f"{tmp_path / 'k.csv'}:4: field '<csv>': row has 2 fields, the header has 3",
        f"{tmp_path / 'k.csv'}:6: field 'prompt': empty string",
    ]
    array = '[\n  {"text": "a"},\n  {"text": ""},\n  7\n]'
    error = pytest.raises(DataError, load_records, write(tmp_path, "a.json", array), "text").value
    assert [(e.where, e.field) for e in error.errors] == [
        (f"{tmp_path / 'a.json'}:3", "text"), (f"{tmp_path / 'a.json'}:4", "<record>")]
    error = pytest.raises(DataError, load_records, [{"text": 1}, {"text": "ok"}, {}], "text").value
    assert str(error).split("\n")[0] == "<list>: 2 bad rows (of 3):"
    assert [e.where for e in error.errors] == ["<list>:item 1", "<list>:item 3"]


def test_single_bad_row_and_file_errors_stay_one_line(tmp_path):
    error = pytest.raises(DataError, load_records, write(tmp_path, "t.jsonl", jsonl(GOOD, {"prompt": "Q"})), "sft").value
    assert "\n" not in str(error) and error.errors == [error] and error.field == "completion"
    # A JSON file that does not parse is one error, whatever else is wrong in it.
    error = pytest.raises(DataError, load_records, write(tmp_path, "b.json", '[{"text": ""}, {"text": 1},'), "text").value
    assert "\n" not in str(error) and error.errors == [error] and error.field == "<json>"


def test_data_error_pickles(tmp_path):
    import pickle

    error = pytest.raises(DataError, load_records, [{"text": 1}, {}], "text").value
    copy = pickle.loads(pickle.dumps(error))
    assert str(copy) == str(error) and [str(e) for e in copy.errors] == [str(e) for e in error.errors]
    assert (copy.where, copy.field, copy.message) == (error.where, error.field, error.message)


# ------------------------------------------------------------------ crashes found by fuzzing (tests/data/test_fuzz.py)


# Python limits int() to 4300 digits since 3.10.7/3.11 (sys.set_int_max_str_digits).
int_digit_limit = pytest.mark.skipif(not hasattr(sys, "get_int_max_str_digits"), reason="no int digit limit")


@pytest.mark.parametrize("name, content, where, field", [
    # json.loads raises RecursionError for deep nesting, and ValueError (not JSONDecodeError) for
    # an integer of more than 4300 digits: both came out of load_records as they were.
    ("deep.jsonl", jsonl({"text": "a"}) + "[" * 100_000 + "\n", "deep.jsonl:2", "<json>"),
    ("deep.json", "[" * 100_000 + "]" * 100_000, "deep.json", "<json>"),
    pytest.param("long.jsonl", '{"text": ' + "7" * 5000 + "}\n", "long.jsonl:1", "<json>", marks=int_digit_limit),
    pytest.param("long.json", '[{"text": ' + "7" * 5000 + "}]", "long.json", "<json>", marks=int_digit_limit),
])
def test_json_too_deep_or_too_long_is_a_data_error(tmp_path, name, content, where, field):
    message = assert_error(write(tmp_path, name, content), "text", where, field)
    assert "nested too deeply" in message or "4300 digits" in message


@int_digit_limit
def test_csv_cells_too_deep_too_long_or_huge(tmp_path):
    import csv

    limit = csv.field_size_limit()
    # A cell past csv's default 131072-character cap raised _csv.Error: it now loads.
    long_text = "word " * 40_000
    (record,) = load_records(write(tmp_path, "long.csv", f"text\n{long_text}\n"), "text")
    assert record["text"] == long_text and csv.field_size_limit() == limit  # the global cap is put back
    content = 'prompt,responses,scores\nQ,"' + "[" * 100_000 + '",\nQ,"[""a"", ""b""]","[1, ' + "7" * 5000 + ']"\n'
    error = pytest.raises(DataError, load_records, write(tmp_path, "r.csv", content), "ranking").value
    assert [(e.where, e.field) for e in error.errors] == [
        (f"{tmp_path / 'r.csv'}:2", "responses"), (f"{tmp_path / 'r.csv'}:3", "scores")]


def test_score_past_float_range_sorts(tmp_path):
    # math.isfinite(10**400) raised OverflowError; an int is always finite.
    record = {"prompt": "Q", "responses": ["a", "b", "c"], "scores": [1.5, 10**400, -(10**400)]}
    (loaded,) = load_records(write(tmp_path, "r.jsonl", jsonl(record)), "ranking")
    assert loaded["responses"] == ["b", "a", "c"]


def test_error_messages_cut_long_values():
    record = {"prompt": "Q", "completion": "A", "label": "x" * 10_000}
    error = pytest.raises(DataError, load_records, [record], "unpaired").value
    assert len(str(error)) < 200 and str(error).endswith("xxx...")
    huge = 10**5000  # repr() raises ValueError past 4300 digits (where Python has that limit)
    error = pytest.raises(DataError, load_records, [{"prompt": "Q", "completion": "A", "label": huge}], "unpaired").value
    assert str(error).endswith("got int <int>" if hasattr(sys, "get_int_max_str_digits") else "...")
