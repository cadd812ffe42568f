"""Sentiment: continue a movie-review snippet; the gold reward is VADER's sentiment of it.

The DPO paper's controlled-sentiment experiment in miniature. The data are 10,605 real
movie-review snippets rated by people (tasks/data/README.md: source, licence, citation):

    corpus      every training snippet, both polarities          -> the base model
    sft_data    the opening words of a POSITIVE snippet (mean      -> the SFT model
                human rating >= 1.5 on -4..4) and its real ending
    prompts     the opening words of any snippet (held-out split   -> policies continue them
                for evaluation)

    gold(prompt, completion) = VADER compound score of the completion, in [-1, 1]

No trained model ever sees the gold reward: reward models learn it from simulated
annotators (tasks/annotators.py), as they would from people. One snippet in ten, by
id, is held out of everything the models train on.
"""

from __future__ import annotations

import functools
import gzip
import json
import random
from pathlib import Path

DATA = Path(__file__).parent / "data" / "movie_snippets.jsonl.gz"
HELD_OUT_EVERY = 10  # snippet ids divisible by this are held out


@functools.cache
def snippets() -> tuple[dict, ...]:
    """All snippets: {"id", "text", "mean", "ratings"} (ratings: one per person, -4..4)."""
    with gzip.open(DATA, "rt", encoding="utf-8") as f:
        return tuple(json.loads(line) for line in f)


def _split(held_out: bool) -> list[dict]:
    return [s for s in snippets() if (s["id"] % HELD_OUT_EVERY == 0) == held_out]


def corpus(held_out: bool = False) -> list[dict]:
    """Pretraining text records, reviews of both polarities (held_out: the evaluation split)."""
    return [{"text": s["text"]} for s in _split(held_out)]


def _cut(text: str, rng: random.Random, min_words: int, max_words: int) -> tuple[str, str] | None:
    words = text.split()
    if len(words) < min_words + 3:  # leave a continuation of at least three words
        return None
    k = rng.randint(min_words, min(max_words, len(words) - 3))
    return " ".join(words[:k]), " " + " ".join(words[k:])


def prompts(n: int, seed: int = 0, held_out: bool = False, min_words: int = 2, max_words: int = 5) -> list[dict]:
    """`n` prompt records {"prompt"}: the first 2-5 words of distinct snippets, drawn with `seed`."""
    rng = random.Random(seed)
    pool = _split(held_out)
    rng.shuffle(pool)
    out = []
    for s in pool:
        cut = _cut(s["text"], rng, min_words, max_words)
        if cut:
            out.append({"prompt": cut[0]})
        if len(out) == n:
            return out
    raise ValueError(f"sentiment: asked for {n} prompts, the {'held-out' if held_out else 'training'} split has {len(out)}")


def sft_data(n: int, seed: int = 1, min_rating: float = 1.5, max_words: int = 24) -> list[dict]:
    """Demonstrations {"prompt", "completion"}: positive snippets (mean rating >= min_rating) cut
    after 2-5 words, the completion being the rest of the real snippet (at most max_words words)."""
    rng = random.Random(seed)
    pool = [s for s in _split(False) if s["mean"] >= min_rating]
    rng.shuffle(pool)
    out = []
    for s in pool:
        cut = _cut(s["text"], rng, 2, 5)
        if cut:
            out.append({"prompt": cut[0], "completion": " " + " ".join(cut[1].split()[:max_words])})
        if len(out) == n:
            return out
    raise ValueError(f"sentiment: asked for {n} demonstrations, {len(out)} positive snippets qualify")


@functools.cache
def _analyzer():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def vader(text: str) -> float:
    """VADER compound sentiment of `text`, in [-1, 1] (0 for text with no sentiment words)."""
    return _analyzer().polarity_scores(text)["compound"]


def gold_reward(prompts: list, completions: list[str], **_) -> list[float]:
    """The task's gold reward, a reward function for `--reward alignkit.tasks.sentiment:gold_reward`:
    the VADER compound score of each completion alone (the prompt is not scored)."""
    return [vader(c) for c in completions]
