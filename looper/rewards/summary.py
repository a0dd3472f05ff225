"""The rollouts row schema and the summary a user reads before spending GPU time on RL.

The summary answers: how often is each arm right, how often is any arm right (pass@N),
how often is the majority right (maj@N), and does coherence predict correctness?
`auroc_s_end` / `auroc_s_wm` are the areas under the ROC curve of each score as a
predictor of "the majority answer is correct": 0.5 means the signal is noise, which is
worth knowing before optimising it.
"""

from __future__ import annotations

from statistics import fmean

import pyarrow as pa

from looper.answers import answers_agree
from looper.regime_w.bandit import arm_reward_stats
from looper.rewards.registry import NAMES as REWARD_NAMES
from looper.stats import auroc, majority_vote

ARM_OUTPUT = pa.struct(
    [
        ("arm", pa.string()),
        ("style", pa.string()),
        ("temperature", pa.float64()),
        ("prompt", pa.string()),
        ("text", pa.string()),
        ("reasoning", pa.string()),
        ("answer", pa.string()),
        ("correct", pa.bool_()),
        ("tokens", pa.int64()),
        ("finish_reason", pa.string()),
        ("token_ids", pa.list_(pa.int64())),
        (
            "logprobs",
            pa.list_(pa.float64()),
        ),  # log-prob of each token at the arm's temperature (schema 4): the behaviour policy
    ]
)
CF_OUTPUT = pa.struct(
    [
        ("arm", pa.string()),
        ("perturbation", pa.string()),
        ("question", pa.string()),
        ("text", pa.string()),
        ("answer", pa.string()),
        ("tokens", pa.int64()),
    ]
)
# every reward of `looper.rewards.registry` unweighted (schema 3): `looper ppo` and `rollouts rescore` recombine them
COMPONENTS = pa.struct([(name, pa.float64()) for name in REWARD_NAMES])
ROW_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("question", pa.string()),
        ("gold_answer", pa.string()),
        ("policy", pa.string()),
        ("arm_outputs", pa.list_(ARM_OUTPUT)),
        ("cf_outputs", pa.list_(CF_OUTPUT)),
        ("s_end", pa.float64()),
        ("s_path", pa.float64()),
        ("s_cf", pa.float64()),
        ("s_wm", pa.float64()),
        ("reward", pa.float64()),
        ("arm_rewards", pa.list_(pa.float64())),
        ("arm_components", pa.list_(COMPONENTS)),
        ("question_components", COMPONENTS),
    ]
)


def summarize(rows: list[dict], arm_names: list[str]) -> dict:
    if not rows:
        return {}
    majority_correct = [
        answers_agree(majority_vote([o["answer"] for o in r["arm_outputs"]]), r["gold_answer"]) for r in rows
    ]
    outputs = [o for r in rows for o in r["arm_outputs"]]
    return {
        "arm_accuracy": {  # arms a bandit allocation never sampled are left out
            name: fmean(o["correct"] for o in outputs if o["arm"] == name)
            for name in arm_names
            if any(o["arm"] == name for o in outputs)
        },
        "arm_reward_stats": arm_reward_stats(rows),
        "pass_at_n": fmean(any(o["correct"] for o in r["arm_outputs"]) for r in rows),
        "maj_at_n": fmean(majority_correct),
        **{f"mean_{k}": fmean(r[k] for r in rows) for k in ("s_end", "s_path", "s_cf", "s_wm", "reward")},
        "mean_arm_reward": fmean(x for r in rows for x in r["arm_rewards"]),
        "mean_tokens": fmean(o["tokens"] for o in outputs),
        "truncated_rate": fmean(o["finish_reason"] == "length" for o in outputs),
        "zero_variance_groups": sum(len(set(r["arm_rewards"])) <= 1 for r in rows),
        "auroc_s_end": auroc([r["s_end"] for r in rows], majority_correct),
        "auroc_s_wm": auroc([r["s_wm"] for r in rows], majority_correct),
    }
