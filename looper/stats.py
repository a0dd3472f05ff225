"""Small statistics helpers for the eval report and the rollouts summary.

Everything here is a pure function of plain Python sequences:

* :func:`wilson_interval` - confidence interval for one accuracy (k correct of n).
* :func:`mcnemar_exact` - paired test "do models A and B differ on the same questions?".
* :func:`paired_bootstrap_diff` - interval for the accuracy difference B - A on the same questions.
* :func:`auroc` - how well a score (e.g. a Regime W coherence score) separates right from wrong.
* :func:`majority_vote` - the self-consistency answer of several samples.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np

__all__ = [
    "Z_95",
    "wilson_interval",
    "mcnemar_exact",
    "paired_bootstrap_diff",
    "auroc",
    "majority_vote",
]

#: Two-sided 95% standard-normal quantile, Phi^-1(0.975).
Z_95 = 1.959963984540054


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default).

    Used for per-model accuracy in the eval report; unlike the normal
    approximation it behaves well at 0/n and n/n. ``n == 0`` gives the
    uninformative interval ``(0.0, 1.0)``. At ``0/n`` the lower bound is exactly
    0.0 and at ``n/n`` the upper bound is exactly 1.0.
    """
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2.0 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z2 / (4.0 * n * n)) / denom
    low = max(0.0, center - half)
    high = min(1.0, center + half)
    # The formula gives 0 / 1 analytically at the extremes; remove float noise.
    if successes == 0:
        low = 0.0
    if successes == n:
        high = 1.0
    return (low, high)


def _check_paired(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"paired sequences differ in length: {len(a)} != {len(b)}")


def mcnemar_exact(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> dict:
    """Exact (binomial) McNemar test for two models scored on the same questions.

    ``b01`` counts questions A got wrong and B got right, ``b10`` the reverse.
    Under H0 each discordant pair is a fair coin, so the two-sided p-value is
    ``min(1, 2 * P(X <= min(b01, b10)))`` with ``X ~ Binomial(b01 + b10, 0.5)``;
    with no discordant pairs ``p_value`` is 1.0.

    Returns ``{"b01": int, "b10": int, "p_value": float}``.
    """
    _check_paired(a_correct, b_correct)
    b01 = sum(1 for a, b in zip(a_correct, b_correct) if not a and b)
    b10 = sum(1 for a, b in zip(a_correct, b_correct) if a and not b)
    n = b01 + b10
    if n == 0:
        return {"b01": 0, "b10": 0, "p_value": 1.0}
    k = min(b01, b10)
    # Exact integer arithmetic; int / int true division is correctly rounded.
    tail = sum(math.comb(n, i) for i in range(k + 1))
    p = min(1.0, 2 * tail / 2**n)
    return {"b01": b01, "b10": b10, "p_value": p}


def paired_bootstrap_diff(
    a_correct: Sequence[bool],
    b_correct: Sequence[bool],
    *,
    n_resamples: int = 10000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict:
    """Paired bootstrap interval for the accuracy difference ``acc(B) - acc(A)``.

    Question indices are resampled with replacement (the same indices for both
    models, so the pairing is kept); the interval is the percentile interval of
    the resampled differences. Deterministic for a given ``seed``.
    Empty inputs give ``{"diff": 0.0, "low": 0.0, "high": 0.0}``.

    Returns ``{"diff": float, "low": float, "high": float}``.
    """
    _check_paired(a_correct, b_correct)
    if n_resamples < 1:
        raise ValueError("n_resamples must be >= 1")
    if not 0.0 < confidence < 1.0:
        raise ValueError("confidence must be in (0, 1)")
    n = len(a_correct)
    if n == 0:
        return {"diff": 0.0, "low": 0.0, "high": 0.0}
    d = np.array([int(bool(b)) - int(bool(a)) for a, b in zip(a_correct, b_correct)], dtype=np.int64)
    diff = int(d.sum()) / n
    if not d.any():
        return {"diff": 0.0, "low": 0.0, "high": 0.0}

    rng = np.random.default_rng(seed)
    sums = np.empty(n_resamples, dtype=np.int64)
    # Resample in chunks to bound memory (chunk * n indices at a time).
    chunk = max(1, min(n_resamples, 4_000_000 // n))
    for start in range(0, n_resamples, chunk):
        stop = min(n_resamples, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        sums[start:stop] = d[idx].sum(axis=1)
    means = sums / n
    alpha = 1.0 - confidence
    low, high = np.quantile(means, [alpha / 2.0, 1.0 - alpha / 2.0])
    return {"diff": diff, "low": float(low), "high": float(high)}


def paired_mean_test(
    a: Sequence[float], b: Sequence[float], *, n_resamples: int = 10000, seed: int = 0
) -> dict:
    """Paired comparison of per-question scores in [0, 1] (e.g. the fraction of k samples right):
    ``mean(b) - mean(a)`` with a paired-bootstrap 95% percentile interval and a two-sided
    sign-flip permutation p-value (each question's difference keeps or flips its sign under H0;
    p counts resampled |mean| >= the observed, plus one, over n_resamples + 1). Deterministic per seed.

    Returns ``{"diff": float, "low": float, "high": float, "p_value": float}``."""
    _check_paired(a, b)
    d = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    n = len(d)
    if n == 0 or not d.any():
        return {"diff": 0.0, "low": 0.0, "high": 0.0, "p_value": 1.0}
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_resamples, 4_000_000 // n))
    boot, flips = [], []
    for start in range(0, n_resamples, chunk):
        size = min(n_resamples, start + chunk) - start
        boot.append(d[rng.integers(0, n, size=(size, n))].mean(axis=1))
        flips.append((d * rng.choice((-1.0, 1.0), size=(size, n))).mean(axis=1))
    low, high = np.quantile(np.concatenate(boot), [0.025, 0.975])
    observed = abs(d.mean())
    extreme = int((np.abs(np.concatenate(flips)) >= observed - 1e-12).sum())
    return {
        "diff": float(d.mean()),
        "low": float(low),
        "high": float(high),
        "p_value": (extreme + 1) / (n_resamples + 1),
    }


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Area under the ROC curve of ``scores`` for predicting ``labels``.

    Computed as the Mann-Whitney statistic: the probability that a random
    positive scores higher than a random negative, ties counting 0.5. Used to
    ask whether a coherence score predicts correctness. Returns ``None`` when
    all labels are the same (or there are none): AUROC is undefined then.
    """
    _check_paired(scores, labels)
    n_pos = sum(1 for y in labels if y)
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    # Average ranks (1-based) with ties sharing the mean rank.
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        avg = (i + j) / 2.0 + 1.0
        for k in range(i, j + 1):
            ranks[order[k]] = avg
        i = j + 1
    rank_sum = sum(r for r, y in zip(ranks, labels) if y)
    u = rank_sum - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def majority_vote(answers: Sequence[str | None]) -> str | None:
    """Most common non-None answer (self-consistency); ties go to the answer seen first.

    Answers are compared as exact strings, so normalise them first. Returns
    ``None`` when there is no non-None answer.
    """
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    # Counter keeps first-insertion order and max() returns the first maximum.
    return max(counts.items(), key=lambda kv: kv[1])[0]
