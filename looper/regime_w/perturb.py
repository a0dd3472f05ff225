"""Answer-preserving perturbations of a question, for the counterfactual score s_cf.

Two rewrites that must not change the answer of a GSM8K-style problem:
- `irrelevant`: insert a sentence about something else just before the question sentence;
- `question_first`: move the question sentence to the front, keeping the facts in order
  (reordering the facts themselves can change a story's meaning, so we do not).
Both are deterministic given the question id, so reruns and resumes ask the same thing.
"""

from __future__ import annotations

import random
import re

IRRELEVANT = (
    "The weather was sunny that day.",
    "Their neighbour has a grey cat named Pepper.",
    "The library down the street opens at nine.",
    "A blue car was parked across the road.",
    "Someone was humming a song in the next room.",
    "The park nearby has twelve old oak trees.",
)
PERTURBATIONS = ("irrelevant", "question_first")
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def split_question(question: str) -> tuple[list[str], str]:
    """(fact sentences, final question sentence)."""
    sentences = _SENTENCE.split(question.strip())
    return sentences[:-1], sentences[-1]


def perturb(question: str, kind: str, *, key: str) -> str:
    facts, ask = split_question(question)
    if kind == "irrelevant":
        # key is a question id: the same question always gets the same distractor
        distractor = random.Random(key).choice(IRRELEVANT)
        return " ".join([*facts, distractor, ask])
    if kind == "question_first":
        return " ".join([ask, *facts]) if facts else question
    raise ValueError(f"unknown perturbation {kind!r}; choose one of {PERTURBATIONS}")
