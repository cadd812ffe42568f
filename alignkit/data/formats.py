"""Load data records and check them, with errors that name the file, the line and the field.

    records = load_records("data/train.jsonl", "preference")
    records[0]  # {"prompt": ..., "chosen": ..., "rejected": ..., "_where": "data/train.jsonl:1"}

Sources: a `.jsonl`, `.json`, `.parquet` or `.csv` file; an in-memory list of dicts;
a `datasets.Dataset`; a directory written by `Dataset.save_to_disk`; or anything else
`datasets.load_dataset(source, config_name, split=split)` accepts (a Hub name, a data
directory). A name that ends in a short word after a dot (`data.txt`, `x.jsonl.gz`) is a
file, never a Hub name: missing, it is "file not found"; there, an unknown file type.
`org/name` and `org/name-2.5` are Hub names. When `datasets` cannot find the split or
config asked for, the error lists those there are.

Kinds and their fields (TRL's names, so public datasets load unchanged):

| kind       | fields                                                                  |
| ---------- | ----------------------------------------------------------------------- |
| text       | `text`                                                                  |
| sft        | `prompt` + `completion` (both strings or both message lists), or `messages` |
|            | or `instruction`, `output`, optional `input` (Stanford Alpaca)           |
|            | or `inputs`, `targets` (FLAN collection, T0/P3, xP3; see below)         |
| preference | `prompt`, `chosen`, `rejected` (all strings, or all message lists)      |
|            | or `chosen`, `rejected` that start with the prompt (as HH-RLHF ships)   |
| ranking    | `prompt`, `responses` (>= 2 strings, best first), optional `scores`     |
| unpaired   | `prompt`, `completion`, `label` (bool; true = thumbs up)                |
| prompts    | `prompt` (extra fields such as `answer` pass through to reward functions) |
| steps      | `prompt`, `steps` (>= 1 strings), `labels` (one per step: 0/1, bool or a float in [0, 1]) |

A message list is `[{"role": ..., "content": "..."}, ...]`, role one of system, user,
assistant, tool. Where a message list is the completion (`messages`, `completion`,
`chosen`, `rejected`) its last message must be a non-empty assistant message.
With `scores`, `responses` (and `scores`) come back sorted best first, ties in input order.
`label` also accepts the strings true/false/1/0 (any case), as CSV stores it.
Preference rows without `prompt` (absent or null) come back with it taken from the start
of `chosen` and `rejected`, which keep only the rest: for strings the prompt is their
longest common prefix cut back to its last whitespace character, which then starts both
completions (`"\n\nHuman: hi\n\nAssistant:"` + `" Hello!"`); for message lists it is
their longest common run of leading messages, leaving each at least its last message.
A pair with chosen == rejected is not an error here: see `identical_pairs`.
In CSV, list-valued fields (`messages`, `responses`, `scores`) are JSON-encoded cells.

Instruction data loads as sft in the message form, so it goes through the tokenizer's chat
template (or chat.py's plain template) like any message record: the record gains
`prompt` = `[{"role": "user", ...}]` and `completion` = `[{"role": "assistant", ...}]`.
An Alpaca row's user message is `instruction`, or `instruction + "\\n\\n" + input` when `input`
is not blank; the assistant message is `output`. (Alpaca's own "Below is an instruction that
describes a task..." prompt is not applied: to train with it, write the templated text into
`prompt` / `completion` strings, which are used as they are.) A FLAN row's user message is
`inputs` and its assistant message `targets`: FLAN's and T0's released data hold the task
text already templated (template applied, options listed), so no template is applied here;
to template raw task fields yourself, write the result into `inputs` / `targets` (or into
`prompt` / `completion`) before loading. P3's `inputs_pretokenized` / `targets_pretokenized`
(text) are preferred to its `inputs` / `targets` (token ids); a singular `input` / `target`
pair is read as FLAN's only in a row without `instruction` and `output`. Layouts are tried
in the order `messages`, `prompt` + `completion`, Alpaca, FLAN; the first whose fields are
there decides (a field holding null counts as absent), and its errors name its fields
(`train.jsonl:7: field 'output': missing ...`).

Every record comes back as a plain dict with all its fields (extra fields kept) plus
`"_where"`, the location later stages put in their own error messages: `path:LINE`
for JSONL (the record's line), JSON (the line where the object starts) and CSV (the line
where the row starts; the header is line 1); `path:row N` for Parquet and datasets;
`<list>:item N` for lists. All numbers are 1-based. Nothing is skipped silently: every
row is checked, and if any are bad one `DataError` lists them all (the first 50), one
`path:LINE: field 'name': problem` line each, under a line like
`data/train.jsonl: 3 bad rows (of 120):`; `.errors` holds one `DataError` per bad row.
A single bad row gives the same one-line error as before. When every row is bad and
their fields are those of one other kind (`prompt` + `responses` loaded as preference),
one last line says so and which command takes them. Problems with the file as a whole
(missing, empty, not UTF-8, not JSON at all, CSV in a `.jsonl` file, a Hub that cannot
be reached) stop at once with a single error.
"""

