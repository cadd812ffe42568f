"""Fuzz `load_records`: whatever the input, it returns records or raises `DataError`, nothing else.

Bounded and deterministic (`derandomize=True`, no example database), so it runs in
`make test` in a few seconds and fails the same way every time. For a longer, random
search: `ALIGNKIT_FUZZ_EXAMPLES=5000 .venv/bin/python -m pytest -q tests/data/test_fuzz.py`.
"""

from __future__ import annotations

import csv
import json
import os
import re
import tempfile

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from alignkit.data import DataError, load_records  # noqa: E402
from alignkit.data.formats import CHECKS  # noqa: E402

# Hypothesis caches things under ./.hypothesis (at collection already): keep them out of the checkout.
if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
    try:
        from hypothesis.configuration import set_hypothesis_home_dir
    except ImportError:  # not a documented API: without it the caches stay in ./.hypothesis (self-gitignored)
        pass
    else:
        _HOME = tempfile.TemporaryDirectory(prefix="alignkit-hypothesis-")  # removed at exit
        set_hypothesis_home_dir(_HOME.name)

KINDS = tuple(CHECKS)
FIELDS = ("prompt", "completion", "chosen", "rejected", "messages", "responses", "scores", "label", "text")
_DEEP = int(os.environ.get("ALIGNKIT_FUZZ_EXAMPLES", "0"))
FUZZ = settings(
    max_examples=_DEEP or 150,
    deadline=None,
    derandomize=not _DEEP,  # the same examples on every run
    database=None,  # nothing saved between runs
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def row_number(where):
    """The N of `path:N` / `<list>:item N`; None for a file-level error (a bare path)."""
    match = re.search(r":(?:item )?(\d+)$", where)
    return match and int(match.group(1))


def outcome(source, kind):
    """Load `source`: ("ok", records) or ("error", [(position, field, message)]); anything else fails."""
    try:
        records = load_records(source, kind)
    except DataError as e:
        text = str(e)  # the message renders, and names every listed row
        assert e.errors and all(isinstance(x, DataError) for x in e.errors)
        assert (e.where, e.field, e.message) == (e.errors[0].where, e.errors[0].field, e.errors[0].message)
        if len(e.errors) > 1:
            hint = "\nthese rows look like " in text  # one last line when every row fits another kind
            assert text.count("\n") == min(len(e.errors), 50) + (len(e.errors) > 50) + hint
        return "error", [(row_number(x.where), x.field, x.message) for x in e.errors]
    assert isinstance(records, list) and records
    for record in records:
        assert isinstance(record, dict) and isinstance(record["_where"], str)
    return "ok", [{k: v for k, v in r.items() if k != "_where"} for r in records]


# ------------------------------------------------------------------ (a) random bytes

# Fragments that reach past the first parse: JSON/CSV syntax, real field names, a BOM, NUL, U+2028.
# (Bad UTF-8 comes from st.binary and GROWABLE: here it would stop most examples at decoding.)
TOKENS = [
    b"{", b"}", b"[", b"]", b":", b",", b'"', b"\\", b"\n", b"\r\n", b"\r", b" ", b"\t",
    b"null", b"true", b"false", b"0", b"-1", b"7", b"1e400", b"NaN", b"Infinity", b'""', b'" "',
    b'"data"', b'"role"', b'"content"', b'"user"', b'"assistant"', b'"x"', b"\\u2028", b"\\ud800",
    b"\xef\xbb\xbf", b"\x00", b"\xe2\x80\xa8",
    *(b'"%s"' % f.encode() for f in FIELDS), *(f.encode() for f in FIELDS),
]
soup = st.lists(st.sampled_from(TOKENS), max_size=60).map(b"".join)
# A fragment repeated 64 to ~130,000 times (log-uniform), between a few tokens: deep nesting, long numbers, huge cells.
GROWABLE = [b"[", b"[ ", b'{"a":', b'{"prompt":', b'[{"messages":', b"7", b"x", b" ", b"\n", b",", b'"', b"\xff"]
few = st.lists(st.sampled_from(TOKENS), max_size=4).map(b"".join)
grown = st.builds(lambda before, chunk, power, extra, after: before + chunk * (2**power + extra) + after,
                  few, st.sampled_from(GROWABLE), st.integers(min_value=6, max_value=17),
                  st.integers(min_value=0, max_value=3), few)
raw_bytes = st.booleans().flatmap(lambda big: grown if big else st.one_of(st.binary(max_size=200), soup))


@FUZZ
@given(content=raw_bytes)
def test_random_bytes_load_or_data_error(fuzz_dir, content):
    for suffix in (".jsonl", ".csv", ".json"):
        path = fuzz_dir / f"fuzz{suffix}"
        path.write_bytes(content)
        for kind in KINDS:
            outcome(path, kind)


# ------------------------------------------------------------------ (b) random JSON values

# Characters that matter to the checks (str.strip()'s whitespace, quotes, brackets, a lone surrogate)
# plus some ordinary ones; a fixed alphabet also spares Hypothesis its Unicode tables (seconds).
ALPHABET = "aZ7 \t\n\r\x0b\x0c\x1c\x85\xa0\u2028\u3000\x00\"\\,{}[]:\u00e9\U0001f600\ud800\ufeff"


def text(max_size):
    return st.text(alphabet=ALPHABET, max_size=max_size)  # (JSON escapes the lone surrogate)


leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**400), max_value=10**400),  # past float range, inside str(int)'s digit limit
    st.floats(allow_nan=True, allow_infinity=True),
    text(8),
    st.sampled_from(["", " ", "true", "FALSE", "1", "0", "system", "user", "assistant", "tool"]),
)
messages = st.lists(
    st.fixed_dictionaries(
        {},
        optional={"role": st.one_of(st.sampled_from(["system", "user", "assistant", "tool", "bot"]), leaves),
                  "content": st.one_of(text(5), leaves)},
    ),
    max_size=3,
)
json_values = st.recursive(
    st.one_of(leaves, messages),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(FIELDS + ("role", "content")), text(4)),
                        children, max_size=4),
    ),
    max_leaves=12,
)
records = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=4)
# Records close to valid ones, so the fuzzer gets past the first check of each kind.
text_or_messages = st.one_of(text(6), messages, leaves)
near_valid = st.fixed_dictionaries({}, optional={
    "prompt": text_or_messages, "completion": text_or_messages, "chosen": text_or_messages,
    "rejected": text_or_messages, "messages": st.one_of(messages, leaves), "text": text_or_messages,
    "responses": st.lists(st.one_of(text(4), leaves), max_size=4),
    "scores": st.one_of(st.lists(leaves, max_size=4), leaves), "label": leaves,
})
# Ranking records valid up to their scores, which often have as many entries as responses: scores get checked.
numbers = st.one_of(st.integers(min_value=-(10**400), max_value=10**400), st.floats(), leaves)
ranking_like = st.integers(min_value=0, max_value=4).flatmap(lambda n: st.fixed_dictionaries(
    {"prompt": st.just("Q"), "responses": st.lists(st.sampled_from(["good", "bad"]), min_size=n, max_size=n)},
    optional={"scores": st.lists(numbers, min_size=n, max_size=n)},
))
rows = st.lists(st.one_of(near_valid, near_valid, ranking_like, records, json_values), min_size=0, max_size=6)


