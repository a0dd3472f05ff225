"""`looper regime-w demo` (or `python -m looper.regime_w.demo`): score hand-written arm sets
and print every score (no model needed).

Each case is four arms' completions for "Tom has 3 apples and buys 4 more; how many?"
(gold 7), chosen so that one score moves at a time.
"""

from __future__ import annotations

from looper.answers import extract_answer, is_correct
from looper.regime_w import reward, scoring

GOLD = "7"
CASES = {
    "all agree, right": (["3 + 4 = 7\n#### 7"] * 4, [40, 40, 40, 40], ["7", "7"]),
    "all agree, wrong": (["3 + 4 = 8\n#### 8"] * 4, [40, 40, 40, 40], ["8", "8"]),
    "split 2-2": (["#### 7", "#### 7", "#### 12", "#### 12"], [40, 40, 40, 40], ["7", "12"]),
    "uneven lengths": (["#### 7"] * 4, [10, 40, 80, 400], ["7", "7"]),
    "one has no answer": (["#### 7", "#### 7", "#### 7", "I am not sure."], [40, 40, 40, 40], ["7", "7"]),
    "fragile under perturbation": (["#### 7"] * 4, [40, 40, 40, 40], ["9", None]),
    "long and rambling": (["#### 7"] * 4, [900, 900, 900, 900], ["7", "7"]),
}


def main() -> None:
    header = f"{'case':<28} {'s_end':>6} {'s_path':>6} {'s_cf':>6} {'s_wm':>6} {'reward':>7}  arm rewards"
    print(header)
    print("-" * len(header))
    for name, (texts, tokens, perturbed) in CASES.items():
        answers = [extract_answer(t) for t in texts]
        correct = [is_correct(t, GOLD) for t in texts]
        # the s_cf re-asks are arms 0 and 1; their original answers are answers[0:2]
        scores = scoring.score_question(answers, tokens, answers[:2], perturbed)
        question = reward.question_reward(correct, tokens, scores["s_wm"])
        arms = reward.arm_rewards(correct, tokens, answers, scores["s_wm"])
        print(
            f"{name:<28} {scores['s_end']:6.3f} {scores['s_path']:6.3f} {scores['s_cf']:6.3f} "
            f"{scores['s_wm']:6.3f} {question:7.3f}  " + " ".join(f"{r:.3f}" for r in arms)
        )


if __name__ == "__main__":  # `python -m looper.regime_w.demo`, the reference recipe's first step
    main()