from __future__ import annotations

import ast
import csv
import io
import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
MAX_LISTED = 50  # bad rows listed in one error's message; `.errors` keeps them all


class DataError(ValueError):
    """A bad record or file: `where: field 'name': what is wrong`.

    `where` is `path:LINE`, `path:row N`, `<list>:item N` or a bare path for
    file-level problems (missing, empty, unreadable); `field` is None for those.
    `errors` lists one `DataError` per bad row: `[self]` for a single problem; for
    several (see `for_rows`), `where`/`field`/`message` are those of the first.
    """

    def __init__(self, where: str, field: str | None, message: str):
        self.where, self.field, self.message = where, field, message
        self.errors: list[DataError] = [self]
        text = f"{where}: {message}" if field is None else f"{where}: field '{field}': {message}"
        super().__init__(text)

    @classmethod
    def for_rows(cls, name: str, errors: list[DataError], total: int) -> DataError:
        """One error for the bad rows `errors` of the `total` rows read from `name`."""
        errors = sorted(errors, key=lambda e: _position(e.where))  # stable: equal lines keep their order
        if len(errors) == 1:
            return errors[0]
        first = errors[0]
        combined = cls(first.where, first.field, first.message)
        combined.errors = errors
        lines = [f"{name}: {len(errors)} bad rows (of {total}):", *(str(e) for e in errors[:MAX_LISTED])]
        if len(errors) > MAX_LISTED:
            lines.append(f"... and {len(errors) - MAX_LISTED} more bad rows, not listed")
        combined.args = ("\n".join(lines),)
        return combined

    def __reduce__(self):  # pickle (e.g. across processes) despite the 3-argument __init__
        return type(self), (self.where, self.field, self.message), {**self.__dict__, "args": self.args}


def _position(where: str) -> int:
    """The line (or row, or item) number at the end of a `where`; 0 where there is none."""
    match = re.search(r"(\d+)$", where)
    return int(match.group(1)) if match else 0


class _BadRow:
    """What a reader yields in place of a row it could not read (the reading goes on)."""

    __slots__ = ("error",)

    def __init__(self, error: DataError):
        self.error = error


# ---------------------------------------------------------------- reading


def _type_name(value: Any) -> str:
    names = {type(None): "null", str: "str", bool: "bool", int: "int", float: "float",
             list: "list", dict: "object"}
    return names.get(type(value), type(value).__name__)


