"""load_records on the layouts and mistakes users bring: HH-RLHF's implicit prompt, a dataset's
configs and splits, another kind's rows, CSV under a JSON name, a name that is neither a file nor
reachable on the Hub. Each test pins the message: the file, the line or field, the hint."""

from __future__ import annotations

import json

import pytest

from alignkit.data import DataError, identical_pairs, load_records

U = {"role": "user", "content": "Hi"}
A = {"role": "assistant", "content": "Hello"}
B = {"role": "assistant", "content": "Go away"}


def jsonl(*records):
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


def write(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    return path


def error_of(source, kind, **kwargs) -> DataError:
    with pytest.raises(DataError) as info:
        load_records(source, kind, **kwargs)
    return info.value


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE=1 as datasets sees it (it reads the variable at import), and an empty cache."""
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    return datasets


# ------------------------------------------------------------------ 1. dataset config and split


def data_folder(tmp_path, configs):
    """A local data folder whose README.md declares `configs` {name: {split: rows}}, as Hub datasets do."""
    folder = tmp_path / "prefs"
    folder.mkdir()
    card = ["---", "configs:"]
    for config, splits in configs.items():
        card += [f"- config_name: {config}", "  data_files:"]
        for split, rows in splits.items():
            write(folder, f"{config}_{split}.jsonl", jsonl(*rows))
            card += [f"  - split: {split}", f"    path: {config}_{split}.jsonl"]
    write(folder, "README.md", "\n".join(card + ["---", ""]))
    return folder


PAIR = {"prompt": "Q", "chosen": "good", "rejected": "bad"}


def test_unknown_split_lists_the_splits_of_a_data_folder(offline, tmp_path):
    folder = data_folder(tmp_path, {"default": {"train_prefs": [PAIR], "test_prefs": [PAIR, PAIR]}})
    error = error_of(folder, "preference")
    assert str(error) == f"{folder}: no split 'train'; splits: train_prefs, test_prefs"
    loaded = load_records(folder, "preference", split="test_prefs")
    assert [r["_where"] for r in loaded] == [f"{folder}:row 1", f"{folder}:row 2"]


def test_config_name_picks_a_config_and_a_wrong_one_lists_them(offline, tmp_path):
    other = {"prompt": "Q2", "chosen": "good2", "rejected": "bad2"}
    folder = data_folder(tmp_path, {"a": {"train": [PAIR]}, "b": {"train": [other]}})
    (loaded,) = load_records(folder, "preference", config_name="b")
    assert loaded["prompt"] == "Q2"
    assert str(error_of(folder, "preference", config_name="c")) == f"{folder}: no config 'c'; configs: a, b"
    assert str(error_of(folder, "preference")) == f"{folder}: name a config, this dataset has several: a, b"


def test_saved_dataset_dict_without_the_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({"train_prefs": datasets.Dataset.from_list([PAIR])}).save_to_disk(str(tmp_path / "dd"))
    assert str(error_of(tmp_path / "dd", "preference")) == f"{tmp_path / 'dd'}: no split 'train'; splits: train_prefs"
    assert len(load_records(tmp_path / "dd", "preference", split="train_prefs")) == 1


def test_config_name_for_a_file_or_list_is_refused(tmp_path):
    path = write(tmp_path, "p.jsonl", jsonl(PAIR))
    expected = ("config name 'b' given, but only a dataset loaded by name or from a data folder "
                "(datasets.load_dataset) has configs")
    assert str(error_of(path, "preference", config_name="b")) == f"{path}: {expected}"
    assert str(error_of([PAIR], "preference", config_name="b")) == f"<list>: {expected}"


# ------------------------------------------------------------------ 2. the prompt inside chosen/rejected (HH-RLHF)


def loaded_triples(rows):
    return [(r["prompt"], r["chosen"], r["rejected"]) for r in load_records(rows, "preference")]


def test_implicit_prompt_strings_cut_at_the_last_whitespace_of_the_shared_prefix():
    turn = "\n\nHuman: hi\n\nAssistant:"
    rows = [
        {"chosen": turn + " Hello!", "rejected": turn + " Go away."},
        # they part inside a word ("Hel|lo" / "Hel|p"): the word goes to both completions
        {"chosen": turn + " Hello there", "rejected": turn + " Help"},
        # a shared first word stays in the prompt, as TRL's extraction does
        {"chosen": turn + " I like it", "rejected": turn + " I do not"},
        # multi-turn: the earlier turns are the prompt
        {"chosen": turn + " Hi.\n\nHuman: joke?\n\nAssistant: No.", "rejected": turn + " Hi.\n\nHuman: joke?\n\nAssistant: Sure."},
    ]
    assert loaded_triples(rows) == [
        (turn, " Hello!", " Go away."),
        (turn, " Hello there", " Help"),
        (turn + " I", " like it", " do not"),
        (turn + " Hi.\n\nHuman: joke?\n\nAssistant:", " No.", " Sure."),
    ]


def test_implicit_prompt_message_lists_and_null_prompt():
    system = {"role": "system", "content": "Be kind."}
    rows = [
        {"chosen": [system, U, A], "rejected": [system, U, B], "source": "hh"},
        {"prompt": None, "chosen": [U, A], "rejected": [U, B]},  # a table column with no value here
        {"chosen": [U, A], "rejected": [U, A, U, B]},  # one is a prefix of the other: a completion keeps a message
    ]
    loaded = load_records(rows, "preference")
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in loaded] == [
        ([system, U], [A], [B]), ([U], [A], [B]), ([U], [A], [A, U, B])]
    assert loaded[0]["source"] == "hh" and loaded[0]["_where"] == "<list>:item 1"


def test_implicit_prompt_errors_name_line_and_field(tmp_path):
    path = write(tmp_path, "hh.jsonl", jsonl(
        {"chosen": "Human: hi Assistant: Hello", "rejected": "Human: hi Assistant: Bye"},
        {"chosen": "Hello", "rejected": "Help"},  # 2: shared "Hel" has no whitespace: no prompt
        {"chosen": [A], "rejected": [B]},  # 3: no shared message
        {"chosen": "\n\nA: x", "rejected": "\n\nB: y"},  # 4: only whitespace shared
        {"chosen": "Q: a", "rejected": [A]},  # 5: a string and a list
        {"chosen": [U, A, U], "rejected": [U, B]},  # 6: chosen does not end with the assistant
    ))
    error = error_of(path, "preference")
    no_prefix = "field 'prompt': missing, and chosen/rejected share no prefix to take it from"
    assert str(error).split("\n") == [
        f"{path}: 5 bad rows (of 6):",
        f"{path}:2: {no_prefix}",
        f"{path}:3: {no_prefix}",
        f"{path}:4: {no_prefix}",
        f"{path}:5: field 'rejected': expected a string like 'chosen', got list",
        f"{path}:6: field 'chosen[2].role': the last message is the completion and must be from the assistant, got 'user'",
    ]


def test_identical_chosen_and_rejected_load_and_are_listed():
    rows = [
        {"chosen": "Q: hi there", "rejected": "Q: hi there"},  # implicit, identical
        {"chosen": [U, A], "rejected": [U, A]},  # implicit message lists, identical
        {"prompt": "Q", "chosen": "same", "rejected": "same"},  # explicit, identical
        {"prompt": "Q", "chosen": "same", "rejected": "same "},  # differ by a space: not identical
        {"prompt": [U], "chosen": [A], "rejected": [B]},
    ]
    loaded = load_records(rows, "preference")
    assert (loaded[0]["prompt"], loaded[0]["chosen"]) == ("Q: hi", " there")
    assert (loaded[1]["prompt"], loaded[1]["chosen"]) == ([U], [A])
    assert identical_pairs(loaded) == ["<list>:item 1", "<list>:item 2", "<list>:item 3"]
    assert identical_pairs(loaded[3:]) == []


# ------------------------------------------------------------------ 4. rows of another kind


@pytest.mark.parametrize("kind, rows, hint", [
    ("preference", [{"prompt": "Q", "responses": ["a", "b"]}] * 2,
     "these rows look like ranking data (prompt, responses): for `alignkit rm` pass --data_kind ranking"),
    ("preference", [{"prompt": "Q", "completion": "A", "label": True}] * 3,
     "these rows look like unpaired data (prompt, completion, label): use `alignkit kto`"),
    ("preference", [{"prompt": "Q", "completion": "A"}, {"prompt": "Q2", "completion": "B", "id": 7}],
     "these rows look like sft data (prompt, completion): use `alignkit sft`"),
    ("sft", [{"text": "Once."}] * 2, "these rows look like text data (text): use `alignkit pretrain`"),
    ("sft", [{"prompt": "Q", "chosen": "a", "rejected": "b"}] * 2,
     "these rows look like preference data (prompt, chosen, rejected): use `alignkit dpo` or `alignkit rm`"),
    ("text", [{"messages": [U, A]}] * 2, "these rows look like sft data (messages): use `alignkit sft`"),
    # each row fits sft, in either of its layouts: the first row's is named
    ("preference", [{"messages": [U, A]}, {"prompt": "Q", "completion": "A"}],
     "these rows look like sft data (messages): use `alignkit sft`"),
    ("unpaired", [{"prompt": "Q", "answer": "4"}] * 2,
     "these rows look like prompts data (prompt): use an online method (`alignkit grpo`, `ppo`, `rloo`, `bon`)"),
])
def test_rows_of_another_kind_get_one_hint_line_at_the_end(tmp_path, kind, rows, hint):
    path = write(tmp_path, "data.jsonl", jsonl(*rows))
    lines = str(error_of(path, kind)).split("\n")
    assert lines[-1] == hint
    assert len(lines) == (1 if len(rows) == 1 else 2 + len(rows))  # the rows listed as before, then the hint
    assert lines[0].startswith(f"{path}:")


@pytest.mark.parametrize("kind, rows", [
    # one good row: the rest are bad rows of the right kind
    ("preference", [{"prompt": "Q", "responses": ["a", "b"]}, PAIR]),
    # the kind's own fields are there: the values are what is wrong
    ("preference", [{"prompt": "Q", "chosen": 1, "rejected": "b", "responses": ["a", "b"]}] * 2),
    ("sft", [{"prompt": "Q", "completion": "", "label": True}] * 2),
    # two other kinds fit equally: text, and sft's messages
    ("preference", [{"text": "x", "messages": [U, A]}] * 2),
    # no row shares the other kind's fields with every other row
    ("preference", [{"prompt": "Q", "responses": ["a", "b"]}, {"prompt": "Q", "completion": "A"}]),
    # a row that is not JSON has no fields
    ("preference", [{"prompt": "Q", "responses": ["a", "b"]}, "{oops"]),
])
def test_no_hint_unless_every_row_fits_one_other_kind(tmp_path, kind, rows):
    message = str(error_of(write(tmp_path, "data.jsonl", jsonl(*rows)), kind))
    assert "look like" not in message, message


# ------------------------------------------------------------------ 5. CSV under a JSON name


def test_csv_in_a_jsonl_file_is_one_error(tmp_path):
    path = write(tmp_path, "pref.jsonl", "prompt,chosen,rejected\nQ,good,bad\nQ2,good,bad\n")
    error = error_of(path, "preference")
    assert str(error) == f"{path}: looks like CSV (line 1: `prompt,chosen,rejected`), not JSON Lines; rename it to .csv"
    assert error.errors == [error] and error.field is None
    quoted = write(tmp_path, "q.jsonl", '\n\n"prompt", "completion"\n"Q","A"\n')
    assert str(error_of(quoted, "sft")) == (
        f"{quoted}: looks like CSV (line 3: `\"prompt\", \"completion\"`), not JSON Lines; rename it to .csv")
    as_json = write(tmp_path, "pref.json", "prompt,completion\nQ,A\n")
    assert str(error_of(as_json, "sft")) == (
        f"{as_json}: looks like CSV (line 1: `prompt,completion`), not JSON; rename it to .csv")


def test_bad_json_that_is_not_csv_is_still_one_error_per_row(tmp_path):
    path = write(tmp_path, "t.jsonl", "prompt: Q\n{\"text\": 1\n")
    assert [(e.where, e.field) for e in error_of(path, "text").errors] == [(f"{path}:1", "<json>"), (f"{path}:2", "<json>")]


# ------------------------------------------------------------------ 6. not a file, not on the Hub


@pytest.fixture
def no_hub(monkeypatch):
    """Fail the test if load_dataset is called (it would try the network)."""
    datasets = pytest.importorskip("datasets")

    def refuse(*args, **kwargs):
        raise AssertionError(f"load_dataset called with {args}")

    monkeypatch.setattr(datasets, "load_dataset", refuse)


@pytest.mark.parametrize("name", ["data.txt", "data.tsv", "x.jsonl.gz", "sub/data.TXT"])
def test_missing_file_with_any_suffix_is_file_not_found(tmp_path, monkeypatch, no_hub, name):
    monkeypatch.chdir(tmp_path)
    assert str(error_of(name, "text")) == f"{name}: file not found"


@pytest.mark.parametrize("name, suffix", [("data.txt", ".txt"), ("data.tsv", ".tsv"), ("x.jsonl.gz", ".gz")])
def test_existing_file_of_unknown_type(tmp_path, monkeypatch, no_hub, name, suffix):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, name, "text\nhello\n")
    assert str(error_of(name, "text")) == f"{name}: unknown file type '{suffix}'; expected one of .jsonl, .json, .parquet, .csv"


@pytest.mark.parametrize("name", ["org/name", "name", "teknium/OpenHermes-2.5"])
def test_hub_name_offline_is_one_line(offline, tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)  # nothing local by that name
    message = str(error_of(name, "preference"))
    assert message == f"{name}: not a local file or folder, and the Hub cannot be reached (HF_HUB_OFFLINE=1 is set)"


def test_hub_unreachable_or_unknown(monkeypatch, tmp_path):
    datasets = pytest.importorskip("datasets")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)

    def unreachable(name, *args, **kwargs):  # what datasets raises when the Hub's host does not answer
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    assert str(error_of("org/name", "sft")) == "org/name: not a local file or folder, and the Hub cannot be reached (no network?)"

    def unknown(name, *args, **kwargs):
        raise datasets.exceptions.DatasetNotFoundError(f"Dataset '{name}' doesn't exist on the Hub or cannot be accessed.")

    monkeypatch.setattr(datasets, "load_dataset", unknown)
    assert str(error_of("org/name", "sft")) == (
        "org/name: not a local file or folder, and no dataset of that name on the Hub (or it is private or gated)")
