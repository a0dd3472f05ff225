"""Regime W coherence scores: pure functions of one question's rows.

For each question several *arms* (independent samples) are generated. From
their extracted answers and token counts we compute:

* ``s_end``  - endpoint agreement: do the arms land on the same answer?
* ``s_path`` - path regularity: do the arms use similar amounts of reasoning?
* ``s_cf``   - counterfactual robustness: does each arm keep its answer on a
  perturbed copy of the question (one whose answer should not change)?
* ``s_wm``   - the weighted mix of the three (default 0.4 / 0.3 / 0.3).

All scores lie in [0, 1] and higher means more coherent. Answers are compared
with :func:`looper.answers.answers_agree`; an arm with no answer (``None``)
agrees with nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from looper.answers import answers_agree
from looper.config import S_WM_WEIGHTS

__all__ = [
    "RegimeWWeights",
    "DEFAULT_WEIGHTS",
    "s_end",
    "s_path",
    "s_cf",
    "s_wm",
    "arm_agreement",
    "score_question",
]


@dataclass(frozen=True)
class RegimeWWeights:
    """Weights of the three component scores in ``s_wm`` (used as given, not renormalised)."""

    end: float = S_WM_WEIGHTS[0]
    path: float = S_WM_WEIGHTS[1]
    cf: float = S_WM_WEIGHTS[2]


DEFAULT_WEIGHTS = RegimeWWeights()


def _agree(a: str | None, b: str | None) -> bool:
    """Agreement where a missing answer never agrees (not even with another missing one)."""
    if a is None or b is None:
        return False
    return bool(answers_agree(a, b))


def s_end(answers: Sequence[str | None]) -> float:
    """Fraction of unordered arm pairs whose answers agree.

    Edge cases: zero arms -> 0.0; one arm (no pairs) -> 1.0 if it has an answer,
    else 0.0 (a lone answer is trivially consistent with itself, no answer is not).
    """
    n = len(answers)
    if n == 0:
        return 0.0
    if n == 1:
        return 1.0 if answers[0] is not None else 0.0
    agree = sum(1 for i in range(n) for j in range(i + 1, n) if _agree(answers[i], answers[j]))
    return agree / (n * (n - 1) // 2)


def s_path(tokens: Sequence[int]) -> float:
    """``1 / (1 + CV)`` of the arms' token counts, CV = population std / mean.

    Equal lengths give 1.0 and spread-out lengths approach 0. Edge cases: empty
    -> 1.0 (no evidence of irregularity); all zero -> CV taken as 0 -> 1.0.
    Negative counts raise ``ValueError``.
    """
    if not tokens:
        return 1.0
    if any(t < 0 for t in tokens):
        raise ValueError(f"token counts must be non-negative, got {list(tokens)}")
    n = len(tokens)
    mean = sum(tokens) / n
    if mean == 0:
        return 1.0
    var = sum((t - mean) ** 2 for t in tokens) / n
    cv = math.sqrt(var) / mean
    return 1.0 / (1.0 + cv)


def s_cf(original_answers: Sequence[str | None], perturbed_answers: Sequence[str | None]) -> float:
    """Counterfactual robustness: fraction of arms whose perturbed answer agrees with their original one.

    The lists are paired by position (the same arm on the original and on the
    perturbed question). ``None`` on either side counts as not robust. Empty -> 0.0.
    Lengths that differ raise ``ValueError``.
    """
    if len(original_answers) != len(perturbed_answers):
        raise ValueError(
            f"original and perturbed answers differ in length: {len(original_answers)} != {len(perturbed_answers)}"
        )
    if not original_answers:
        return 0.0
    robust = sum(1 for o, p in zip(original_answers, perturbed_answers) if _agree(o, p))
    return robust / len(original_answers)


def _as_weights(weights: RegimeWWeights | Sequence[float]) -> RegimeWWeights:
    if isinstance(weights, RegimeWWeights):
        return weights
    end, path, cf = weights
    return RegimeWWeights(end=float(end), path=float(path), cf=float(cf))


def s_wm(
    s_end: float,
    s_path: float,
    s_cf: float,
    weights: RegimeWWeights | Sequence[float] = DEFAULT_WEIGHTS,
) -> float:
    """Weighted coherence ``w.end*s_end + w.path*s_path + w.cf*s_cf``.

    ``weights`` is a :class:`RegimeWWeights` or an ``(end, path, cf)`` triple.
    """
    w = _as_weights(weights)
    return w.end * s_end + w.path * s_path + w.cf * s_cf


def arm_agreement(answers: Sequence[str | None], i: int) -> float:
    """Fraction of the *other* arms whose answer agrees with arm ``i``'s.

    0.0 if arm ``i`` has no answer. With a single arm (no others) -> 1.0 if it
    has an answer, matching :func:`s_end`'s one-arm rule.
    """
    n = len(answers)
    if not -n <= i < n:
        raise IndexError(f"arm index {i} out of range for {n} arms")
    i %= n
    mine = answers[i]
    if mine is None:
        return 0.0
    if n == 1:
        return 1.0
    agree = sum(1 for j in range(n) if j != i and _agree(mine, answers[j]))
    return agree / (n - 1)


def score_question(
    answers: Sequence[str | None],
    tokens: Sequence[int],
    cf_original: Sequence[str | None],
    cf_perturbed: Sequence[str | None],
    weights: RegimeWWeights | Sequence[float] = DEFAULT_WEIGHTS,
) -> dict:
    """All Regime W scores of one question: ``{"s_end", "s_path", "s_cf", "s_wm"}``."""
    e = s_end(answers)
    p = s_path(tokens)
    c = s_cf(cf_original, cf_perturbed)
    return {"s_end": e, "s_path": p, "s_cf": c, "s_wm": s_wm(e, p, c, weights)}
