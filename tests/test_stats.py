"""Hand-computed checks for looper.stats."""

from __future__ import annotations

import math

import pytest

from looper.stats import auroc, majority_vote, mcnemar_exact, paired_bootstrap_diff, wilson_interval

# ---------------------------------------------------------------- wilson_interval


def test_wilson_zero_successes():
    low, high = wilson_interval(0, 10)
    assert low == 0.0
    assert high == pytest.approx(0.2775, abs=1e-4)


def test_wilson_all_successes():
    low, high = wilson_interval(10, 10)
    assert high == 1.0
    assert low == pytest.approx(1 - 0.2775, abs=1e-4)


def test_wilson_half():
    low, high = wilson_interval(5, 10)
    assert low == pytest.approx(0.2366, abs=1e-4)
    assert high == pytest.approx(0.7634, abs=1e-4)
    assert low + high == pytest.approx(1.0)


def test_wilson_empty():
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_wilson_contains_point_estimate():
    for k in range(0, 21):
        low, high = wilson_interval(k, 20)
        assert 0.0 <= low <= k / 20 <= high <= 1.0


@pytest.mark.parametrize("k,n", [(-1, 10), (11, 10), (0, -1)])
def test_wilson_rejects_bad_counts(k, n):
    with pytest.raises(ValueError):
        wilson_interval(k, n)


# ---------------------------------------------------------------- mcnemar_exact


def test_mcnemar_hand_computed():
    # 8 questions A wrong / B right, 2 A right / B wrong, 5 both right, 3 both wrong.
    a = [False] * 8 + [True] * 2 + [True] * 5 + [False] * 3
    b = [True] * 8 + [False] * 2 + [True] * 5 + [False] * 3
    r = mcnemar_exact(a, b)
    assert r["b01"] == 8 and r["b10"] == 2
    # 2 * P(X <= 2 | n=10, p=.5) = 2 * (1 + 10 + 45) / 1024
    assert r["p_value"] == pytest.approx(2 * 56 / 1024)
    assert r["p_value"] == pytest.approx(0.109375)


def test_mcnemar_symmetric():
    a = [False] * 8 + [True] * 2
    b = [True] * 8 + [False] * 2
    assert mcnemar_exact(a, b)["p_value"] == mcnemar_exact(b, a)["p_value"]


def test_mcnemar_no_discordant():
    r = mcnemar_exact([True, False, True], [True, False, True])
    assert r == {"b01": 0, "b10": 0, "p_value": 1.0}
    assert mcnemar_exact([], [])["p_value"] == 1.0


def test_mcnemar_small_cases():
    # one discordant pair: 2 * 0.5 = 1.0 (capped)
    assert mcnemar_exact([False], [True])["p_value"] == 1.0
    # 5 vs 0: 2 * 1/32
    assert mcnemar_exact([False] * 5, [True] * 5)["p_value"] == pytest.approx(0.0625)
    # balanced 3 vs 3: 2 * P(X<=3 | 6) = 2 * 42/64 > 1 -> 1.0
    assert mcnemar_exact([False] * 3 + [True] * 3, [True] * 3 + [False] * 3)["p_value"] == 1.0


def test_mcnemar_large_n_is_finite():
    n = 1319  # GSM8K test size: exact integer arithmetic must not overflow
    a = [i % 3 == 0 for i in range(n)]
    b = [i % 2 == 0 for i in range(n)]
    p = mcnemar_exact(a, b)["p_value"]
    assert 0.0 <= p <= 1.0 and math.isfinite(p)


def test_mcnemar_length_mismatch():
    with pytest.raises(ValueError):
        mcnemar_exact([True], [True, False])


# ---------------------------------------------------------------- paired_bootstrap_diff


A = [True, False, True, False, True, False, False, True, False, False] * 5
B = [True, True, True, False, True, True, False, True, True, False] * 5


def test_bootstrap_diff_and_interval():
    r = paired_bootstrap_diff(A, B, n_resamples=2000, seed=1)
    assert r["diff"] == pytest.approx(0.3)  # 0.7 - 0.4
    assert r["low"] <= r["diff"] <= r["high"]
    assert -1.0 <= r["low"] < r["high"] <= 1.0
    # B only ever improves on A here, so the whole interval is >= 0.
    assert r["low"] >= 0.0


