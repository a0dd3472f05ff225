"""`looper ppo --reward`: which reward each replayed arm carries (no training here)."""

from __future__ import annotations

from looper.stages.ppo import replay_func


def row() -> dict:
    arms = [
        {"prompt": "Q", "token_ids": [5, 6], "logprobs": [-0.1, -0.2], "correct": c}
        for c in (True, False, True)
    ]
    return {"id": "q1", "arm_outputs": arms, "arm_rewards": [1.6, -0.1, 1.2], "reward": 1.4}


def rewards(mode: str, tiny_model_dir) -> list[float]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return replay_func([row()], tokenizer, mode, 3)(["q1"] * 3, None)["stored_reward"]


def test_reward_modes(tiny_model_dir):
    assert rewards("arm", tiny_model_dir) == [1.6, -0.1, 1.2]  # Regime W, per arm
    assert rewards("question", tiny_model_dir) == [1.4, 1.4, 1.4]  # shared by the arms
    assert rewards("correctness", tiny_model_dir) == [1.0, 0.0, 1.0]  # right / wrong only
