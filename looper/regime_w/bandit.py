"""The arms as a multi-armed bandit: how a round's samples per question are shared among the arms.

    looper rollouts --arm-allocation thompson --arm-prior <previous round's rollouts> --arm-budget 8
    looper --config pipelines/rl-cpu.toml loop --rounds 3     # with [rollouts] arm_allocation = "thompson"

`uniform` (the default) gives each arm budget / arms samples of every question, as always.
`thompson` and `ucb` learn from the per-arm rewards of the previous round's rollouts (their
manifest's `arm_reward_stats`: count, mean and std of each arm's rewards):

* thompson: each arm's mean reward has a normal posterior N(mean, std^2 / n) (std floored at
  0.1, no data: no information), and an arm's share is its posterior probability of being the
  best arm (Monte Carlo, seeded);
* ucb: the budget is handed out in 100 units, each to the arm with the highest upper bound
  mean + std * sqrt(2 ln N / n), each unit counting as that many pulls of it.

Every arm keeps at least `--arm-floor` of the budget (so it keeps being tried); an arm's share
is floor + (1 - arms * floor) * its learned share. Shares become whole samples per question by
largest remainders, the left-over samples drawn by a seeded draw per question (so shards and
resumed runs assign what one run would). The shares, the posterior and the samples per arm are
recorded in the rollouts manifest (`allocation`).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from statistics import fmean, pstdev

from looper.errors import LooperError

STRATEGIES = ("uniform", "thompson", "ucb")
STD_FLOOR = 0.1
UNITS = 100


def arm_reward_stats(rows: Sequence[Mapping]) -> dict[str, dict]:
    """{arm: {"n", "mean", "std"}} of the arm rewards of rollouts rows (what the next round learns from)."""
    rewards: dict[str, list[float]] = {}
    for row in rows:
        for output, value in zip(row["arm_outputs"], row["arm_rewards"]):
            rewards.setdefault(output["arm"], []).append(value)
    return {arm: {"n": len(v), "mean": fmean(v), "std": pstdev(v)} for arm, v in rewards.items()}


@dataclass
class Allocation:
    strategy: str
    shares: dict[str, float]  # fraction of each question's budget, summing to 1
    budget: int
    posterior: dict[str, dict] = field(default_factory=dict)

    def arms_for(self, key: str, seed: int) -> list[str]:
        """The arm of each of the question's `budget` samples (in the arms' order)."""
        quotas = {arm: share * self.budget for arm, share in self.shares.items()}
        counts = {arm: math.floor(q + 1e-9) for arm, q in quotas.items()}
        # the rest: `left` distinct arms drawn with weights = their remainders (which sum to `left`,
        # each < 1, so enough arms have one), seeded per question
        left = self.budget - sum(counts.values())
        rng = random.Random(int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:12], 16))
        remainders = {arm: quotas[arm] - counts[arm] for arm in quotas if quotas[arm] - counts[arm] > 1e-9}
        for _ in range(left):
            pool = list(remainders) or list(quotas)
            arm = rng.choices(pool, weights=[remainders.get(a, 1.0) for a in pool])[0]
            counts[arm] += 1
            remainders.pop(arm, None)
        return [arm for arm in self.shares for _ in range(counts[arm])]

    def as_dict(self) -> dict:
        expected = {arm: share * self.budget for arm, share in self.shares.items()}
        return {
            "strategy": self.strategy,
            "budget": self.budget,
            "shares": self.shares,
            "samples_per_question": expected,
            "posterior": self.posterior,
        }


def allocate(
    strategy: str,
    arms: Sequence[str],
    budget: int,
    floor: float,
    stats: Mapping[str, Mapping] | None,
    seed: int = 0,
) -> Allocation:
    """Shares of the budget per arm, learned from `stats` (the previous round's `arm_reward_stats`)."""
    if strategy not in STRATEGIES:
        raise LooperError(f"--arm-allocation {strategy}: choose {', '.join(STRATEGIES)}")
    if len(arms) * floor > 1:
        raise LooperError(
            f"--arm-floor {floor}: {len(arms)} arms x floor exceeds the whole budget (use <= {1 / len(arms):.3g})"
        )
    stats = {arm: stats[arm] for arm in arms if stats and arm in stats and stats[arm]["n"] > 0}
    if strategy == "uniform" or not stats:
        return Allocation(strategy, {arm: 1 / len(arms) for arm in arms}, budget, {})
    if strategy == "thompson":
        learned, posterior = thompson_shares(arms, stats, seed)
    else:
        learned, posterior = ucb_shares(arms, stats)
    shares = {arm: floor + (1 - len(arms) * floor) * learned[arm] for arm in arms}
    return Allocation(strategy, shares, budget, posterior)


def thompson_shares(arms, stats, seed: int, draws: int = 4000) -> tuple[dict, dict]:
    """P(arm is best) under normal posteriors of the mean reward; arms without data: N(overall mean, wide)."""
    overall = fmean(s["mean"] for s in stats.values())
    posterior = {}
    for arm in arms:
        s = stats.get(arm)
        mean, sd = (s["mean"], max(s["std"], STD_FLOOR) / math.sqrt(s["n"])) if s else (overall, 1.0)
        posterior[arm] = {"mean": mean, "sd": sd, "n": s["n"] if s else 0}
    rng = random.Random(seed)
    wins = dict.fromkeys(arms, 0)
    for _ in range(draws):
        sample = {arm: rng.gauss(p["mean"], p["sd"]) for arm, p in posterior.items()}
        wins[max(sample, key=sample.get)] += 1
    for arm in arms:
        posterior[arm]["p_best"] = wins[arm] / draws
    return {arm: wins[arm] / draws for arm in arms}, posterior


def ucb_shares(arms, stats) -> tuple[dict, dict]:
    """UNITS units of budget, each to the arm with the highest upper confidence bound so far."""
    total = sum(s["n"] for s in stats.values())
    per_unit = total / UNITS
    pulls = {arm: float(stats[arm]["n"]) if arm in stats else 0.0 for arm in arms}
    units = dict.fromkeys(arms, 0)
    spread = max(fmean(max(s["std"], STD_FLOOR) for s in stats.values()), STD_FLOOR)
    overall = fmean(s["mean"] for s in stats.values())

    def bound(arm: str, n_all: float) -> float:
        if pulls[arm] == 0:
            return math.inf
        mean = stats[arm]["mean"] if arm in stats else overall
        return mean + spread * math.sqrt(2 * math.log(max(n_all, 2)) / pulls[arm])

    for u in range(UNITS):
        n_all = total + u * per_unit
        best = max(arms, key=lambda arm: bound(arm, n_all))
        units[best] += 1
        pulls[best] += per_unit
    posterior = {
        arm: {"mean": stats[arm]["mean"] if arm in stats else None, "n": stats[arm]["n"] if arm in stats else 0,
              "ucb": bound(arm, total)}
        for arm in arms
    }  # fmt: skip
    return {arm: units[arm] / UNITS for arm in arms}, posterior


def report_lines(rounds: Sequence[Mapping]) -> list[str]:
    """Markdown for the loop report: each round's learned allocation (samples per question per arm)
    and the posterior it came from; nothing when every round was uniform."""
    learned = [
        r
        for r in rounds
        if (r["figures"].get("arm_allocation") or {}).get("strategy", "uniform") != "uniform"
    ]
    if not learned:
        return []
    lines = [
        "## Arm allocation",
        "",
        "| round | strategy | samples per question (posterior) |",
        "|---|---|---|",
    ]
    for r in learned:
        alloc = r["figures"]["arm_allocation"]
        cells = []
        for arm, samples in alloc["samples_per_question"].items():
            p = alloc["posterior"].get(arm, {})
            about = (
                f"p_best {p['p_best']:.2f}"
                if "p_best" in p
                else f"ucb {p['ucb']:.3g}"
                if "ucb" in p
                else "no data"
            )
            cells.append(f"{arm} {samples:.2f} ({about})")
        lines.append(f"| {r['round']} | {alloc['strategy']} | {', '.join(cells)} |")
    return [*lines, ""]
