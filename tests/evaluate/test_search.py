"""Search compared at equal samples: every verifier picks from the same N samples."""

import pytest

from alignkit.evaluate.search import compare_search, format_rows, majority_pick


def test_majority_pick():
    assert majority_pick([3, 5, 5, 3, 5]) == 1  # 5 three times: its first
    assert majority_pick([None, 4, 7]) == 1  # a tie: the earliest of the most common
    assert majority_pick([None, None, 2, None]) == 2
    assert majority_pick([None, None]) == 0


def test_verifiers_pick_from_the_same_samples(tiny_model_dir, tiny_tokenizer, one_thread):
    """A verifier that is the gold reward reaches pass@N; a constant one keeps the first sample (ties go to the
    earliest), so it equals best-of-1; one that prefers wrong answers never beats the first sample."""
    from alignkit.models.load import load_causal_lm

    policy = load_causal_lm(str(tiny_model_dir))
    prompts = [f"What is {a}+{b}?" for a, b in ((1, 2), (3, 4), (5, 6), (7, 1), (2, 2), (9, 9))]

    def has_digit(prompts, completions, answer=None, **_):  # "right": the completion holds this digit
        return [float(str(a) in c) for c, a in zip(completions, answer or [None] * len(completions))]

    answers = [1, 2, 3, 4, 5, 6]
    gold = has_digit
    verifiers = {"oracle": lambda p, c: gold(p, c, answer=[answers[prompts.index(x)] for x in p]),
                 "constant": lambda p, c: [0.5] * len(c),
                 "contrarian": lambda p, c: [-x for x in gold(p, c, answer=[answers[prompts.index(q)] for q in p])]}
    rows = compare_search(policy, tiny_tokenizer, prompts, answers, gold, verifiers, ns=(2, 8), max_new_tokens=6,
                          final_answer=lambda c: c.strip()[:1] or None, seed=0)
    em = {(r["method"], r["n"]): r["exact_match"] for r in rows}
    assert all(r["prompts"] == len(prompts) for r in rows)
    for n in (2, 8):
        assert em[("oracle", n)] == em[("gold", n)]
        assert em[("constant", n)] == em[("first", 1)]
        assert em[("contrarian", n)] <= em[("first", 1)]
    assert em[("gold", 8)] >= em[("gold", 2)] > em[("first", 1)]  # the samples differ: search has room
    assert ("majority", 8) in em and ("beam", 2) not in em
    table = format_rows(rows)
    assert table.splitlines()[0].split() == ["method", "N=1", "N=2", "N=8"] and "oracle" in table


def test_report_renders_a_stage_table(tmp_path):
    from alignkit.evaluate.report import render_report

    stages = {"sft": {"seconds": 3.0, "heldout_loss": 0.25},
              "search": {"seconds": 9.0, "table": {"title": "Search <by verifier>", "headers": ["method", "N=4"],
                                                   "rows": [["prm", "0.500"], ["orm", "0.250"]]}}}
    page = render_report(tmp_path, "t", None, {}, stages).read_text()
    assert "<h2>Search &lt;by verifier&gt;</h2>" in page
    assert "<tr><th>method</th><th>N=4</th></tr><tr><td>prm</td><td>0.500</td></tr><tr><td>orm</td><td>0.250</td>" in page
    assert "heldout_loss=0.25" in page and "table=" not in page  # the table is its own section, not a summary cell
