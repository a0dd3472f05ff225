"""Regime W rewards for RL: correctness + coherence - length.

Two granularities:

* :func:`question_reward` - one scalar per question (all arms share it), for
  summaries and batch-level credit.
* :func:`arm_rewards` - one scalar per arm, for group-relative RL (GRPO/PPO
  style): each arm is paid for its own correctness, its own length, and a
  coherence term that mixes its agreement with the other arms and the
  question's ``s_wm``.

The functions are plain callables (open-r1 style); no registry is needed.
"""

from __future__ import annotations

from collections.abc import Sequence

from looper.regime_w.scoring import arm_agreement

__all__ = [
    "CORRECT",
    "INCORRECT",
    "COHERENCE_WEIGHT",
    "LENGTH_PENALTY",
    "LENGTH_FREE_TOKENS",
    "length_penalty",
    "question_reward",
    "arm_coherence",
    "arm_rewards",
]

#: Reward for a correct final answer (for a question: at least one arm correct).
CORRECT = 1.0
#: Reward for a wrong or missing final answer.
INCORRECT = -0.5
#: Weight of the coherence term (``s_wm`` or the per-arm blend, both in [0, 1]).
COHERENCE_WEIGHT = 0.7
#: Penalty per token beyond ``LENGTH_FREE_TOKENS``.
LENGTH_PENALTY = 0.001
#: Tokens that are free of length penalty.
LENGTH_FREE_TOKENS = 400


def length_penalty(tokens: float) -> float:
    """``LENGTH_PENALTY * max(0, tokens - LENGTH_FREE_TOKENS)`` (a non-negative amount to subtract)."""
    return LENGTH_PENALTY * max(0.0, tokens - LENGTH_FREE_TOKENS)


def question_reward(correct: Sequence[bool], tokens: Sequence[int], s_wm: float) -> float:
    """Question-level reward.

    ``(CORRECT if any arm is correct else INCORRECT) + COHERENCE_WEIGHT * s_wm
    - LENGTH_PENALTY * max(0, mean(tokens) - LENGTH_FREE_TOKENS)``.
    No arms count as incorrect with no length penalty.
    """
    if len(correct) != len(tokens):
        raise ValueError(f"correct and tokens differ in length: {len(correct)} != {len(tokens)}")
    base = CORRECT if any(correct) else INCORRECT
    mean_tokens = sum(tokens) / len(tokens) if tokens else 0.0
    return base + COHERENCE_WEIGHT * s_wm - length_penalty(mean_tokens)


def arm_coherence(agreement: float, s_wm: float, blend: float = 0.5) -> float:
    """Per-arm coherence term ``blend * agreement + (1 - blend) * s_wm``.

    Why the blend: ``s_wm`` is the same for every arm of a question, so in
    group-relative advantages (reward minus the group mean) it cancels and only
    matters for batch-centred rewards, where it favours coherent questions as a
    whole. ``agreement`` (the arm's agreement with the other arms) differs
    between arms, so it is what rewards an arm for landing on the consensus.
    """
    if not 0.0 <= blend <= 1.0:
        raise ValueError(f"blend must be in [0, 1], got {blend}")
    return blend * agreement + (1.0 - blend) * s_wm


def arm_rewards(
    correct: Sequence[bool],
    tokens: Sequence[int],
    answers: Sequence[str | None],
    s_wm: float,
    blend: float = 0.5,
) -> list[float]:
    """Per-arm rewards.

    For arm ``i``: ``(CORRECT if correct[i] else INCORRECT)
    + COHERENCE_WEIGHT * arm_coherence(arm_agreement(answers, i), s_wm, blend)
    - LENGTH_PENALTY * max(0, tokens[i] - LENGTH_FREE_TOKENS)``.
    """
    if not len(correct) == len(tokens) == len(answers):
        raise ValueError(
            f"correct, tokens and answers differ in length: {len(correct)}, {len(tokens)}, {len(answers)}"
        )
    rewards = []
    for i, (ok, n_tok) in enumerate(zip(correct, tokens)):
        base = CORRECT if ok else INCORRECT
        coh = arm_coherence(arm_agreement(answers, i), s_wm, blend)
        rewards.append(base + COHERENCE_WEIGHT * coh - length_penalty(n_tok))
    return rewards
