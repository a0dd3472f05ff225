"""The reward registry inside TRL's GRPOTrainer (used by ppo, offline and --online).

Each reward with a nonzero (or scheduled) weight becomes one TRL reward function under its
registry name, with its weight in TRL's `reward_weights`, so TRL logs `rewards/<name>/mean`
and `/std` per step. Offline, the functions read the components stored with the rollouts
(or recomputed from the stored rows when ppo's reward parameters differ from the rollouts');
online they are the registry functions themselves, scoring each step's fresh groups.
`looper.train.grpo.ScheduledWeights` moves TRL's weights along the `[rewards] schedule` before each step.
"""

from __future__ import annotations

import dataclasses

from looper.config import RewardsConfig
from looper.regime_w.scoring import DEFAULT_WEIGHTS
from looper.rewards import registry as rewards
from looper.rewards import schedules


@dataclasses.dataclass
class RewardPlan:
    """What ppo optimises: the spec (weights, parameters), the schedule and the post-processors."""

    spec: rewards.RewardSpec
    schedule: dict
    post: str
    settings: RewardsConfig

    @property
    def names(self) -> list[str]:
        """The rewards TRL computes: nonzero weight, or scheduled."""
        return [n for n in rewards.NAMES if self.spec.weights.get(n) or n in self.schedule]

    def identity(self) -> dict:
        s = self.settings
        post = (
            {"post": s.post, "clip": [s.clip_min, s.clip_max], "decay": s.normalize_decay} if s.post else {}
        )
        return {"rewards": self.spec.as_dict(), "schedule": s.schedule or {}, **post}

    def weights_at(self, progress: float) -> list[float]:
        at = schedules.weights_at(self.spec.weights, self.schedule, progress)
        return [at[n] for n in self.names]

    def post_processors(self) -> list:
        s = self.settings
        return schedules.post_processors(s.post, s.clip_min, s.clip_max, s.normalize_decay)


def reward_plan(table: dict | None, weights: str | None, mode: str, scoring: dict) -> RewardPlan:
    """ppo's rewards: [rewards] table < --weights; `--reward correctness` is correctness alone, 1/0;
    the s_wm weights are those the rollouts were scored with (`scoring`: their config)."""
    settings = rewards.settings(table)
    defaults = DEFAULT_WEIGHTS
    triple = tuple(
        float(scoring.get(k, d))
        for k, d in zip(("w_end", "w_path", "w_cf"), (defaults.end, defaults.path, defaults.cf))
    )
    spec = rewards.resolve(table, weights, triple)
    if mode == "correctness":
        spec = rewards.RewardSpec(
            {"correctness": 1.0}, dataclasses.replace(spec.params, correct_value=1.0, wrong_value=0.0)
        )
    schedule = schedules.parse_schedule(settings.schedule, rewards.NAMES) if mode != "correctness" else {}
    plan = RewardPlan(spec, schedule, settings.post, settings)
    plan.post_processors()  # checks the names and the clip range before anything runs
    if not plan.names:
        from looper.errors import LooperError

        raise LooperError("[rewards]/--weights: every reward has weight 0: nothing to optimise")
    return plan


def row_components(rows: list[dict], plan: RewardPlan, manifest: dict, mode: str) -> dict[str, list[dict]]:
    """{question id: per arm {name: value}}: the stored components where the rollouts were scored
    with ppo's parameters (schema 3), else recomputed from the stored rows (no generation)."""
    stored = manifest.get("rewards", {}).get("params") == dataclasses.asdict(plan.spec.params)
    out = {}
    for row in rows:
        scored = row if stored and row.get("arm_components") else rewards.row_rewards(row, plan.spec)
        per_arm = (
            [scored["question_components"]] * len(row["arm_outputs"])
            if mode == "question"
            else scored["arm_components"]
        )
        out[row["id"]] = [{n: c[n] for n in plan.names} for c in per_arm]
    return out


def stored_reward_funcs(names: list[str]) -> list:
    """TRL reward functions returning the replayed component column `reward_<name>`."""

    def make(name: str):
        def fn(completions, **columns) -> list[float]:
            return list(columns[f"reward_{name}"])

        fn.__name__ = name  # TRL logs rewards/<__name__>/mean
        return fn

    return [make(n) for n in names]


def online_reward_funcs(plan: RewardPlan, eos_ids=()) -> list:
    """The registry functions for TRL's online groups: lengths without the EOS that ended a completion."""
    funcs = []
    for name, fn in rewards.build(plan.spec.params, plan.names).items():

        def scored(completions, completion_ids, _fn=fn, **columns) -> list[float]:
            tokens = [len(ids) - bool(ids and ids[-1] in eos_ids) for ids in completion_ids]
            return _fn(completions, tokens=tokens, completion_ids=completion_ids, **columns)

        scored.__name__ = name
        funcs.append(scored)
    return funcs


def ppo_identity(config, plan: RewardPlan) -> dict:
    """ppo's config identity with the rewards resolved (weights, parameters, schedule, post-processors)."""
    from looper.config import identity

    return {k: v for k, v in identity(config).items() if k not in ("rewards", "weights")} | plan.identity()


def plot_weights(job, plan: RewardPlan, steps: int) -> None:
    """reward_weights.png in the artifact: each optimised reward's weight over the run's steps."""
    schedules.plot_weights(job.run.path / "reward_weights.png", plan.spec.weights, plan.schedule, steps)
