"""A scripted critic, reviser and feedback model for the sentiment task's Constitutional AI run.

The built-in models are tiny Llamas that continue movie reviews; they cannot read a
principle or write a critique. These functions stand in for the model that would, so that
`alignkit cai` runs its whole loop on a laptop. They read words the way VADER's lexicon
does (the lexicon behind the task's gold reward), which a capable model reading "be
warm, not hostile" would roughly do too; they are a simulation, not AI feedback. Pointed
at a real model (`writer: openai-chat:MODEL@URL`), the same config runs the real loop.

    writer: alignkit.tasks.sentiment_feedback:scripted_writer
    judge:  alignkit.tasks.sentiment_feedback:lexicon_score

scripted_writer answers the conversation `cai` builds, as a model would: after a response
(or a revision) and a critique request it critiques, listing the response's negative
words and negations in double quotes, and asking for a warm sentence when the response
has no positive word; after a critique and a revision request it revises, replacing
each word the critique quoted (a negative word by a positive one, a negation by nothing)
and adding the sentence asked for. It tells the two turns apart by the number of assistant messages
so far (odd: the last one is an answer to critique; even: a critique to act on), and
ignores which principle was asked.
"""

from __future__ import annotations

import re
import zlib

POSITIVE = ("good", "fine", "great", "lovely", "fun", "charming", "sweet", "warm")
WARM = ("A good film.", "It is great fun.", "A lovely film.", "Well worth seeing.", "A charming film.")
WORD = re.compile(r"[A-Za-z][A-Za-z']*")


def _lexicon() -> dict[str, float]:
    from alignkit.tasks.sentiment import _analyzer

    return _analyzer().lexicon


def _negations() -> set[str]:
    from vaderSentiment.vaderSentiment import NEGATE

    return set(NEGATE)


def flagged_words(text: str) -> list[str]:
    """The words of `text` a kind reader objects to: negative in VADER's lexicon, or negations
    (which turn a positive word negative), each once, in order of appearance."""
    lexicon, negations = _lexicon(), _negations()
    out = []
    for word in WORD.findall(text):
        w = word.lower()
        if (lexicon.get(w, 0.0) < 0 or w in negations or w.endswith("n't")) and word not in out:
            out.append(word)
    return out


def critique(answer: str) -> str:
    """Names the negative words and negations of `answer` in double quotes; when it has no
    positive word either, asks to add a warm sentence (quoted after `add`)."""
    lexicon = _lexicon()
    words = flagged_words(answer)
    parts = []
    if words:
        parts.append("The response is negative where it says " + ", ".join(f'"{w}"' for w in words) + ".")
    if not any(lexicon.get(w.lower(), 0.0) > 0 for w in WORD.findall(answer)):
        parts.append(f'It says nothing warm about the film; add "{WARM[zlib.crc32(answer.encode()) % len(WARM)]}"')
    return " ".join(parts) or "The response has no negative words or negations; it follows the principle."


def revise(answer: str, critique_text: str) -> str:
    """`answer` with each word quoted in the critique replaced (a negation removed, any other
    word by a positive one, the same one for the same word), and the sentence after `add`
    appended."""
    added = re.search(r'add "([^"]+)"', critique_text)
    quoted = set(re.findall(r'"([^"]+)"', critique_text)) - ({added.group(1)} if added else set())
    negations = _negations()

    def replace(m: re.Match) -> str:
        word = m.group(0)
        if word not in quoted:
            return word
        if word.lower() in negations or word.lower().endswith("n't"):
            return ""
        return POSITIVE[zlib.crc32(word.lower().encode()) % len(POSITIVE)]

    revised = re.sub(r" {2,}", " ", WORD.sub(replace, answer))
    return revised.rstrip() + " " + added.group(1) if added else revised


def scripted_writer(conversations: list[list[dict]]) -> list[str]:
    """The next assistant message of each `cai` conversation: a critique or a revision."""
    out = []
    for messages in conversations:
        assistant_turns = sum(m["role"] == "assistant" for m in messages)
        if assistant_turns % 2:  # [..., answer, critique request]
            out.append(critique(messages[-2]["content"]))
        else:  # [..., answer, critique request, critique, revision request]
            out.append(revise(messages[-4]["content"], messages[-2]["content"]))
    return out


def lexicon_score(prompts: list, responses: list[str], **_) -> list[float]:
    """A scripted feedback model: the sum of the lexicon valences of a response's words, a
    negation counting -1. Cruder than VADER (no boosters, no negation scope, no normalisation)."""
    lexicon, negations = _lexicon(), _negations()
    scores = []
    for text in responses:
        words = [w.lower() for w in WORD.findall(text)]
        scores.append(sum(-1.0 if (w in negations or w.endswith("n't")) else lexicon.get(w, 0.0) for w in words))
    return scores
