"""Hand-computed checks for looper.regime_w scoring and rewards.

Answers are plain integer strings ("42", "7", ...) so the expected agreement
does not depend on how looper.answers normalises formats.
"""

from __future__ import annotations

import pytest

from looper.regime_w import reward as R
from looper.regime_w.reward import arm_coherence, arm_rewards, question_reward
from looper.regime_w.scoring import (
    RegimeWWeights,
    arm_agreement,
    s_cf,
    s_end,
    s_path,
    s_wm,
    score_question,
)

# ---------------------------------------------------------------- s_end


def test_s_end_all_agree():
    assert s_end(["42", "42", "42"]) == 1.0


def test_s_end_all_differ():
    assert s_end(["1", "2", "3"]) == 0.0


def test_s_end_some_none():
    # pairs: (42,42) agree, (42,None) x2 do not -> 1/3
    assert s_end(["42", "42", None]) == pytest.approx(1 / 3)


def test_s_end_two_clusters():
    # 6 pairs, 2 agreeing
    assert s_end(["42", "42", "7", "7"]) == pytest.approx(2 / 6)


def test_s_end_all_none():
    assert s_end([None, None, None]) == 0.0


def test_s_end_empty_and_one_arm():
    assert s_end([]) == 0.0
    assert s_end(["42"]) == 1.0
    assert s_end([None]) == 0.0


# ---------------------------------------------------------------- s_path


def test_s_path_equal():
    assert s_path([100, 100]) == 1.0
    assert s_path([250]) == 1.0


def test_s_path_cv_half():
    # mean 200, population std 100 -> CV 0.5 -> 1/1.5
    assert s_path([100, 300]) == pytest.approx(2 / 3)


def test_s_path_zero_and_empty():
    assert s_path([0, 0]) == 1.0
    assert s_path([]) == 1.0


def test_s_path_decreases_with_spread():
    assert s_path([100, 110, 90]) > s_path([50, 200, 350]) > 0.0


def test_s_path_rejects_negative():
    with pytest.raises(ValueError):
        s_path([10, -1])


# ---------------------------------------------------------------- s_cf


def test_s_cf_all_robust():
    assert s_cf(["42", "7"], ["42", "7"]) == 1.0


def test_s_cf_mixed():
    # arm0 keeps 42 (robust), arm1 7->8 (not), arm2 None original (not)
    assert s_cf(["42", "7", None], ["42", "8", "7"]) == pytest.approx(1 / 3)


def test_s_cf_none_on_either_side():
    assert s_cf([None, "5"], [None, None]) == 0.0


def test_s_cf_pairs_by_position():
    # the same answers, but not held by the same arm
    assert s_cf(["1", "2"], ["2", "1"]) == 0.0


def test_s_cf_empty_and_mismatch():
    assert s_cf([], []) == 0.0
    with pytest.raises(ValueError):
        s_cf(["1"], ["1", "2"])


# ---------------------------------------------------------------- s_wm / score_question


def test_s_wm_default_weights():
    assert s_wm(1.0, 0.5, 0.0) == pytest.approx(0.4 * 1.0 + 0.3 * 0.5 + 0.3 * 0.0)
    assert s_wm(1.0, 1.0, 1.0) == pytest.approx(1.0)


def test_s_wm_custom_weights():
    assert s_wm(0.2, 0.6, 1.0, RegimeWWeights(end=1.0, path=0.0, cf=0.0)) == pytest.approx(0.2)
    assert s_wm(0.2, 0.6, 1.0, (0.5, 0.5, 0.0)) == pytest.approx(0.4)


def test_weights_frozen():
    w = RegimeWWeights()
    assert (w.end, w.path, w.cf) == (0.4, 0.3, 0.3)
    with pytest.raises(AttributeError):
        w.end = 1.0  # type: ignore[misc]


def test_score_question():
    d = score_question(["42", "42", None], [100, 300, 200], ["42", "7"], ["42", "8"])
    e, c = 1 / 3, 0.5
    # tokens: mean 200, population std sqrt(20000/3)
    p = 1 / (1 + (20000 / 3) ** 0.5 / 200)
    assert d["s_end"] == pytest.approx(e)
    assert d["s_path"] == pytest.approx(p)
    assert d["s_cf"] == pytest.approx(c)
    assert d["s_wm"] == pytest.approx(0.4 * e + 0.3 * p + 0.3 * c)
    assert set(d) == {"s_end", "s_path", "s_cf", "s_wm"}


