"""Several data sources: `data: a.jsonl,b.jsonl` concatenates them, `data_weights` mixes them.

The share test's bound: a source of probability p drawn N times has a share with standard error
sqrt(p (1 - p) / N); every seed tried must land within 3 of them (about 0.3% per seed by chance,
and the seeds are fixed, so the test is deterministic)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import Counter

import pytest

from alignkit.config import ConfigError, parse_config
from alignkit.data import DataError
from alignkit.data.mixture import describe, mix, split_sources, weights_problem
from alignkit.train.common import load_train_eval
from alignkit.train.sft import SFTConfig


def rows(name, n):
    return [{"prompt": f"{name} question {i}?", "completion": f" {name} answer {i}", "source": name} for i in range(n)]


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


@pytest.fixture
def two_files(tmp_path):
    """a.jsonl with 300 sft rows, b.jsonl with 200."""
    return write(tmp_path / "a.jsonl", rows("a", 300)), write(tmp_path / "b.jsonl", rows("b", 200))


# ------------------------------------------------------------------ the pure rule


@pytest.mark.parametrize("seed", range(5))
def test_a_weighted_mixture_draws_each_share_within_three_standard_errors(seed):
    a, b = rows("a", 300), rows("b", 200)
    records, counts = mix([a, b], [0.7, 0.3], seed)
    n = len(records)
    assert n == 500 and sum(counts) == n  # as many rows as both sources together
    assert counts == [sum(r["source"] == "a" for r in records), sum(r["source"] == "b" for r in records)]
    bound = 3 * math.sqrt(0.7 * 0.3 / n)  # 0.061 for N = 500
    assert abs(counts[0] / n - 0.7) <= bound, (counts, bound)
    # a: drawn ~350 times from 300 rows, cycling: every row once before any row twice
    uses = Counter(r["completion"] for r in records if r["source"] == "a")
    assert len(uses) == min(counts[0], 300) and max(uses.values()) - min(uses.values()) <= 1
    # b: drawn ~150 times from 200 rows: no row twice
    assert len({r["completion"] for r in records if r["source"] == "b"}) == counts[1]


def test_the_mixture_is_reproducible_by_seed_and_copies_repeated_rows():
    a, b = rows("a", 30), rows("b", 20)
    first, counts = mix([a, b], [0.9, 0.1], seed=3)
    again, counts_again = mix([a, b], [0.9, 0.1], seed=3)
    assert first == again and counts == counts_again
    other, _ = mix([a, b], [0.9, 0.1], seed=4)
    assert other != first
    assert len({id(r) for r in first}) == len(first)  # a repeated row is its own dict
    assert all(r in a or r in b for r in first)


def test_no_weights_concatenate_and_zero_weight_leaves_a_source_out():
    a, b = rows("a", 3), rows("b", 2)
    assert mix([a, b]) == (a + b, [3, 2])
    records, counts = mix([a, b], [1, 0], seed=0)
    assert counts == [5, 0] and {r["source"] for r in records} == {"a"}


@pytest.mark.parametrize("weights, problem", [
    ([0.7], "1 weight for 2 sources; give one weight per data source, in order"),
    ([0.5, 0.3, 0.2], "3 weights for 2 sources; give one weight per data source, in order"),
    ([0.7, -0.3], "weight 2 is -0.3; weights must be finite and >= 0"),
    ([float("nan"), 1.0], "weight 1 is nan; weights must be finite and >= 0"),
    ([0, 0.0], "every weight is 0; at least one source needs a weight > 0"),
])
def test_bad_weights(weights, problem):
    assert weights_problem(weights, 2) == problem
    with pytest.raises(ValueError, match="^" + problem.replace("(", r"\(").replace(")", r"\)") + "$"):
        mix([rows("a", 2), rows("b", 2)], weights)


def test_split_sources_and_describe(tmp_path):
    assert split_sources("a.jsonl, b.jsonl ,org/name") == ["a.jsonl", "b.jsonl", "org/name"]
    odd = tmp_path / "x,y.jsonl"
    odd.write_text("")
    assert split_sources(str(odd)) == [str(odd)]  # an existing path is one source, commas and all
    with pytest.raises(ValueError, match="empty source name"):
        split_sources("a.jsonl,,b.jsonl")
    assert (describe(["alpaca.jsonl", "flan.jsonl"], [704, 296])
            == "mixture: alpaca.jsonl 704 rows (70.4%), flan.jsonl 296 (29.6%)")


# ------------------------------------------------------------------ through load_train_eval


def test_load_train_eval_mixes_files_and_reports_the_counts(two_files, capsys):
    a, b = two_files
    cfg = SFTConfig(data=f"{a},{b}", data_weights=[0.7, 0.3], seed=1)
    train, held = load_train_eval(cfg, "sft")
    counts = [sum(r["source"] == s for r in train) for s in "ab"]
    assert len(train) == 500 and held == []
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line == f"mixture: {a} {counts[0]} rows ({counts[0] / 5:.1f}%), {b} {counts[1]} ({counts[1] / 5:.1f}%)"
    again, _ = load_train_eval(cfg, "sft")
    assert again == train  # same seed, same rows in the same order
    assert load_train_eval(SFTConfig(data=f"{a},{b}", data_weights=[0.7, 0.3], seed=2), "sft")[0] != train


def test_without_weights_the_sources_are_concatenated(two_files, capsys):
    a, b = two_files
    train, _ = load_train_eval(SFTConfig(data=f"{a},{b}"), "sft")
    assert [r["_where"] for r in train] == [f"{a}:{i}" for i in range(1, 301)] + [f"{b}:{i}" for i in range(1, 201)]
    assert capsys.readouterr().out.strip() == f"data (concatenated): {a} 300 rows (60.0%), {b} 200 (40.0%)"


def test_eval_fraction_holds_out_of_each_source_before_mixing(two_files, capsys):
    a, b = two_files
    cfg = SFTConfig(data=f"{a},{b}", data_weights=[0.9, 0.1], eval_fraction=0.1, seed=0)
    train, held = load_train_eval(cfg, "sft")
    assert len(held) == 50 and len(train) == 450
    assert Counter(r["source"] for r in held) == {"a": 30, "b": 20}
    assert not {r["_where"] for r in held} & {r["_where"] for r in train}  # a repeated row never leaks into eval
    assert capsys.readouterr().out.strip().endswith(f"; held out for eval: {a} 30, {b} 20")
    # one source: the same rows held out as before mixtures existed
    only_a, held_a = load_train_eval(SFTConfig(data=a, eval_fraction=0.1, seed=0), "sft")
    assert len(only_a) == 270 and len(held_a) == 30
    assert capsys.readouterr().out == ""  # one source: no mixture line


def test_eval_data_may_be_a_comma_list(two_files, tmp_path):
    a, b = two_files
    c = write(tmp_path / "c.jsonl", rows("c", 4))
    train, held = load_train_eval(SFTConfig(data=a, eval_data=f"{b},{c}"), "sft")
    assert len(train) == 300 and [r["source"] for r in held] == ["b"] * 200 + ["c"] * 4


def test_a_source_that_fails_names_itself(two_files, tmp_path):
    a, _ = two_files
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "Q"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=f"^{bad}:1: field 'completion': missing"):
        load_train_eval(SFTConfig(data=f"{a},{bad}", data_weights=[1, 1]), "sft")
    with pytest.raises(DataError, match=f"^{tmp_path / 'gone.jsonl'}: file not found$"):
        load_train_eval(SFTConfig(data=f"{a},{tmp_path / 'gone.jsonl'}"), "sft")
    pairs = write(tmp_path / "pairs.jsonl", [{"prompt": "Q", "chosen": "a", "rejected": "b"}] * 2)
    with pytest.raises(DataError, match="look like preference data"):  # every source loads as the same kind
        load_train_eval(SFTConfig(data=f"{a},{pairs}"), "sft")


def test_weight_errors_and_split_per_source(two_files):
    a, b = two_files
    with pytest.raises(ConfigError, match=r"^data_weights: 1 weight for 2 sources"):
        load_train_eval(SFTConfig(data=f"{a},{b}", data_weights=[1.0]), "sft")
    with pytest.raises(ConfigError, match=r"^data_weights: every weight is 0"):
        load_train_eval(SFTConfig(data=f"{a},{b}", data_weights=[0, 0]), "sft")
    with pytest.raises(ConfigError, match=r"^data 'a.jsonl,': an empty source name"):
        load_train_eval(SFTConfig(data="a.jsonl,"), "sft")
    # checked per source, before anything loads (org/name would be a Hub dataset)
    with pytest.raises(ConfigError, match=f"^split applies to a `datasets` name or folder, and {b} is a file"):
        load_train_eval(SFTConfig(data=f"org/name,{b}", split="test"), "sft")
    with pytest.raises(ConfigError, match=f"^dataset_config applies .* and {a} is a file"):
        load_train_eval(SFTConfig(data=f"org/name,{a}", dataset_config="x"), "sft")
    with pytest.raises(ConfigError, match=f"^eval_split applies .* and {b} is a file"):
        load_train_eval(SFTConfig(data="org/name", eval_data=f"org/other,{b}", eval_split="test"), "sft")


def test_command_line_and_yaml_weights(two_files, tmp_path):
    a, b = two_files
    out = str(tmp_path / "out")
    cfg = parse_config(SFTConfig, ["--data", f"{a},{b}", "--data_weights", "0.7", "0.3", "--output_dir", out])
    assert cfg.data_weights == [0.7, 0.3]
    yaml = tmp_path / "run.yaml"
    yaml.write_text(f"data: {a},{b}\ndata_weights: [0.7, 0.3]\noutput_dir: {out}\n")
    assert parse_config(SFTConfig, ["--config", str(yaml)]).data_weights == [0.7, 0.3]
    for weights, message in ((["0.7"], "data_weights: 1 weight for 2 sources"),
                             (["0.7", "-1"], "data_weights: weight 2 is -1.0"),
                             (["abc"], "expected a number, got 'abc'")):
        with pytest.raises(ConfigError, match=message):
            parse_config(SFTConfig, ["--data", f"{a},{b}", "--data_weights", *weights, "--output_dir", out])


def test_sft_trains_on_a_weighted_mixture_from_the_command_line(two_files, tiny_model_dir, tmp_path):
    a, b = two_files
    proc = subprocess.run([sys.executable, "-m", "alignkit", "sft", "--model", str(tiny_model_dir),
                           "--data", f"{a},{b}", "--data_weights", "0.7", "0.3", "--max_steps", "2",
                           "--batch_size", "4", "--max_length", "64", "--output_dir", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"mixture: {a} " in proc.stdout and "sft: 500 examples" in proc.stdout
    assert "sft finished: 2 steps" in proc.stdout
    assert "data_weights:\n- 0.7\n- 0.3\n" in (tmp_path / "out" / "config.yaml").read_text()
