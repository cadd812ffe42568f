import math
import random

import pytest

from alignkit.tasks import annotators, sentiment


def test_snippets_load_with_ratings_and_split_is_disjoint():
    rows = sentiment.snippets()
    assert len(rows) == 10605
    assert all(15 <= len(r["ratings"]) <= 29 and -4 <= r["mean"] <= 4 for r in rows)
    train, held = sentiment.corpus(), sentiment.corpus(held_out=True)
    assert len(held) == sum(r["id"] % 10 == 0 for r in rows)
    assert not {r["text"] for r in train} & {r["text"] for r in held} - {""}


def test_prompts_and_demonstrations():
    ps = sentiment.prompts(50, seed=3, held_out=True)
    assert len(ps) == 50 and ps == sentiment.prompts(50, seed=3, held_out=True)
    assert all(2 <= len(p["prompt"].split()) <= 5 for p in ps)
    demos = sentiment.sft_data(200, seed=1)
    assert all(d["completion"].startswith(" ") and len(d["completion"].split()) <= 24 for d in demos)
    # Demonstrations come from positive reviews: their endings score clearly positive on average.
    gold = sentiment.gold_reward([d["prompt"] for d in demos], [d["completion"] for d in demos])
    assert sum(gold) / len(gold) > 0.25
    with pytest.raises(ValueError, match="asked for"):
        sentiment.prompts(10**6)


def test_gold_reward_is_vader_of_completion_only():
    assert sentiment.gold_reward(["a terrible"], [" wonderful, great film"])[0] > 0.5
    assert sentiment.gold_reward(["a great"], [" awful and boring mess"])[0] < -0.5
    assert sentiment.gold_reward(["x"], [" the"])[0] == 0.0


def test_bradley_terry_annotator_agrees_at_the_stated_rate():
    rng = random.Random(0)
    # gap 0.2 at T = 0.1: P(first preferred) = sigmoid(2) = 0.8808
    n = 20000
    hits = sum(annotators.prefers_first(0.6, 0.4, 0.1, rng) for _ in range(n))
    p = 1 / (1 + math.exp(-2))
    assert abs(hits / n - p) < 4 * math.sqrt(p * (1 - p) / n)
    assert annotators.prefers_first(0.1, 0.2, 0.0, rng) is False


def test_preference_pairs_skip_ties_and_count_disagreements():
    prompts = ["p1", "p2", "p3"]
    completions = ["a", "b", "c", "d", "e", "f"]
    gold = [0.9, 0.1, 0.5, 0.5, -0.2, 0.3]
    records, counts = annotators.preference_pairs(prompts, completions, gold, temperature=0.0)
    assert records == [{"prompt": "p1", "chosen": "a", "rejected": "b"}, {"prompt": "p3", "chosen": "f", "rejected": "e"}]
    assert counts == {"pairs": 2, "ties_skipped": 1, "empty_skipped": 0, "against_gold": 0}
    _, counts = annotators.preference_pairs(["p"], ["a", ""], [0.5, 0.0])
    assert counts["empty_skipped"] == 1 and counts["pairs"] == 0
    with pytest.raises(ValueError, match="same number of completions"):
        annotators.preference_pairs(prompts, completions[:5], gold[:5])


def test_rankings_and_thumbs():
    ranked = annotators.rankings(["p"], ["a", "b", "c", "d"], [0.1, 0.9, -0.5, 0.3], temperature=0.0)
    assert ranked == [{"prompt": "p", "responses": ["b", "d", "a", "c"]}]
    # Plackett-Luce first place: P(b first) = e^9 / (e^1 + e^9 + e^-5 + e^3) at T = 0.1
    rng_seeds = range(4000)
    firsts = sum(annotators.rankings(["p"], ["a", "b", "c", "d"], [0.1, 0.9, -0.5, 0.3], 0.1, seed=s)[0]["responses"][0] == "b"
                 for s in rng_seeds)
    p = math.exp(9) / (math.exp(1) + math.exp(9) + math.exp(-5) + math.exp(3))
    assert abs(firsts / 4000 - p) < 4 * math.sqrt(p * (1 - p) / 4000)
    records, threshold = annotators.thumbs(["p", "q"], ["a", "b", "c", "d"], [0.1, 0.9, -0.5, 0.3], temperature=0.0)
    assert threshold == pytest.approx(0.2)
    assert [r["label"] for r in records] == [False, True, False, True]
