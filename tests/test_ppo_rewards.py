"""`looper ppo --reward`: which reward components each replayed arm carries (no training here)."""

from __future__ import annotations

from looper.rewards import registry
from looper.rewards.trainer_adapter import reward_plan, row_components
from looper.train.grpo import replay_func


def row() -> dict:
    arms = [
        {"prompt": "Q", "text": f"#### {a}", "answer": a, "token_ids": [5, 6], "logprobs": [-0.1, -0.2],
         "correct": a == "7", "tokens": t}
        for a, t in (("7", 2), ("9", 500), ("7", 2))
    ]  # fmt: skip
    return {"id": "q1", "gold_answer": "7", "arm_outputs": arms, "s_end": 1 / 3, "s_path": 0.5, "s_cf": 1.0,
            "s_wm": 0.58}  # fmt: skip


def replayed(mode: str, tiny_model_dir, weights: str | None = None) -> tuple[list[str], dict]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    plan = reward_plan(None, weights, mode, {})
    components = row_components([row()], plan, {}, mode)
    out = replay_func([row()], tokenizer, 3, components)(["q1"] * 3, None)
    return plan.names, {k[7:]: v for k, v in out.items() if k.startswith("reward_")}


def test_reward_modes(tiny_model_dir):
    names, arm = replayed("arm", tiny_model_dir)
    assert names == ["correctness", "coherence", "length"]  # the reference recipe's nonzero weights
    assert arm["correctness"] == [1.0, -0.5, 1.0] and arm["length"] == [0.0, -0.1, 0.0]
    total = registry.combine(arm, registry.REFERENCE_WEIGHTS)
    assert total == registry.row_rewards(row(), registry.resolve(None, None))["arm_rewards"]
    _, question = replayed("question", tiny_model_dir)  # shared by the arms
    assert question["correctness"] == [1.0] * 3 and question["coherence"] == [0.58] * 3
    names, right_wrong = replayed("correctness", tiny_model_dir)  # right / wrong only
    assert names == ["correctness"] and right_wrong["correctness"] == [1.0, 0.0, 1.0]
    names, _ = replayed("arm", tiny_model_dir, "format=0.5,length=0")
    assert names == ["correctness", "format", "coherence"]
