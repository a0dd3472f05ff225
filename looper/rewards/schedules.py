"""Reward weights over training progress, and post-processors of the total reward (used by ppo).

A schedule (the `[rewards] schedule` key of a pipeline file) gives some rewards a weight that
changes with training progress p = step / total steps, as points joined by a shape:

    [rewards.schedule]
    format = [{at = 0.0, weight = 1.0}, {at = 0.3, weight = 0.0, shape = "cosine"}]
    correctness = [{at = 0.0, weight = 0.2}, {at = 0.6, weight = 1.0, shape = "linear"}]

Before the first point a weight is the first point's, after the last the last's; between two
points `shape` (of the later point) is `linear`, `cosine` (half a cosine: flat at both ends)
or `constant` (the earlier weight until the later point). Rewards without a schedule keep
their `[rewards]` weight. The same shapes drive ppo --online's sampling temperature.

Post-processors act on the total reward of each step's batch, in the order `post` names:
`clip` (to [clip_min, clip_max]) and `normalize` (subtract a running mean and divide by a
running std, both exponential moving averages over batches with `normalize_decay`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from looper.errors import LooperError

SHAPES = ("linear", "cosine", "constant")
POST_PROCESSORS = ("clip", "normalize")


@dataclass(frozen=True)
class Point:
    at: float
    weight: float
    shape: str = "linear"


def parse_schedule(table: Mapping | None, names) -> dict[str, list[Point]]:
    """{reward: points} from the `[rewards] schedule` table, checked: known names, 0 <= at <= 1 increasing."""
    schedule = {}
    for name, points in (table or {}).items():
        where = f"[rewards] schedule.{name}"
        if name not in names:
            raise LooperError(f"{where}: no reward of that name (known: {', '.join(names)})")
        if not isinstance(points, list) or not points:
            raise LooperError(f"{where}: write a list of points, e.g. [{{at = 0.0, weight = 1.0}}]")
        parsed = []
        for point in points:
            if (
                not isinstance(point, dict)
                or set(point) - {"at", "weight", "shape"}
                or not {"at", "weight"} <= set(point)
            ):
                raise LooperError(
                    f"{where}: each point is {{at = p, weight = w, shape = 'linear'}}; got {point!r}"
                )
            shape = point.get("shape", "linear")
            if shape not in SHAPES:
                raise LooperError(f"{where}: shape {shape!r} is not one of {', '.join(SHAPES)}")
            parsed.append(Point(float(point["at"]), float(point["weight"]), shape))
        ats = [p.at for p in parsed]
        if ats != sorted(ats) or len(set(ats)) != len(ats) or not 0 <= ats[0] <= ats[-1] <= 1:
            raise LooperError(f"{where}: `at` must increase within [0, 1]; got {ats}")
        schedule[name] = parsed
    return schedule


def value_at(points: list[Point], progress: float) -> float:
    """The scheduled value at training progress `progress` (0..1)."""
    if progress <= points[0].at:
        return points[0].weight
    for before, after in zip(points, points[1:]):
        if progress < after.at:
            t = (progress - before.at) / (after.at - before.at)
            if after.shape == "constant":
                return before.weight
            if after.shape == "cosine":
                t = (1 - math.cos(math.pi * t)) / 2
            return before.weight + (after.weight - before.weight) * t
    return points[-1].weight


def weights_at(weights: Mapping[str, float], schedule: Mapping[str, list[Point]], progress: float) -> dict:
    """Every reward's weight at `progress`: its schedule's value, else its constant weight."""
    return {
        name: value_at(schedule[name], progress) if name in schedule else w for name, w in weights.items()
    }


class RunningNorm:
    """(x - mean) / std with mean and variance as EMAs over batches (the first batch sets them)."""

    def __init__(self, decay: float):
        self.decay, self.mean, self.var = decay, None, None

    def __call__(self, values):
        import torch

        batch_mean, batch_var = values.mean().item(), values.var(unbiased=False).item()
        if self.mean is None:
            self.mean, self.var = batch_mean, batch_var
        else:
            self.mean = self.decay * self.mean + (1 - self.decay) * batch_mean
            self.var = self.decay * self.var + (1 - self.decay) * batch_var
        return (values - self.mean) / torch.tensor(max(self.var, 1e-8)).sqrt()


def post_processors(names: str, clip_min: float, clip_max: float, decay: float) -> list:
    """The post-processors `names` lists (comma-separated), in that order, as callables on a tensor."""
    chain = []
    for name in [n.strip() for n in names.split(",") if n.strip()]:
        if name == "clip":
            if clip_min >= clip_max:
                raise LooperError(f"[rewards] clip_min {clip_min} must be below clip_max {clip_max}")
            chain.append(lambda x: x.clamp(clip_min, clip_max))
        elif name == "normalize":
            chain.append(RunningNorm(decay))
        else:
            raise LooperError(f"[rewards] post: {name!r} is not one of {', '.join(POST_PROCESSORS)}")
    return chain


def plot_weights(path, weights: Mapping[str, float], schedule: Mapping[str, list[Point]], steps: int) -> None:
    """A PNG of every nonzero or scheduled reward's weight over the run's optimizer steps."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = max(steps, 1)
    xs = list(range(steps + 1))
    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    for name, w in weights.items():
        if w or name in schedule:
            ax.plot(xs, [weights_at(weights, schedule, x / steps)[name] for x in xs], label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("weight")
    ax.set_title("reward weights over training")
    ax.legend(fontsize=8)
    fig.tight_layout()
    FigureCanvasAgg(fig)  # the figure's canvas, without pyplot
    from looper.store.artifacts import write_figure

    write_figure(path, fig)  # atomic, with the disk-space check