# ---------------------------------------------------------------- arm_agreement


def test_arm_agreement():
    answers = ["42", "42", "7", None]
    assert arm_agreement(answers, 0) == pytest.approx(1 / 3)
    assert arm_agreement(answers, 1) == pytest.approx(1 / 3)
    assert arm_agreement(answers, 2) == 0.0
    assert arm_agreement(answers, 3) == 0.0  # no answer


def test_arm_agreement_one_arm_and_bad_index():
    assert arm_agreement(["42"], 0) == 1.0
    assert arm_agreement([None], 0) == 0.0
    with pytest.raises(IndexError):
        arm_agreement(["1", "2"], 2)


# ---------------------------------------------------------------- rewards


def test_constants():
    assert (R.CORRECT, R.INCORRECT, R.COHERENCE_WEIGHT, R.LENGTH_PENALTY, R.LENGTH_FREE_TOKENS) == (
        1.0,
        -0.5,
        0.7,
        0.001,
        400,
    )


def test_question_reward_with_length_penalty():
    # any correct -> 1.0; 0.7 * 0.5 = 0.35; mean tokens 500 -> -0.1
    assert question_reward([True, False], [300, 700], 0.5) == pytest.approx(1.25)


def test_question_reward_all_wrong_no_penalty():
    assert question_reward([False, False], [100, 200], 0.0) == pytest.approx(-0.5)
    assert question_reward([False], [400], 1.0) == pytest.approx(-0.5 + 0.7)


def test_question_reward_empty_and_mismatch():
    assert question_reward([], [], 0.0) == pytest.approx(-0.5)
    with pytest.raises(ValueError):
        question_reward([True], [1, 2], 0.0)


def test_arm_coherence():
    assert arm_coherence(1.0, 0.0) == pytest.approx(0.5)
    assert arm_coherence(0.2, 0.6, blend=1.0) == pytest.approx(0.2)
    assert arm_coherence(0.2, 0.6, blend=0.0) == pytest.approx(0.6)
    assert arm_coherence(0.5, 0.9, blend=0.25) == pytest.approx(0.125 + 0.675)
    with pytest.raises(ValueError):
        arm_coherence(0.5, 0.5, blend=1.5)


def test_arm_rewards_hand_computed():
    answers = ["42", "42", "7"]
    correct = [True, True, False]
    tokens = [300, 500, 400]
    r = arm_rewards(correct, tokens, answers, s_wm=0.6)
    # arm0: agreement 1/2 -> coh 0.25 + 0.3 = 0.55 -> 1 + 0.385
    # arm1: same coherence, 500 tokens -> -0.1
    # arm2: agreement 0 -> coh 0.3 -> -0.5 + 0.21
    assert r == pytest.approx([1.385, 1.285, -0.29])


def test_arm_rewards_s_wm_cancels_in_group_advantage():
    answers = ["42", "42", "7", None]
    correct = [True, True, False, False]
    tokens = [300, 450, 600, 100]

    def advantages(rs):
        m = sum(rs) / len(rs)
        return [x - m for x in rs]

    lo = arm_rewards(correct, tokens, answers, s_wm=0.1)
    hi = arm_rewards(correct, tokens, answers, s_wm=0.9)
    assert advantages(lo) == pytest.approx(advantages(hi))
    # every arm shifts by 0.7 * 0.5 * 0.8
    assert [h - low for h, low in zip(hi, lo)] == pytest.approx([0.28] * 4)


def test_arm_rewards_consensus_beats_outlier():
    # same correctness and length: the arm on the consensus earns more
    r = arm_rewards([False] * 3, [100] * 3, ["5", "5", "9"], s_wm=0.3)
    assert r[0] == r[1] > r[2]


def test_arm_rewards_mismatch():
    with pytest.raises(ValueError):
        arm_rewards([True], [100, 200], ["1", "2"], 0.5)
