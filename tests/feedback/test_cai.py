"""Constitutional AI: the constitution file, the critique-revision conversation, principle-specific
AI labels, the scripted sentiment critic, and the real loop through an OpenAI-compatible endpoint.
The learning test (SFT on revisions raises the gold reward) is the demo's, tests/test_demo.py."""

import json
import random

import pytest

from alignkit.config import ConfigError
from alignkit.feedback import cai
from alignkit.feedback.judges import Judge
from alignkit.tasks import sentiment_feedback

SENTIMENT_PRINCIPLES = "alignkit/tasks/data/sentiment_principles.yaml"


def test_the_shipped_constitutions_load():
    default = cai.load_principles(cai.DEFAULT_PRINCIPLES)
    assert len(default) >= 4 and all(p.critique_request and p.revision_request and p.preference for p in default)
    assert [p.name for p in cai.load_principles(SENTIMENT_PRINCIPLES)] == ["warm", "encouraging", "generous"]


def test_a_principle_without_a_revision_request_is_named_with_its_file_and_line(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("principles:\n  - name: kind\n    critique_request: Be kind?\n    revision_request: Be kind.\n"
                    "    preference: Kinder?\n  - name: brief\n    critique_request: Too long?\n    preference: Shorter?\n")
    with pytest.raises(ConfigError, match=r"p\.yaml:6: principle 'brief': field 'revision_request' is missing"):
        cai.load_principles(str(path))
    path.write_text("rules: []\n")
    with pytest.raises(ConfigError, match="expected `principles:`"):
        cai.load_principles(str(path))


def test_the_scripted_critic_names_negative_words_and_the_reviser_replaces_them():
    answer = " isn't good, it is dull"
    critique = sentiment_feedback.critique(answer)
    assert critique == 'The response is negative where it says "isn\'t", "dull".'
    # a negation goes, a negative word becomes a positive one (fixed per word)
    assert sentiment_feedback.revise(answer, critique) == " good, it is lovely"
    neutral = " the film."
    critique = sentiment_feedback.critique(neutral)
    assert critique.startswith("It says nothing warm") and sentiment_feedback.revise(neutral, critique) == (
        " the film. " + critique.split('add "')[1].rstrip('"'))
    assert sentiment_feedback.lexicon_score([""] * 2, [" isn't good, dull", " great fun"]) == [
        pytest.approx(-1.0 + 1.9 - 1.7), pytest.approx(3.1 + 2.3)]  # negation -1; lexicon: good 1.9, dull -1.7, great 3.1, fun 2.3


class _Recorder:
    """A Python writer that records the conversations it is asked to continue."""

    def __init__(self):
        self.seen = []

    def write(self, conversations):
        self.seen.append([list(c) for c in conversations])
        return sentiment_feedback.scripted_writer(conversations)


def test_every_revision_records_its_principle_and_round_and_the_conversation_grows_as_documented():
    principles = cai.load_principles(SENTIMENT_PRINCIPLES)
    by_request = {p.critique_request: p for p in principles}
    rows = [{"prompt": "The film", "responses": [" is dull and bad", " the plot."]},
            {"prompt": "A cast", "responses": [" is great"]}]
    writer = _Recorder()
    out, counts = cai.critique_and_revise(writer, rows, principles, rounds=2, rng=random.Random(0))
    assert counts == {"responses": 3, "revised": 3, "changed": 2, "unchanged": 1, "empty_dropped": 0}
    assert len(writer.seen) == 4  # critique and revision, two rounds, one chunk each
    last = writer.seen[-1][0]  # round 2's revision request for the first response
    assert [m["role"] for m in last] == ["user", "assistant"] * 4 + ["user"]
    assert last[0]["content"] == "The film" and last[1]["content"] == " is dull and bad"
    for row in out:
        assert row["round"] == 2 and [h["round"] for h in row["revisions"]] == [1, 2]
        assert row["principle"] == row["revisions"][-1]["principle"]
        assert row["completion"] == row["revisions"][-1]["revision"]
    # the principle recorded is the one whose requests were asked
    first = writer.seen[0][0]
    assert by_request[first[-1]["content"]].name == out[0]["revisions"][0]["principle"]
    assert out[0]["original"] == " is dull and bad" and "dull" not in out[0]["completion"]


def test_an_empty_revision_drops_its_row_and_is_counted():
    class Silent:
        def write(self, conversations):
            return ["" if c[1]["content"] == " gone" else "fine" for c in conversations]

    rows = [{"prompt": "p", "responses": [" gone", " kept"]}]
    out, counts = cai.critique_and_revise(Silent(), rows, cai.load_principles(SENTIMENT_PRINCIPLES), 1, random.Random(0))
    assert [r["original"] for r in out] == [" kept"] and counts["empty_dropped"] == 1


class _TemplateJudge(Judge):
    """Reads pairs with a template, as an LM or endpoint judge does; prefers the response the
    principle's question names (a word of it), and records the questions it was asked."""

    reads_pairs = True

    def __init__(self):
        super().__init__("recording")
        self.templates = ("{prompt} {a} {b}", "")
        self.asked = []

    def identity(self):
        return json.dumps([self.name, *self.templates])

    def _compare_one_order(self, items):
        texts = [self.templates[0].format(prompt=p, a=a, b=b) for p, a, b in items]
        self.asked += texts
        return [0.9 if ("warmly" in t) == a.startswith(" warm") else 0.1 for t, (_, a, _) in zip(texts, items)]


def test_ai_labels_are_asked_with_the_drawn_principles_question():
    principles = cai.load_principles(SENTIMENT_PRINCIPLES)
    rows = [{"prompt": f"p{i}", "responses": [" warm one", " cold one"]} for i in range(30)]
    judge = _TemplateJudge()
    pairs, counts = cai.label_with_principles(judge, rows, principles, cai.PREFERENCE_TEMPLATE, 0.5, random.Random(0))
    assert counts["pairs"] == 30 and len(judge.asked) == 60  # both orders of each pair
    for pair in pairs:
        question = next(p.preference for p in principles if p.name == pair["principle"])
        asked = [t for t in judge.asked if t.startswith(f"Consider a conversation between a person and an assistant."
                                                        f"\n\nPerson: {pair['prompt']}\n\n{question}")]
        assert len(asked) == 2, pair
        # under "warm" the warm response wins; under the others the judge above prefers the other one
        assert (pair["chosen"] == " warm one") == (pair["principle"] == "warm")
    assert {p["principle"] for p in pairs} == {"warm", "encouraging", "generous"}
    assert judge.stats["flip_rate"] == 0.0


def test_the_real_loop_runs_through_an_openai_compatible_endpoint(served, tiny_model_dir, tmp_path):
    """The tiny checkpoint behind `transformers serve` critiques and revises (its text is noise,
    the loop is the one a real model runs): every request is a chat completion of the documented
    conversation, and the rows are the served model's revisions."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"What is {i}+1?"}) + "\n" for i in range(3)))
    summary = cai.run(cai.CAIConfig(model=str(tiny_model_dir), data=str(prompts), output_dir=str(tmp_path / "run"),
                                    writer=f"openai-chat:{tiny_model_dir}@{served}", stages=["revise"], rounds=1,
                                    max_new_tokens=4, writer_max_new_tokens=6, timeout=60))
    rows = [json.loads(line) for line in (tmp_path / "run" / "revise" / "revisions.jsonl").read_text().splitlines()]
    revise = summary["revise"]
    assert revise["responses"] == 3 and revise["revised"] + revise["empty_dropped"] == 3
    assert all(isinstance(r["completion"], str) and r["completion"].strip() for r in rows)
    assert not (tmp_path / "run" / "sl").exists()  # stages: revise only


def test_config_errors_come_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="unknown stage"):
        cai.CAIConfig(model="m", data="d", stages=["revize"]).validate()
    with pytest.raises(ConfigError, match=r"must contain \{principle\}"):
        cai.CAIConfig(model="m", data="d", preference_template="{prompt} {a} {b}").validate()
    with pytest.raises(ValueError, match=r"cai: override sl\.lrr: SFTConfig has no key 'lrr' \(did you mean 'lr'\?\)"):
        cai.run(cai.CAIConfig(model="m", data="d", output_dir=str(tmp_path), overrides=["sl.lrr=1"]))
