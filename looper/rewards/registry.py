"""The reward registry: small reward functions, combined into a weighted composite reward.

Each reward is a plain function with TRL's reward signature, ``(completions, **columns) ->
list[float]`` (one float per completion), registered under its name in :data:`REWARDS`
(open-r1 style). Parameterised ones are built by a factory from :class:`RewardParams`
(:func:`build`). The columns they read, one value per completion:

* ``gold_answer`` - the reference answer (correctness);
* ``group`` - the question a completion answers: group-level scores (agreement, coherence)
  are taken over the completions that share it (a question's arms, or TRL's generations);
* ``tokens`` - the completion's length without its EOS (else ``len(completion_ids)``);
* optional precomputed ``answer`` / ``correct`` (rollouts store them), ``prompts`` (to see
  whether the template opened a think block), and question-level scores ``s_end``,
  ``s_path``, ``s_cf``, ``s_wm`` (rollouts score s_cf from perturbed re-asks; where absent -
  online - s_cf is 0 and the others are computed over the group).

:func:`combine` sums ``weight * component`` in registry order; the reference recipe
(``correctness = 1``, ``coherence = 0.7``, ``length = 1``, defaults elsewhere) reproduces
``looper.regime_w.reward.arm_rewards`` and ``question_reward`` to the float
(tests/test_rewards.py). :func:`question_components` gives each reward's question-level
value (for ``looper ppo --reward question``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields

from looper.answers import answers_agree, extract_answer, is_correct
from looper.errors import LooperError
from looper.regime_w import scoring
from looper.stats import majority_vote

RewardFunc = Callable[..., list[float]]

#: Registry order = summation order of the composite (fixed: the sum is reproducible to the float).
NAMES = (
    "correctness",
    "format",
    "agreement",
    "coherence",
    "coherence_wm",
    "coherence_end",
    "coherence_path",
    "counterfactual",
    "length",
)
#: The reference recipe's weights (today's Regime W arm and question rewards).
REFERENCE_WEIGHTS = {"correctness": 1.0, "coherence": 0.7, "length": 1.0}


@dataclass(frozen=True)
class RewardParams:
    """Parameters of the parameterised rewards (the `[rewards]` table's non-weight keys)."""

    correct_value: float = 1.0  # correctness of a right answer
    wrong_value: float = -0.5  # correctness of a wrong or missing answer
    coherence_blend: float = 0.5  # coherence = blend * own agreement + (1 - blend) * s_wm
    length_free_tokens: int = 400  # tokens without penalty
    length_per_token: float = 0.001  # penalty per token beyond them
    w_end: float = scoring.DEFAULT_WEIGHTS.end  # s_wm = w_end * s_end + w_path * s_path + w_cf * s_cf
    w_path: float = scoring.DEFAULT_WEIGHTS.path  # where not given
    w_cf: float = scoring.DEFAULT_WEIGHTS.cf


FINAL_ANSWER = re.compile(r"####\s*\S+\s*$")


def _groups(n: int, group: Sequence | None) -> list[list[int]]:
    """Indices of the completions of each group, in first-seen order (no column: one group)."""
    if group is None:
        return [list(range(n))]
    members: dict = {}
    for i, key in enumerate(group):
        members.setdefault(key, []).append(i)
    return list(members.values())


def _answers(completions, answer=None) -> list[str | None]:
    return list(answer) if answer is not None else [extract_answer(c) for c in completions]


def _tokens(completions, tokens=None, completion_ids=None) -> list[int]:
    if tokens is not None:
        return [int(t) for t in tokens]
    if completion_ids is not None:
        return [len(ids) for ids in completion_ids]
    raise LooperError("the length reward needs a `tokens` or `completion_ids` column")


def _question_scores(completions, columns: Mapping, params: RewardParams) -> list[dict]:
    """s_end, s_path, s_cf, s_wm of each completion's group: the stored ones where given."""
    answers = _answers(completions, columns.get("answer"))
    tokens = _tokens(completions, columns.get("tokens"), columns.get("completion_ids"))
    weights = scoring.RegimeWWeights(params.w_end, params.w_path, params.w_cf)
    out: list[dict] = [{} for _ in completions]
    for members in _groups(len(completions), columns.get("group")):
        first = members[0]
        given = lambda key, first=first: columns[key][first] if columns.get(key) is not None else None  # noqa: E731
        end = given("s_end")
        end = scoring.s_end([answers[i] for i in members]) if end is None else end
        path = given("s_path")
        path = scoring.s_path([tokens[i] for i in members]) if path is None else path
        cf = given("s_cf") or 0.0  # online: no perturbed re-asks; a group-wide constant, advantages ignore it
        wm = given("s_wm")
        wm = scoring.s_wm(end, path, cf, weights) if wm is None else wm
        for i in members:
            out[i] = {"s_end": end, "s_path": path, "s_cf": cf, "s_wm": wm}
    return out


# ------------------------------------------------------------------------------ the rewards


def correctness_reward(params: RewardParams) -> RewardFunc:
    def correctness(completions, gold_answer=None, correct=None, **_) -> list[float]:
        """`correct_value` for a right final answer, `wrong_value` for a wrong or missing one."""
        if correct is None:
            if gold_answer is None:
                raise LooperError("the correctness reward needs a `gold_answer` column")
            correct = [is_correct(c, g) for c, g in zip(completions, gold_answer)]
        return [params.correct_value if ok else params.wrong_value for ok in correct]

    return correctness


def format(completions, prompts=None, **_) -> list[float]:  # noqa: A001 - the reward's registered name
    """1 when the completion ends with a final `#### n` and closes a think block it (or the
    template, at the end of the prompt) opened; else 0."""
    scores = []
    for i, text in enumerate(completions):
        prompt = prompts[i] if prompts is not None else ""
        opened = "<think>" in text or str(prompt).rstrip().endswith("<think>")
        closed = "</think>" in text and (text.rpartition("</think>")[2].count("####") > 0)
        ok = bool(FINAL_ANSWER.search(text.strip())) and (closed if opened else True)
        scores.append(1.0 if ok else 0.0)
    return scores


def agreement(completions, group=None, answer=None, **_) -> list[float]:
    """1 when the completion's answer agrees with its group's majority answer; else 0."""
    answers = _answers(completions, answer)
    scores = [0.0] * len(completions)
    for members in _groups(len(completions), group):
        majority = majority_vote([answers[i] for i in members])
        for i in members:
            scores[i] = 1.0 if answers_agree(answers[i], majority) else 0.0
    return scores


def coherence_reward(params: RewardParams) -> RewardFunc:
    def coherence(completions, **columns) -> list[float]:
        """`blend * agreement with the group's other answers + (1 - blend) * s_wm` (Regime W's arm coherence)."""
        answers = _answers(completions, columns.get("answer"))
        scores_ = _question_scores(completions, columns, params)
        out = [0.0] * len(completions)
        for members in _groups(len(completions), columns.get("group")):
            group_answers = [answers[i] for i in members]
            for k, i in enumerate(members):
                own = scoring.arm_agreement(group_answers, k)
                out[i] = params.coherence_blend * own + (1.0 - params.coherence_blend) * scores_[i]["s_wm"]
        return out

    return coherence


def _question_part(key: str, name: str, doc: str) -> Callable[[RewardParams], RewardFunc]:
    def factory(params: RewardParams) -> RewardFunc:
        def part(completions, **columns) -> list[float]:
            return [s[key] for s in _question_scores(completions, columns, params)]

        part.__name__, part.__doc__ = name, doc
        return part

    return factory


def length_reward(params: RewardParams) -> RewardFunc:
    def length(completions, tokens=None, completion_ids=None, **_) -> list[float]:
        """`-length_per_token * max(0, tokens - length_free_tokens)` (a penalty: <= 0)."""
        return [
            -(params.length_per_token * max(0.0, t - params.length_free_tokens))
            for t in _tokens(completions, tokens, completion_ids)
        ]

    return length


FACTORIES: dict[str, Callable[[RewardParams], RewardFunc]] = {
    "correctness": correctness_reward,
    "format": lambda params: format,
    "agreement": lambda params: agreement,
    "coherence": coherence_reward,
    "coherence_wm": _question_part("s_wm", "coherence_wm", "The question's s_wm (the same for its group)."),
    "coherence_end": _question_part("s_end", "coherence_end", "The question's s_end: answer agreement."),
    "coherence_path": _question_part("s_path", "coherence_path", "The question's s_path: length regularity."),
    "counterfactual": _question_part("s_cf", "counterfactual", "The question's s_cf (0 online: no re-asks)."),
    "length": length_reward,
}
#: The registry with default parameters.
REWARDS: dict[str, RewardFunc] = {name: factory(RewardParams()) for name, factory in FACTORIES.items()}


def build(params: RewardParams = RewardParams(), names: Sequence[str] = NAMES) -> dict[str, RewardFunc]:
    """The reward functions named, with these parameters."""
    return {name: FACTORIES[name](params) for name in names}


def components(completions, params: RewardParams = RewardParams(), **columns) -> dict[str, list[float]]:
    """Every registered reward on these completions: {name: one value per completion}."""
    return {name: fn(completions, **columns) for name, fn in build(params).items()}


def combine(parts: Mapping[str, Sequence[float]], weights: Mapping[str, float]) -> list[float]:
    """`sum(weight * component)` per completion, in registry order; zero weights are left out."""
    n = len(next(iter(parts.values())))
    totals = [0.0] * n
    for name in NAMES:
        w = weights.get(name, 0.0)
        if w:
            totals = [t + w * c for t, c in zip(totals, parts[name])]
    return totals


def question_components(
    arm_parts: Mapping[str, Sequence[float]], tokens: Sequence[int], correct, params
) -> dict:
    """Each reward's value for a question as a whole (the reference recipe's question reward):
    correctness of the best arm, length penalty of the mean length, question scores as they are,
    per-arm rewards averaged."""
    mean_tokens = sum(tokens) / len(tokens) if tokens else 0.0
    out = {name: sum(v) / len(v) if v else 0.0 for name, v in arm_parts.items()}
    out["correctness"] = params.correct_value if any(correct) else params.wrong_value
    out["length"] = -(params.length_per_token * max(0.0, mean_tokens - params.length_free_tokens))
    out["coherence"] = arm_parts["coherence_wm"][0] if arm_parts["coherence_wm"] else 0.0
    return out


# ------------------------------------------------------------------------------ configuration


def parse_weights(text: str | None, where: str = "--weights") -> dict[str, float]:
    """`name=w,name=w` -> {name: w}; unknown names or bad numbers raise a LooperError naming them."""
    weights: dict[str, float] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in FACTORIES:
            raise LooperError(
                f"{where} {item.strip()!r}: write name=weight with a name among {', '.join(NAMES)}"
            )
        try:
            weights[name] = float(value)
        except ValueError:
            raise LooperError(f"{where} {name}={value}: the weight must be a number") from None
    return weights


@dataclass(frozen=True)
class RewardSpec:
    """What a stage scores with: the weights of every reward and their parameters."""

    weights: dict
    params: RewardParams

    def as_dict(self) -> dict:
        return {"weights": dict(self.weights), "params": asdict(self.params)}

    @classmethod
    def from_dict(cls, data: Mapping) -> RewardSpec:
        return cls(dict(data["weights"]), RewardParams(**data["params"]))


def reads_s_cf(names: Sequence[str], params: RewardParams) -> bool:
    """Whether a composite of the rewards `names` (nonzero or scheduled ones) depends on s_cf: the
    counterfactual reward itself, or s_wm where s_cf has weight in it (coherence_wm, and coherence
    unless it is all agreement). Rollouts skip their s_cf re-asks when no stored reward reads it."""
    in_wm = params.w_cf != 0
    return (
        "counterfactual" in names
        or (in_wm and "coherence_wm" in names)
        or (in_wm and "coherence" in names and params.coherence_blend < 1)
    )


def settings(table: Mapping | None):
    """The `[rewards]` table as a checked RewardsConfig (ranges and choices as every config's)."""
    from looper.config import ConfigError, RewardsConfig, check

    table = dict(table or {})
    if problems := check(RewardsConfig, table):
        raise ConfigError(problems)
    return RewardsConfig(**table)


def resolve(
    table: Mapping | None, cli_weights: str | None, scoring_weights: tuple | None = None
) -> RewardSpec:
    """Defaults < the `[rewards]` table < `--weights`. Parameters come from the table; the s_wm
    weights from the rollouts' scoring where given (s_wm is their score)."""
    config = settings(table)
    weights = {name: float(getattr(config, name)) for name in NAMES} | parse_weights(cli_weights)
    param_names = {f.name for f in fields(RewardParams)}
    params = {k: getattr(config, k) for k in param_names if hasattr(config, k)}
    if scoring_weights is not None:
        params |= dict(zip(("w_end", "w_path", "w_cf"), scoring_weights))
    return RewardSpec(weights, RewardParams(**params))


# ------------------------------------------------------------------------------ rollouts rows


def row_columns(row: Mapping) -> tuple[list[str], dict]:
    """A rollouts row's arms as reward inputs: (completions, columns), the stored answers,
    correctness, lengths and question scores included."""
    outputs = row["arm_outputs"]
    n = len(outputs)
    columns = {
        "gold_answer": [row["gold_answer"]] * n,
        "group": [row["id"]] * n,
        "prompts": [o["prompt"] for o in outputs],
        "tokens": [o["tokens"] for o in outputs],
        "answer": [o["answer"] for o in outputs],
        "correct": [o["correct"] for o in outputs],
        **{key: [row[key]] * n for key in ("s_end", "s_path", "s_cf", "s_wm")},
    }
    return [o["text"] for o in outputs], columns


def row_rewards(row: Mapping, spec: RewardSpec) -> dict:
    """The reward columns of a rollouts row under `spec`: every component per arm and per question,
    and the weighted arm rewards and question reward."""
    completions, columns = row_columns(row)
    parts = components(completions, spec.params, **columns)
    question = question_components(parts, columns["tokens"], columns["correct"], spec.params)
    return {
        "arm_components": [{name: parts[name][i] for name in NAMES} for i in range(len(completions))],
        "question_components": question,
        "reward": combine({k: [v] for k, v in question.items()}, spec.weights)[0],
        "arm_rewards": combine(parts, spec.weights),
    }
