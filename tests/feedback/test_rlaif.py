"""RLAIF end to end on the sentiment task: a reward model trained on an AI judge's labels
against one trained on as many simulated human labels."""

import hashlib
import json
import random

import pytest

from alignkit.feedback import rlaif
from alignkit.feedback.judges import load_judge
from alignkit.tasks import annotators, sentiment

NOISE = 0.3
STEPS = int(__import__("os").environ.get("RLAIF_STEPS", "400"))


def noisy_gold(prompts, responses, **_):
    """The gold reward plus N(0, 0.3) noise fixed by each response's text: a judge that errs
    where the gold gap is small, as the simulated annotators do."""
    return [g + random.Random(hashlib.sha256(r.encode()).digest()).gauss(0.0, NOISE)
            for g, r in zip(sentiment.gold_reward(prompts, responses), responses)]


def _candidates(n: int, seed: int, held_out: bool) -> list[dict]:
    """n pairs of review openings (8 words) that carry some sentiment (|VADER| > 0.3), after one
    fixed prompt: what separates them is what the gold reward scores."""
    rng = random.Random(seed)
    texts = {" " + " ".join(s["text"].split()[:8]) for s in sentiment.snippets() if (s["id"] % 10 == 0) == held_out}
    texts = sorted(t for t in texts if abs(sentiment.vader(t)) > 0.3)
    return [{"prompt": "Review:", "responses": rng.sample(texts, 2)} for _ in range(n)]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def sentiment_model(tmp_path_factory):
    """A tiny Llama with a tokenizer trained on the review corpus (untrained weights)."""
    from alignkit.models.tiny import build_tiny_llama, save_tiny, train_tokenizer

    # a vocabulary of whole words: the reward model can learn sentiment words, as VADER scores them
    tokenizer = train_tokenizer([r["text"] for r in sentiment.corpus()], vocab_size=2048)
    return save_tiny(build_tiny_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=4), tokenizer,
                     tmp_path_factory.mktemp("sentiment") / "model")


def test_a_reward_model_on_ai_labels_matches_one_on_simulated_human_labels(sentiment_model, tmp_path, one_thread):
    """600 pairs labelled by a judge made from the gold reward (plus noise) and by the simulated
    annotators (Bradley-Terry draws, T = 0.25); the same reward-model recipe on each; held-out
    accuracy on 300 pairs ordered by the gold reward itself: within 5 points of each other."""
    from alignkit.train import reward

    rows = _candidates(2000, seed=0, held_out=False)
    candidates = _write(tmp_path / "candidates.jsonl", rows)
    summary = rlaif.run(rlaif.LabelAIConfig(judge="tests.feedback.test_rlaif:noisy_gold", data=str(candidates),
                                            output=str(tmp_path / "ai.jsonl"), format="dpo",
                                            gold="alignkit.tasks.sentiment:gold_reward"))
    prompts = [r["prompt"] for r in rows]
    texts = [t for r in rows for t in r["responses"]]
    gold = sentiment.gold_reward(None, texts)
    human, counts = annotators.preference_pairs(prompts, texts, gold, temperature=0.25, seed=0)
    _write(tmp_path / "human.jsonl", human)
    heldout = _candidates(300, seed=1, held_out=True)
    exact, _ = annotators.preference_pairs([r["prompt"] for r in heldout], [t for r in heldout for t in r["responses"]],
                                           sentiment.gold_reward(None, [t for r in heldout for t in r["responses"]]),
                                           temperature=0.0)
    _write(tmp_path / "heldout.jsonl", exact)

    def accuracy(labels: str) -> float:
        result = reward.run(reward.RewardConfig(model=str(sentiment_model), data=str(tmp_path / labels),
                                                eval_data=str(tmp_path / "heldout.jsonl"),
                                                output_dir=str(tmp_path / labels.replace(".jsonl", "")),
                                                max_steps=STEPS, batch_size=16, lr=3e-3, max_length=32, log_steps=50))
        return result.eval_metrics["accuracy"]

    ai, people = accuracy("ai.jsonl"), accuracy("human.jsonl")
    print(f"AI labels: {summary['pairs']} pairs, {summary['ties']} ties, gold agreement {summary['gold_agreement']:.3f};"
          f" simulated people: {counts['pairs']} pairs, {counts['against_gold']} against gold;"
          f" reward-model held-out accuracy {ai:.3f} (AI) vs {people:.3f} (people)")
    assert summary["pairs"] >= 1900 and 0.7 < summary["gold_agreement"] < 1.0  # a judge that errs, not the gold
    assert ai > 0.6 and abs(ai - people) <= 0.05


def test_label_ai_writes_every_format_the_trainers_read(tmp_path):
    """dpo pairs, K-way rankings and thumbs from one candidates file, with the judge recorded; a
    comparator that always picks the first position gives only ties (nothing written)."""
    from alignkit.data import load_records

    rows = [{"prompt": "p", "responses": [" aaaa", " a", " aaa"]}, {"prompt": "q", "responses": [" b", " bbbbb"]}]
    data = _write(tmp_path / "c.jsonl", rows)
    judge = "tests.feedback.test_judges:longer"

    def label(fmt, **kw):
        out = tmp_path / f"{fmt}{len(kw)}.jsonl"
        summary = rlaif.run(rlaif.LabelAIConfig(judge=kw.pop("judge", judge), data=str(data), output=str(out),
                                                format=fmt, **kw))
        return summary, out

    summary, out = label("dpo")
    pairs = load_records(str(out), "preference")
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [(" aaaa", " a"), (" bbbbb", " b")]
    assert all(json.loads(line)["judge"] == judge for line in out.read_text().splitlines())
    summary, out = label("ranking")
    assert [r["responses"] for r in load_records(str(out), "ranking")][0] == [" aaaa", " aaa", " a"]
    summary, out = label("kto")
    labels = {r["completion"]: r["label"] for r in load_records(str(out), "unpaired")}
    assert labels[" aaaa"] and labels[" bbbbb"] and not labels[" a"] and summary["threshold"] == 4.0
    summary, out = label("dpo", judge="compare:tests.feedback.test_judges:always_a")
    assert summary["pairs"] == 0 and summary["ties"] == 2 and summary["flip_rate"] == 1.0
    assert load_judge(judge).name == judge


def test_empty_sampled_responses_are_skipped_and_counted():
    """A sampled completion can be empty; no trainer takes one: it is dropped, and a row left
    with fewer responses than a comparison needs goes with it."""
    rows = [{"prompt": "p", "responses": [" a", " ", " b"]}, {"prompt": "q", "responses": ["", " c"]}]
    kept, dropped = rlaif.drop_empty(rows, least=2)
    assert kept == [{"prompt": "p", "responses": [" a", " b"]}] and dropped == 3
    assert rlaif.drop_empty(rows, least=1)[1] == 2