@FUZZ
@given(rows=rows)
def test_random_json_rows_load_or_data_error(fuzz_dir, rows):
    jsonl = fuzz_dir / "rows.jsonl"
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    array = fuzz_dir / "rows.json"
    array.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    before = json.dumps(rows)
    for kind in KINDS:
        from_list = outcome(list(rows), kind)
        # The same rows give the same records, or the same errors, however they arrive.
        # (json.dumps: NaN == NaN as text; a JSONL row's line is its item number.)
        assert json.dumps(outcome(jsonl, kind)) == json.dumps(from_list), kind
        status, result = outcome(array, kind)
        assert status == from_list[0], kind
        if status == "error":
            assert [e[1:] for e in result] == [e[1:] for e in from_list[1]], kind
        else:
            assert json.dumps(result) == json.dumps(from_list[1]), kind
    assert json.dumps(rows) == before  # the list passed in is left as it was


# ------------------------------------------------------------------ (c) random CSV tables

# Cells as CSV holds them: plain strings, JSON-encoded values (list fields are stored so),
# and long runs (a nesting or a number too deep or long for json.loads, a cell past csv's 128 KiB cap).
long_cells = st.builds(lambda chunk, power: chunk * (2**power + 1),
                       st.sampled_from(["[", "7", "x", "\n", '"']), st.integers(min_value=8, max_value=17))
cells = st.one_of(st.text(alphabet=ALPHABET.replace("\ud800", ""), max_size=8),  # a file holds no lone surrogate
                  st.sampled_from(["", " ", "true", "FALSE", "0", "1", "maybe"]),
                  json_values.map(json.dumps), long_cells)
tables = st.lists(st.sampled_from(FIELDS), min_size=1, max_size=5, unique=True).flatmap(lambda header: st.tuples(
    st.just(header),
    st.lists(st.one_of(st.lists(cells, min_size=len(header), max_size=len(header)), st.lists(cells, max_size=6)),
             max_size=4),
))


@FUZZ
@given(table=tables)
def test_random_csv_tables_load_or_data_error(fuzz_dir, table):
    header, body = table
    path = fuzz_dir / "table.csv"
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(body)
    for kind in KINDS:
        outcome(path, kind)