def test_bootstrap_deterministic():
    r1 = paired_bootstrap_diff(A, B, n_resamples=1000, seed=7)
    r2 = paired_bootstrap_diff(A, B, n_resamples=1000, seed=7)
    assert r1 == r2


def test_bootstrap_identical_lists():
    r = paired_bootstrap_diff(A, A, n_resamples=500, seed=3)
    assert r == {"diff": 0.0, "low": 0.0, "high": 0.0}


def test_bootstrap_sign():
    r = paired_bootstrap_diff(B, A, n_resamples=500, seed=0)
    assert r["diff"] == pytest.approx(-0.3)
    assert r["high"] <= 0.0


def test_bootstrap_wider_at_higher_confidence():
    r90 = paired_bootstrap_diff(A, B, n_resamples=2000, seed=0, confidence=0.90)
    r99 = paired_bootstrap_diff(A, B, n_resamples=2000, seed=0, confidence=0.99)
    assert r99["low"] <= r90["low"] and r99["high"] >= r90["high"]


def test_bootstrap_empty_and_errors():
    assert paired_bootstrap_diff([], []) == {"diff": 0.0, "low": 0.0, "high": 0.0}
    with pytest.raises(ValueError):
        paired_bootstrap_diff([True], [True, False])
    with pytest.raises(ValueError):
        paired_bootstrap_diff(A, B, confidence=1.0)


# ---------------------------------------------------------------- auroc


def test_auroc_perfect_and_inverted():
    assert auroc([0.1, 0.2, 0.8, 0.9], [False, False, True, True]) == 1.0
    assert auroc([0.9, 0.8, 0.2, 0.1], [False, False, True, True]) == 0.0


def test_auroc_all_tied():
    assert auroc([0.5, 0.5, 0.5, 0.5], [True, False, True, False]) == 0.5


def test_auroc_hand_computed():
    # positives 0.35, 0.8 vs negatives 0.1, 0.4: wins 0.35>0.1, 0.8>0.1, 0.8>0.4 -> 3/4
    assert auroc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == pytest.approx(0.75)
    # positive 0.5 ties negative 0.5 (0.5) and loses to 0.9 -> 0.5/2
    assert auroc([0.5, 0.5, 0.9], [True, False, False]) == pytest.approx(0.25)


def test_auroc_undefined():
    assert auroc([0.1, 0.2], [True, True]) is None
    assert auroc([0.1, 0.2], [False, False]) is None
    assert auroc([], []) is None


def test_auroc_matches_pairwise_definition():
    scores = [0.3, 0.1, 0.7, 0.7, 0.2, 0.9, 0.3, 0.5]
    labels = [True, False, True, False, False, True, True, False]
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    pairwise = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg) / (len(pos) * len(neg))
    assert auroc(scores, labels) == pytest.approx(pairwise)


# ---------------------------------------------------------------- majority_vote


def test_majority_vote():
    assert majority_vote(["3", "4", "4", None, None, None]) == "4"
    assert majority_vote(["7"]) == "7"


def test_majority_vote_tie_goes_to_first():
    assert majority_vote(["5", "6", "6", "5"]) == "5"
    assert majority_vote([None, "6", "5"]) == "6"


def test_majority_vote_none():
    assert majority_vote([]) is None
    assert majority_vote([None, None]) is None


def test_paired_mean_test_hand_computed():
    from looper.stats import paired_mean_test

    # differences (0.5, 0.5, 0.5, 0.5, -0.5): mean 0.3; of the 32 sign patterns |mean| >= 0.3 for the
    # 12 with at most one or at least four +: p = 12/32 = 0.375
    result = paired_mean_test([0.0, 0.0, 0.5, 0.25, 1.0], [0.5, 0.5, 1.0, 0.75, 0.5], n_resamples=20000)
    assert result["diff"] == pytest.approx(0.3)
    assert result["p_value"] == pytest.approx(0.375, abs=0.02)
    assert result["low"] <= 0.3 <= result["high"]
    assert paired_mean_test([0.5, 1.0], [0.5, 1.0]) == {"diff": 0.0, "low": 0.0, "high": 0.0, "p_value": 1.0}
