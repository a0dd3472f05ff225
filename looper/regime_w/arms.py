"""Arms: a prompt style and sampling parameters; a rollout asks every arm the same question.

Two styles, four temperatures each (8 arms by default):
- "wolfram": precise, linear step-by-step reasoning, one calculation per line;
- "maudlin": reflective: weigh the approach first, then check the result before answering.

Documented order (what `--arms N` takes the first N of): the styles alternate at rising
temperature, so any even N gets both styles at the lowest temperatures:

    wolfram-t0.2, maudlin-t0.2, wolfram-t0.3, maudlin-t0.3, wolfram-t0.4, maudlin-t0.4,
    wolfram-t0.5, maudlin-t0.5

A user's arm file (TOML) replaces the list:

    [[arm]]
    name = "terse-t0.7"
    style = "Give only the equations, then '#### <answer>'."   # a built-in style name or an instruction
    temperature = 0.7
    top_p = 0.95                                              # optional, default 1.0
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from looper.errors import LooperError

ANSWER_LINE = "End with a final line of the form '#### <answer>', where <answer> is just the number."
STYLES = {
    "wolfram": "You are a precise math tutor. Solve the problem with linear, step-by-step reasoning: "
    "one calculation per line, each step following from the previous one, no digressions. " + ANSWER_LINE,
    "maudlin": "You are a reflective math tutor. Before calculating, consider how to approach the problem "
    "and reconsider it if something does not fit; after calculating, check the result against the "
    "question before answering. " + ANSWER_LINE,
}
TEMPERATURES = (0.2, 0.3, 0.4, 0.5)


@dataclass(frozen=True)
class Arm:
    name: str
    style: str  # a key of STYLES, or the instruction text itself
    temperature: float
    top_p: float = 1.0

    @property
    def instruction(self) -> str:
        return STYLES.get(self.style, self.style)


DEFAULT_ARMS = tuple(Arm(f"{style}-t{t}", style, t) for t in TEMPERATURES for style in ("wolfram", "maudlin"))


def load_arm_file(path: str | Path) -> tuple[Arm, ...]:
    """Arms from a TOML file of [[arm]] tables; errors name the file and the arm."""
    path = Path(path)
    try:
        tables = tomllib.loads(path.read_text()).get("arm")
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise LooperError(f"arm file {path}: cannot read it ({exc})") from None
    if not isinstance(tables, list) or not tables:
        raise LooperError(f"arm file {path}: no [[arm]] tables (see `looper.regime_w.arms` for the format)")
    arms = []
    for i, table in enumerate(tables, start=1):
        unknown = set(table) - {"name", "style", "temperature", "top_p"}
        missing = {"name", "style", "temperature"} - set(table)
        if unknown or missing:
            what = f"unknown key(s) {sorted(unknown)}" if unknown else f"missing {sorted(missing)}"
            raise LooperError(f"arm file {path}: arm #{i}: {what}")
        temperature, top_p = table["temperature"], table.get("top_p", 1.0)
        if not isinstance(temperature, (int, float)) or temperature < 0 or not 0 < top_p <= 1:
            raise LooperError(
                f"arm file {path}: arm #{i} ({table['name']}): temperature must be >= 0, top_p in (0, 1]"
            )
        arms.append(Arm(str(table["name"]), str(table["style"]), float(temperature), float(top_p)))
    if len({a.name for a in arms}) != len(arms):
        raise LooperError(f"arm file {path}: arm names must be unique")
    return tuple(arms)


def select_arms(n: int, arm_file: str | None = None) -> tuple[Arm, ...]:
    arms = load_arm_file(arm_file) if arm_file else DEFAULT_ARMS
    if not 1 <= n <= len(arms):
        raise LooperError(f"--arms {n}: choose 1 to {len(arms)} (the arm list has {len(arms)})")
    return arms[:n]