def _cut(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _preview(value: Any, limit: int = 60) -> str:
    """`repr(value)` cut to `limit` characters, for error messages."""
    try:
        text = repr(value)
    except Exception:  # an int too long for str(), a recursion, a broken __repr__
        text = f"<{_type_name(value)}>"
    return _cut(text, limit)


def _json_problem(error: Exception) -> str:
    """What is wrong with a JSON text that `json.loads` rejected."""
    if isinstance(error, json.JSONDecodeError):
        return f"{error.msg} (column {error.colno})"
    if isinstance(error, RecursionError):
        return "nested too deeply"
    # Another ValueError: an integer with more digits than int() accepts (sys.set_int_max_str_digits).
    return str(error).split(":")[0]


def _decode_utf8(data: bytes, path: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(
            f"{path}:{line}", "<encoding>",
            f"file is not valid UTF-8 (byte 0x{data[e.start]:02x} at column {column})",
        ) from None


# A CSV header line: two or more comma-separated names, maybe quoted (`prompt,chosen,rejected`).
_CSV_HEADER = re.compile(r'\s*("?)[A-Za-z_]\w*\1(\s*,\s*("?)[A-Za-z_]\w*\3)+\s*')


def _check_not_csv(text: str, path: str, instead: str) -> None:
    """One error for a CSV file under a JSON name, rather than "invalid JSON" on every row.

    A CSV header is never valid JSON, so this needs no JSON parse first.
    """
    found = re.search(r"\S", text)
    if found is None:
        return
    start = text.rfind("\n", 0, found.start()) + 1
    end = text.find("\n", start)
    line = text[start:end if end >= 0 else len(text)]
    if _CSV_HEADER.fullmatch(line):
        number = text.count("\n", 0, start) + 1
        raise DataError(path, None, f"looks like CSV (line {number}: `{_cut(line.strip())}`), not {instead}; "
                                    "rename it to .csv")


def _read_jsonl(text: str, path: str) -> Iterator[tuple[str, Any]]:
    _check_not_csv(text, path, "JSON Lines")
    # split("\n"), not splitlines(): JSON strings may hold U+2028 etc., which are not line breaks here.
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            value = json.loads(line)
        except (ValueError, RecursionError) as e:  # a bad line is one bad row: read on
            value = _BadRow(DataError(where, "<json>", f"invalid JSON: {_json_problem(e)}"))
        yield where, value


_WHITESPACE = re.compile(r"[ \t\n\r]*")


def _read_json(text: str, path: str) -> Iterator[tuple[str, Any]]:
    """A JSON array of records, or an object with one list value ({"data": [...]}).

    The document is parsed once to validate it, then walked with `raw_decode` so each
    record's line is where its value starts.
    """
    try:
        document = json.loads(text)
    except json.JSONDecodeError as e:
        _check_not_csv(text, path, "JSON")
        raise DataError(f"{path}:{e.lineno}", "<json>", f"invalid JSON: {_json_problem(e)}") from None
    except (ValueError, RecursionError) as e:  # no position for these
        raise DataError(path, "<json>", f"invalid JSON: {_json_problem(e)}") from None
    decoder = json.JSONDecoder()

    def skip(pos: int) -> int:
        return _WHITESPACE.match(text, pos).end()

    pos = skip(0)
    if isinstance(document, dict):
        lists = [key for key, value in document.items() if isinstance(value, list)]
        if len(lists) != 1:
            raise DataError(
                f"{path}:{text.count(chr(10), 0, pos) + 1}", "<json>",
                "expected a list of records, or an object with exactly one list value "
                f"(like {{\"data\": [...]}}); this object has {len(lists)} list values",
            )
        pos = skip(pos + 1)  # past "{"
        while True:  # walk "key": value pairs up to the list's value
            key, pos = decoder.raw_decode(text, pos)
            pos = skip(skip(pos) + 1)  # past ":"
            if key == lists[0] and text[pos] == "[":
                break
            _, pos = decoder.raw_decode(text, pos)
            pos = skip(skip(pos) + 1)  # past ","
    elif not isinstance(document, list):
        raise DataError(f"{path}:{text.count(chr(10), 0, pos) + 1}", "<json>",
                        f"expected a list of records, got {_type_name(document)}")

    pos = skip(pos + 1)  # past "["
    line, counted_to = 1, 0
    while text[pos] != "]":
        line += text.count("\n", counted_to, pos)
        counted_to = pos
        record, pos = decoder.raw_decode(text, pos)
        yield f"{path}:{line}", record
        pos = skip(pos)
        if text[pos] == ",":
            pos = skip(pos + 1)


# csv's default cap on one cell (128 KiB) is below a long document; lifted while reading.
_CSV_FIELD_LIMIT = min(sys.maxsize, 2**31 - 1)


def _parse_csv(text: str, path: str) -> list[tuple[int, Any]]:
    """[(line where the row starts, row)]; a row the parser gives up on ends the list as a _BadRow."""
    reader = csv.reader(io.StringIO(text, newline=""))
    rows: list[tuple[int, Any]] = []
    end = 0  # line where the previous row ended; a row starts on the line after it
    saved = csv.field_size_limit(_CSV_FIELD_LIMIT)  # a process-wide setting: put back below
    try:
        for row in reader:
            rows.append((end + 1, row))
            end = reader.line_num
    except csv.Error as e:
        error = DataError(f"{path}:{end + 1}", "<csv>", f"unreadable CSV, reading stopped here: {e}")
        rows.append((end + 1, _BadRow(error)))
    finally:
        csv.field_size_limit(saved)
    return rows


def _read_csv(text: str, path: str) -> Iterator[tuple[str, Any]]:
    header: list[str] | None = None
    for start, row in _parse_csv(text, path):
        where = f"{path}:{start}"
        if isinstance(row, _BadRow):
            yield where, row
        elif not row:  # a blank line
            continue
        elif header is None:
            header = row
        elif len(row) != len(header):
            yield where, _BadRow(DataError(where, "<csv>", f"row has {len(row)} fields, the header has {len(header)}"))
        else:
            yield where, dict(zip(header, row))


def _read_parquet(path: str) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError(path, None, f"not a readable Parquet file: {e}") from None
    for number, row in enumerate(rows, 1):
        yield f"{path}:row {number}", row


def _listed_names(text: str) -> str | None:
    """The first Python list literal in an exception's text (`... one of ['train_prefs']`), as `a, b`."""
    found = re.search(r"\[[^\[\]]*\]", text)
    try:
        return ", ".join(map(str, ast.literal_eval(found.group()))) if found else None
    except (ValueError, SyntaxError):
        return None


def _load_dataset_problem(error: Exception, split: str, config_name: str | None) -> str:
    """What `datasets.load_dataset` failed on, in one line: a split or config that is not
    there (with those that are), a Hub that cannot be reached, a name the Hub does not know."""
    import datasets

    text, names = str(error), _listed_names(str(error))
    if names is not None:
        if text.startswith("Unknown split"):
            return f"no split {split!r}; splits: {names}"
        if text.startswith("BuilderConfig") and "not found" in text:
            return f"no config {config_name!r}; configs: {names}"
        if text.startswith("Config name is missing"):
            return f"name a config, this dataset has several: {names}"
    # datasets turns a failed Hub request into a builtin ConnectionError (OfflineModeIsEnabled is one too).
    if isinstance(error, ConnectionError):
        why = "HF_HUB_OFFLINE=1 is set" if datasets.config.HF_HUB_OFFLINE else "no network?"
        return f"not a local file or folder, and the Hub cannot be reached ({why})"
    if isinstance(error, datasets.exceptions.DatasetNotFoundError):
        return "not a local file or folder, and no dataset of that name on the Hub (or it is private or gated)"
    return f"could not load dataset: {type(error).__name__}: {error}"


def _no_config(name: str, config_name: str | None) -> None:
    if config_name is not None:  # refused, not ignored: the user meant it to pick something
        raise DataError(name, None, f"config name {config_name!r} given, but only a dataset loaded by name or "
                                    "from a data folder (datasets.load_dataset) has configs")


def _read_dataset(source: Any, split: str, config_name: str | None) -> tuple[str, Iterable[tuple[str, Any]]]:
    import datasets

    if isinstance(source, datasets.Dataset):
        name, dataset = "<dataset>", source
        _no_config(name, config_name)
    else:
        name = str(source)
        directory = Path(name)
        if (directory / "state.json").is_file() or (directory / "dataset_dict.json").is_file():
            _no_config(name, config_name)
            try:
                dataset = datasets.load_from_disk(name)  # written by save_to_disk
            except Exception as e:
                raise DataError(name, None, f"could not load dataset: {type(e).__name__}: {e}") from None
            if isinstance(dataset, datasets.DatasetDict):
                if split not in dataset:
                    raise DataError(name, None, f"no split {split!r}; splits: {', '.join(dataset)}")
                dataset = dataset[split]
        else:
            try:
                dataset = datasets.load_dataset(name, config_name, split=split)
            except Exception as e:
                raise DataError(name, None, _load_dataset_problem(e, split, config_name)) from None
    rows = ((f"{name}:row {number}", row) for number, row in enumerate(dataset, 1))
    return name, rows


# A file name's last suffix is a short word (`.txt`, `.gz`); `org/name-2.5` is a Hub name.
_FILE_SUFFIX = re.compile(r"\.[a-z][a-z0-9]{0,4}")


def names_a_file(source: str | Path) -> bool:
    """True when `source` is read as a file, not as a `datasets` name or folder: an existing file, or
    a name with a file suffix that is not a folder (a missing data.jsonl is a missing file)."""
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    return path.is_file() or suffix in FILE_SUFFIXES or bool(_FILE_SUFFIX.fullmatch(suffix) and not path.is_dir())


def _read(source: Any, split: str, config_name: str | None) -> tuple[str, Iterable[tuple[str, Any]]]:
    """(name of the source, iterator of (where, raw record))."""
    if isinstance(source, (list, tuple)):
        _no_config("<list>", config_name)
        return "<list>", ((f"<list>:item {n}", item) for n, item in enumerate(source, 1))
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        name = str(source)
        suffix = path.suffix.lower()
        # A Hub name is "name" or "org/name": a path that is absolute or starts with "." or "~" is local,
        # and so is a name with a file suffix, unless it is a folder (a data directory or save_to_disk).
        local = path.is_absolute() or name.startswith((".", "~"))
        if names_a_file(path) or (local and not path.exists()):
            if not path.is_file():
                raise DataError(name, None, "not a file" if path.exists() else "file not found")
            if suffix not in FILE_SUFFIXES:
                raise DataError(name, None, f"unknown file type {suffix!r}; expected one of {', '.join(FILE_SUFFIXES)}")
            _no_config(name, config_name)
            if suffix == ".parquet":
                return name, _read_parquet(name)
            text = _decode_utf8(path.read_bytes(), name)
            reader = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv}[suffix]
            return name, reader(text, name)
    return _read_dataset(source, split, config_name)


# ---------------------------------------------------------------- checking


def _require(record: dict, where: str, field: str, kind: str, needs: str) -> Any:
    if field not in record:
        raise DataError(where, field, f"missing (a {kind} record needs {needs})")
    return record[field]


def _check_string(value: Any, where: str, field: str) -> None:
    if not isinstance(value, str):
        raise DataError(where, field, f"expected a string, got {_type_name(value)}")
    if not value.strip():
        raise DataError(where, field, "empty string" if not value else "whitespace-only string")


def _check_messages(value: Any, where: str, field: str, *, is_completion: bool) -> None:
    if not isinstance(value, list):
        raise DataError(where, field, f"expected a list of messages, got {_type_name(value)}")
    if not value:
        raise DataError(where, field, "empty list of messages")
    for i, message in enumerate(value):
        name = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise DataError(where, name, f"expected a message {{'role': ..., 'content': ...}}, got {_type_name(message)}")
        for key in ("role", "content"):
            if key not in message:
                raise DataError(where, f"{name}.{key}", "missing")
        if not isinstance(message["role"], str) or message["role"] not in ROLES:
            raise DataError(where, f"{name}.role", f"expected one of {', '.join(ROLES)}, got {_preview(message['role'])}")
        if not isinstance(message["content"], str):
            raise DataError(where, f"{name}.content", f"expected a string, got {_type_name(message['content'])}")
    if is_completion:
        last = f"{field}[{len(value) - 1}]"
        if value[-1]["role"] != "assistant":
            raise DataError(where, f"{last}.role",
                            f"the last message is the completion and must be from the assistant, got {value[-1]['role']!r}")
        if not value[-1]["content"].strip():
            raise DataError(where, f"{last}.content", "empty completion")


def _check_text_or_messages(value: Any, where: str, field: str, *, is_completion: bool) -> str:
    """Check a string-or-message-list field; returns "string" or "messages"."""
    if isinstance(value, str):
        _check_string(value, where, field)
        return "string"
    if isinstance(value, list):
        _check_messages(value, where, field, is_completion=is_completion)
        return "messages"
    raise DataError(where, field, f"expected a string or a list of messages, got {_type_name(value)}")


def _check_same_form(form: str, prompt_form: str, value: Any, where: str, field: str, like: str = "prompt") -> None:
    if form != prompt_form:
        wanted = "a string" if prompt_form == "string" else "a list of messages"
        raise DataError(where, field, f"expected {wanted} like '{like}', got {_type_name(value)}")


def _check_text(record: dict, where: str) -> None:
    _check_string(_require(record, where, "text", "text", "'text'"), where, "text")


def _check_prompt_completion(record: dict, where: str, kind: str, needs: str) -> None:
    prompt = _require(record, where, "prompt", kind, needs)
    completion = _require(record, where, "completion", kind, needs)
    prompt_form = _check_text_or_messages(prompt, where, "prompt", is_completion=False)
    form = _check_text_or_messages(completion, where, "completion", is_completion=True)
    _check_same_form(form, prompt_form, completion, where, "completion")


# Instruction data that loads as sft (see the module docstring): Alpaca's fields, then FLAN's / T0's.
ALPACA_FIELDS = ("instruction", "output")  # + optional "input"
# FLAN / T0 (P3) / xP3 column names, each with the alternatives tried in order: P3 keeps the text in
# `*_pretokenized` (its `inputs` / `targets` are token ids); a singular `input` / `target` only counts
# in a row without Alpaca's fields (`instruction`, `output`), where `input` is Alpaca's.
FLAN_PROMPT_FIELDS = ("inputs_pretokenized", "inputs", "input")
FLAN_COMPLETION_FIELDS = ("targets_pretokenized", "targets", "target")


def _present(record: dict, field: str) -> bool:
    """A field with a value: a `datasets` table with several layouts holds None where a row lacks a column."""
    return record.get(field) is not None


def _as_chat(record: dict, prompt: str, completion: str) -> None:
    """Give an instruction row the sft fields: one user message, one assistant message (in place)."""
    record["prompt"] = [{"role": "user", "content": prompt}]
    record["completion"] = [{"role": "assistant", "content": completion}]


def _check_alpaca(record: dict, where: str) -> None:
    """Stanford Alpaca's `instruction`, optional `input`, `output` -> user: instruction (+ "\\n\\n" + input
    when input is not blank), assistant: output."""
    needs = "'instruction' and 'output' (Alpaca's layout; 'input' optional)"
    instruction = _require(record, where, "instruction", "sft", needs)
    _check_string(instruction, where, "instruction")
    extra = record.get("input")
    if extra is not None and not isinstance(extra, str):
        raise DataError(where, "input", f"expected a string (it may be empty), got {_type_name(extra)}")
    output = _require(record, where, "output", "sft", needs)
    _check_string(output, where, "output")
    _as_chat(record, f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction, output)


def _check_flan(record: dict, where: str) -> None:
    """FLAN's / T0's `inputs` (the task text, already templated) -> user, `targets` -> assistant."""
    texts = []
    for names in (FLAN_PROMPT_FIELDS, FLAN_COMPLETION_FIELDS):
        name = next((n for n in names if _present(record, n)), None)
        if name is None:
            raise DataError(where, names[1], "missing (a sft record needs 'inputs' and 'targets' (FLAN's layout))")
        _check_string(record[name], where, name)
        texts.append(record[name])
    _as_chat(record, *texts)


def _check_sft(record: dict, where: str) -> None:
    """Layouts tried in this order, the first whose fields the row has deciding: `messages`;
    `prompt` + `completion`; Alpaca's `instruction` / `output`; FLAN's `inputs` / `targets`
    (see FLAN_*_FIELDS). A field holding None counts as absent, as in a `datasets` table that
    mixes layouts, except that `prompt` / `completion` keys with nothing else are still checked
    as that layout (so a null prompt is named as such)."""
    needs = "'prompt' and 'completion', or 'messages'"
    if record.get("messages") is not None:
        _check_messages(record["messages"], where, "messages", is_completion=True)
        return
    alpaca = any(_present(record, f) for f in ALPACA_FIELDS)
    flan = any(_present(record, f) for f in FLAN_PROMPT_FIELDS[:2] + FLAN_COMPLETION_FIELDS)
    if _present(record, "prompt") or _present(record, "completion") or (
            ("prompt" in record or "completion" in record) and not (alpaca or flan)):
        _check_prompt_completion(record, where, "sft", needs)
    elif alpaca:
        _check_alpaca(record, where)
    elif flan:
        _check_flan(record, where)
    else:
        _require(record, where, "messages", "sft", needs + ", or Alpaca's 'instruction' and 'output', "
                                                           "or FLAN's 'inputs' and 'targets'")
        _check_messages(record["messages"], where, "messages", is_completion=True)


def _take_prompt_from_pair(record: dict, where: str) -> None:
    """Split HH-RLHF's layout (no `prompt`; the conversation so far starts both `chosen` and
    `rejected`) into the explicit one, in place.

    Strings: prompt = longest common prefix cut back to its last whitespace character, so
    each completion starts with that whitespace and its first word. Message lists: prompt =
    the longest common run of leading messages, short of the last message of either list.
    """
    chosen, rejected = record["chosen"], record["rejected"]
    form = _check_text_or_messages(chosen, where, "chosen", is_completion=True)
    _check_same_form(_check_text_or_messages(rejected, where, "rejected", is_completion=True),
                     form, rejected, where, "rejected", like="chosen")
    if form == "string":
        shared = os.path.commonprefix([chosen, rejected])
        cut = max((i for i, char in enumerate(shared) if char.isspace()), default=0)
    else:  # a completion keeps at least one message, even when chosen == rejected
        cut = 0
        while cut < min(len(chosen), len(rejected)) - 1 and chosen[cut] == rejected[cut]:
            cut += 1
    prompt = chosen[:cut]
    if not prompt or (form == "string" and not prompt.strip()):
        raise DataError(where, "prompt", "missing, and chosen/rejected share no prefix to take it from")
    record["prompt"], record["chosen"], record["rejected"] = prompt, chosen[cut:], rejected[cut:]


def _check_preference(record: dict, where: str) -> None:
    needs = "'prompt', 'chosen' and 'rejected'"
    if record.get("prompt") is None and "chosen" in record and "rejected" in record:
        _take_prompt_from_pair(record, where)
    fields = [_require(record, where, name, "preference", needs) for name in ("prompt", "chosen", "rejected")]
    prompt_form = _check_text_or_messages(fields[0], where, "prompt", is_completion=False)
    for name, value in zip(("chosen", "rejected"), fields[1:]):
        form = _check_text_or_messages(value, where, name, is_completion=True)
        _check_same_form(form, prompt_form, value, where, name)


def _check_ranking(record: dict, where: str) -> None:
    needs = "'prompt' and 'responses' (optionally 'scores')"
    _check_text_or_messages(_require(record, where, "prompt", "ranking", needs), where, "prompt", is_completion=False)
    responses = _require(record, where, "responses", "ranking", needs)
    if not isinstance(responses, list):
        raise DataError(where, "responses", f"expected a list of strings, got {_type_name(responses)}")
    if len(responses) < 2:
        raise DataError(where, "responses", f"expected at least 2 responses, got {len(responses)}")
    for i, response in enumerate(responses):
        _check_string(response, where, f"responses[{i}]")
    if record.get("scores") is None:
        return
    scores = record["scores"]
    if not isinstance(scores, list):
        raise DataError(where, "scores", f"expected a list of numbers, got {_type_name(scores)}")
    if len(scores) != len(responses):
        raise DataError(where, "scores", f"expected {len(responses)} scores (one per response), got {len(scores)}")
    for i, score in enumerate(scores):
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            raise DataError(where, f"scores[{i}]", f"expected a number, got {_type_name(score)}")
        if isinstance(score, float) and not math.isfinite(score):  # isfinite() overflows on a huge int
            raise DataError(where, f"scores[{i}]", f"expected a finite number, got {score}")
    order = sorted(range(len(scores)), key=lambda i: -scores[i])  # sorted() is stable: ties keep input order
    record["responses"] = [responses[i] for i in order]
    record["scores"] = [scores[i] for i in order]


_LABELS = {"true": True, "1": True, "false": False, "0": False}


def _check_unpaired(record: dict, where: str) -> None:
    needs = "'prompt', 'completion' and 'label'"
    _check_prompt_completion(record, where, "unpaired", needs)
    label = _require(record, where, "label", "unpaired", needs)
    if isinstance(label, bool):
        return
    if isinstance(label, int) and label in (0, 1):  # a Parquet/pandas int column
        record["label"] = bool(label)
    elif isinstance(label, str) and label.strip().lower() in _LABELS:  # CSV
        record["label"] = _LABELS[label.strip().lower()]
    else:
        raise DataError(where, "label", f"expected a bool (true/false, 1/0), got {_type_name(label)} {_preview(label)}")


def _check_steps(record: dict, where: str) -> None:
    """A step-labelled solution (process supervision): `labels[k]` says whether step k is correct, 0/1 or
    bool from a step checker, a float in [0, 1] from Monte-Carlo estimates. Labels come back as floats."""
    needs = "'prompt', 'steps' and 'labels'"
    _check_text_or_messages(_require(record, where, "prompt", "steps", needs), where, "prompt", is_completion=False)
    steps = _require(record, where, "steps", "steps", needs)
    labels = _require(record, where, "labels", "steps", needs)
    if not isinstance(steps, list):
        raise DataError(where, "steps", f"expected a list of strings, got {_type_name(steps)}")
    if not steps:
        raise DataError(where, "steps", "empty list of steps")
    for i, step in enumerate(steps):
        _check_string(step, where, f"steps[{i}]")
    if not isinstance(labels, list):
        raise DataError(where, "labels", f"expected a list of numbers, got {_type_name(labels)}")
    if len(labels) != len(steps):
        raise DataError(where, "labels", f"expected {len(steps)} labels (one per step), got {len(labels)}")
    for i, label in enumerate(labels):
        if not isinstance(label, (bool, int, float)) or (isinstance(label, float) and not math.isfinite(label)):
            raise DataError(where, f"labels[{i}]", f"expected 0/1, a bool or a number in [0, 1], got {_preview(label)}")
        if not 0 <= label <= 1:
            raise DataError(where, f"labels[{i}]", f"expected a number in [0, 1], got {label}")
    record["labels"] = [float(label) for label in labels]


def _check_prompts(record: dict, where: str) -> None:
    _check_text_or_messages(_require(record, where, "prompt", "prompts", "'prompt'"), where, "prompt", is_completion=False)


CHECKS: dict[str, Callable[[dict, str], None]] = {
    "text": _check_text,
    "sft": _check_sft,
    "preference": _check_preference,
    "ranking": _check_ranking,
    "unpaired": _check_unpaired,
    "prompts": _check_prompts,
    "steps": _check_steps,
}
# The fields that make a row look like each kind (one tuple per layout), and the command that takes it:
# when every row fails as one kind and each has the fields of the same other kind, the error says so.
KIND_FIELDS: dict[str, tuple[tuple[str, ...], ...]] = {
    "text": (("text",),),
    "sft": (("prompt", "completion"), ("messages",), ("instruction", "output"), ("inputs", "targets")),
    "preference": (("prompt", "chosen", "rejected"), ("chosen", "rejected")),
    "ranking": (("prompt", "responses"),),
    "unpaired": (("prompt", "completion", "label"),),
    "prompts": (("prompt",),),
    "steps": (("prompt", "steps", "labels"),),
}
KIND_COMMANDS = {
    "text": "use `alignkit pretrain`",
    "sft": "use `alignkit sft`",
    "preference": "use `alignkit dpo` or `alignkit rm`",
    "ranking": "for `alignkit rm` pass --data_kind ranking",
    "unpaired": "use `alignkit kto`",
    "prompts": "use an online method (`alignkit grpo`, `ppo`, `rloo`, `bon`)",
    "steps": "use `alignkit prm`",
}


def _looks_like(raw: Any, kind: str) -> tuple[str, tuple[str, ...]] | None:
    """(other kind, its layout) that a row which failed as `kind` has the fields of, or None.

    None where `kind`'s own fields are there (its values are what is wrong). Of the layouts
    present, one inside a larger one (`prompt` inside `prompt, completion, label`) does not
    count, and exactly one kind must be left. A None value counts as absent, as in a table.
    """
    fields = {key for key, value in raw.items() if value is not None} if isinstance(raw, dict) else set()
    present = [(k, layout) for k, layouts in KIND_FIELDS.items() for layout in layouts if fields >= set(layout)]
    if any(k == kind for k, _ in present):
        return None
    widest = [(k, layout) for k, layout in present if not any(set(layout) < set(other) for _, other in present)]
    return widest[0] if len({k for k, _ in widest}) == 1 else None


# Fields that hold lists; a CSV cell can only hold a string, so there they are JSON-encoded.
CSV_LIST_FIELDS = {"sft": ("messages",), "ranking": ("responses", "scores"), "steps": ("steps", "labels")}


def _decode_csv_lists(record: dict, where: str, kind: str) -> None:
    for field in CSV_LIST_FIELDS.get(kind, ()):
        if field not in record:
            continue
        cell = record[field]
        if cell == "":  # an empty cell is a missing value, as null is in a Parquet table
            record[field] = None
            continue
        try:
            record[field] = json.loads(cell)
        except (ValueError, RecursionError) as e:
            raise DataError(where, field, f"expected a JSON-encoded list in this CSV cell: {_json_problem(e)}") from None


def load_records(source: Any, kind: str, *, split: str = "train", config_name: str | None = None) -> list[dict]:
    """Read and check every record of `source` as `kind`; see the module docstring.

    `split` and `config_name` pick the part of a `datasets` source (`config_name` is
    refused for other sources). Returns plain dicts (all fields, extras kept) with
    `"_where"` added. Checks every record, then raises one `DataError` naming file, line
    and field of each bad one (`.errors` has them all); raises at once for a file that
    cannot be read at all; raises `ValueError` for an unknown `kind`.
    """
    if kind not in CHECKS:
        raise ValueError(f"unknown data kind {kind!r}; valid kinds: {', '.join(CHECKS)}")
    check = CHECKS[kind]
    name, rows = _read(source, split, config_name)
    from_csv = isinstance(source, (str, Path)) and Path(source).suffix.lower() == ".csv"
    records: list[dict] = []
    errors: list[DataError] = []
    total = 0
    looks_like = []  # per bad row, the other kind it has the fields of (see _looks_like)
    for where, raw in rows:
        total += 1
        if isinstance(raw, _BadRow):  # a row the reader could not read (a bad JSON line, ...)
            errors.append(raw.error)
            looks_like.append(None)
            continue
        try:
            if not isinstance(raw, dict):
                raise DataError(where, "<record>", f"expected an object with named fields, got {_type_name(raw)}")
            record = dict(raw)
            if from_csv:
                _decode_csv_lists(record, where, kind)
            check(record, where)
        except DataError as e:
            errors.append(e.with_traceback(None))  # a kept traceback would keep every frame alive
            looks_like.append(_looks_like(raw, kind))
            continue
        record["_where"] = where
        records.append(record)
    if errors:
        error = DataError.for_rows(name, errors, total)
        if not records and looks_like[0] and all(k and k[0] == looks_like[0][0] for k in looks_like):
            other, layout = looks_like[0]
            error.args = (f"{error.args[0]}\nthese rows look like {other} data ({', '.join(layout)}): "
                          f"{KIND_COMMANDS[other]}",)
        raise error
    if not records:
        raise DataError(name, None, "no records")
    return records


def identical_pairs(records: list[dict]) -> list[str]:
    """The `_where` of each preference record whose chosen equals rejected (string or message list).

    Such a pair carries no preference: its DPO / Bradley-Terry gradient is exactly 0.
    """
    return [record["_where"] for record in records if record["chosen"] == record["rejected"]]
