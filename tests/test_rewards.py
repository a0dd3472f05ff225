"""The reward registry, the reference composite, schedules, post-processors and `rollouts rescore`."""

from __future__ import annotations

import random
import shutil

import pytest
import torch
from conftest import last_json

from looper.errors import LooperError
from looper.regime_w import reward, scoring
from looper.rewards import registry as rewards
from looper.rewards import schedules

REFERENCE = rewards.RewardSpec(rewards.REFERENCE_WEIGHTS, rewards.RewardParams())


def test_correctness_and_its_parameters():
    texts = ["so 3 + 4 = 7\n#### 7", "#### 9", "no answer at all"]
    assert rewards.REWARDS["correctness"](texts, gold_answer=["7"] * 3) == [1.0, -0.5, -0.5]
    fn = rewards.build(rewards.RewardParams(correct_value=2.0, wrong_value=0.0), ["correctness"])[
        "correctness"
    ]
    assert fn(texts, gold_answer=["7"] * 3) == [2.0, 0.0, 0.0]
    with pytest.raises(LooperError, match="gold_answer"):
        fn(texts)


def test_format():
    texts = [
        "3 + 4 = 7\n#### 7",  # final answer line
        "the answer is 7",  # none
        "<think>3 + 4</think>\n#### 7",  # think block closed before the answer
        "<think>3 + 4 = 7\n#### 7",  # opened, never closed
        "3 + 4</think>\n#### 7",  # the template opened it (prompt ends with <think>)
        "#### 7\nand then more text",  # the answer is not final
    ]
    prompts = ["user: q\nassistant:"] * 4 + ["assistant: <think>", "assistant:"]
    assert rewards.REWARDS["format"](texts, prompts=prompts) == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    # the template opened a think block the completion never closes
    assert rewards.REWARDS["format"](["#### 7"], prompts=["assistant: <think>"]) == [0.0]


def test_agreement_with_the_group_majority():
    texts = ["#### 5", "#### 5", "#### 9", "none", "#### 1", "#### 2"]
    group = ["a", "a", "a", "a", "b", "b"]  # b: a tie, the first answer seen is the majority
    assert rewards.REWARDS["agreement"](texts, group=group) == [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]


def test_coherence_and_its_parts():
    texts = ["#### 5", "#### 5", "#### 9"]
    tokens = [10, 10, 40]
    cols = {"group": ["q"] * 3, "tokens": tokens}
    s_end, s_path = scoring.s_end(["5", "5", "9"]), scoring.s_path(tokens)
    wm = scoring.s_wm(s_end, s_path, 0.0)  # no s_cf column: 0
    assert rewards.REWARDS["coherence_end"](texts, **cols) == [s_end] * 3
    assert rewards.REWARDS["coherence_path"](texts, **cols) == [s_path] * 3
    assert rewards.REWARDS["coherence_wm"](texts, **cols) == [wm] * 3
    assert rewards.REWARDS["counterfactual"](texts, **cols) == [0.0] * 3
    assert rewards.REWARDS["coherence"](texts, **cols) == pytest.approx(
        [0.5 * 0.5 + 0.5 * wm] * 2 + [0.5 * wm]
    )
    # stored question scores win over recomputed ones (rollouts know s_cf from their re-asks)
    stored = cols | {"s_cf": [0.5] * 3, "s_wm": [0.9] * 3}
    assert rewards.REWARDS["counterfactual"](texts, **stored) == [0.5] * 3
    assert rewards.REWARDS["coherence_wm"](texts, **stored) == [0.9] * 3


def test_length_penalty():
    fn = rewards.REWARDS["length"]
    assert fn(["a", "b", "c"], tokens=[100, 400, 650]) == [0.0, 0.0, pytest.approx(-0.25)]
    assert fn(["a"], completion_ids=[[1] * 401]) == [pytest.approx(-0.001)]
    with pytest.raises(LooperError, match="tokens"):
        fn(["a"])


def random_row(rng: random.Random, q: int) -> dict:
    """A rollouts row with lengths across the free-token bound and every kind of answer."""
    n = rng.choice([2, 3, 8])
    outputs = []
    for _ in range(n):
        answer = rng.choice(["7", "9", "7", None, "12.5"])
        tokens = rng.choice([5, 120, 399, 400, 401, 517, 1333])
        outputs.append(
            {
                "prompt": "p",
                "text": f"#### {answer}" if answer else "no idea",
                "answer": answer,
                "correct": answer == "7",
                "tokens": tokens,
            }
        )
    scores = scoring.score_question(
        [o["answer"] for o in outputs],
        [o["tokens"] for o in outputs],
        [o["answer"] for o in outputs[:2]],
        [rng.choice(["7", None]) for _ in outputs[:2]],
    )
    return {"id": f"q{q}", "gold_answer": "7", "arm_outputs": outputs, **scores}


def reference_of(row: dict, blend: float = 0.5) -> tuple[list[float], float]:
    outputs = row["arm_outputs"]
    correct, tokens, answers = (
        [o["correct"] for o in outputs],
        [o["tokens"] for o in outputs],
        [o["answer"] for o in outputs],
    )
    return (
        reward.arm_rewards(correct, tokens, answers, row["s_wm"], blend=blend),
        reward.question_reward(correct, tokens, row["s_wm"]),
    )


def test_reference_composite_reproduces_regime_w_to_the_float():
    rng = random.Random(0)
    for q in range(300):
        row = random_row(rng, q)
        arm, question = reference_of(row)
        got = rewards.row_rewards(row, REFERENCE)
        assert got["arm_rewards"] == arm  # exact, not approx
        assert got["reward"] == question
    blended = rewards.RewardSpec(rewards.REFERENCE_WEIGHTS, rewards.RewardParams(coherence_blend=0.2))
    assert rewards.row_rewards(row, blended)["arm_rewards"] == reference_of(row, 0.2)[0]


def test_default_weights_are_the_reference_and_weights_parse():
    spec = rewards.resolve(None, None)
    assert {k: v for k, v in spec.weights.items() if v} == rewards.REFERENCE_WEIGHTS
    assert rewards.resolve({"length": 0.0}, "correctness=2,format=0.5").weights["correctness"] == 2.0
    assert rewards.resolve({"length": 0.0}, None).weights["length"] == 0.0
    for bad, match in [("speed=1", "speed"), ("correctness", "name=weight"), ("length=x", "number")]:
        with pytest.raises(LooperError, match=match):
            rewards.parse_weights(bad)


def test_schedule_values_at_chosen_steps():
    sched = schedules.parse_schedule(
        {
            "format": [{"at": 0.0, "weight": 1.0}, {"at": 0.5, "weight": 0.0, "shape": "cosine"}],
            "correctness": [{"at": 0.2, "weight": 0.2}, {"at": 0.6, "weight": 1.0}],
            "coherence": [{"at": 0.0, "weight": 0.0}, {"at": 0.5, "weight": 0.7, "shape": "constant"}],
        },
        rewards.NAMES,
    )
    base = {"correctness": 1.0, "format": 0.0, "coherence": 0.7, "length": 1.0}
    at = lambda p: schedules.weights_at(base, sched, p)  # noqa: E731
    assert at(0.0) == {"correctness": 0.2, "format": 1.0, "coherence": 0.0, "length": 1.0}
    assert at(0.25)["format"] == pytest.approx(0.5)  # half way along the cosine
    assert at(0.1)["format"] == pytest.approx((1 + 0.8090169943749475) / 2)
    assert at(0.4)["correctness"] == pytest.approx(0.6)  # linear
    assert at(0.49)["coherence"] == 0.0 and at(0.5)["coherence"] == 0.7  # constant, then the step
    assert at(1.0) == {"correctness": 1.0, "format": 0.0, "coherence": 0.7, "length": 1.0}
    for bad, match in [
        ({"speed": [{"at": 0, "weight": 1}]}, "no reward"),
        ({"format": [{"at": 0.5, "weight": 1}, {"at": 0.2, "weight": 0}]}, "increase"),
        ({"format": [{"at": 0, "weight": 1, "shape": "wiggle"}]}, "shape"),
        ({"format": 1.0}, "list of points"),
    ]:
        with pytest.raises(LooperError, match=match):
            schedules.parse_schedule(bad, rewards.NAMES)


def test_post_processors_in_order():
    clip_then_norm = schedules.post_processors("clip, normalize", -1.0, 1.0, 0.9)
    x = torch.tensor([-5.0, 0.0, 5.0])
    for post in clip_then_norm:
        x = post(x)
    assert x.tolist() == pytest.approx([-1.2247, 0.0, 1.2247], abs=1e-4)  # clipped to +-1, then unit std
    norm = schedules.RunningNorm(0.5)
    norm(torch.tensor([0.0, 2.0]))  # mean 1, var 1
    out = norm(torch.tensor([4.0, 6.0]))  # EMA: mean 0.5*1 + 0.5*5 = 3, var 0.5*1 + 0.5*1 = 1
    assert (norm.mean, norm.var) == (3.0, 1.0) and out.tolist() == [1.0, 3.0]
    with pytest.raises(LooperError, match="post"):
        schedules.post_processors("clip,squash", -1, 1, 0.9)
    with pytest.raises(LooperError, match="clip_min"):
        schedules.post_processors("clip", 1, -1, 0.9)


def test_weights_plot(tmp_path):
    sched = schedules.parse_schedule(
        {"format": [{"at": 0, "weight": 1}, {"at": 1, "weight": 0}]}, rewards.NAMES
    )
    schedules.plot_weights(tmp_path / "w.png", {"correctness": 1.0, "format": 0.0}, sched, 10)
    assert (tmp_path / "w.png").read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------------ on tiny-model rollouts

FAST = ["--policy", "base", "--arms", "3", "--max-new-tokens", "8", "--batch-size", "12", "--limit", "6"]


@pytest.fixture
def workdir(tmp_path):
    from looper.config import PrepareConfig
    from looper.stages import prepare

    prepare.run(
        PrepareConfig(source="synthetic", synthetic_train=20, synthetic_test=4, workdir=str(tmp_path))
    )
    return tmp_path


def rows_of(path):
    from pathlib import Path

    from looper.store.artifacts import read_rows

    return [r for f in sorted(Path(path).glob("shard-*.parquet")) for r in read_rows(f)]


def test_rollouts_store_components_and_rescore_equals_regenerating(
    run_cli, workdir, tiny_model_dir, tmp_path
):
    code, out, err = run_cli("rollouts", "--model", tiny_model_dir, "--workdir", workdir, *FAST, "--json")
    assert code == 0, err
    first = last_json(out)
    rows = rows_of(first["path"])
    for row in rows:  # real tiny-model rows: the stored rewards are the reference's, to the float
        arm, question = reference_of(row)
        assert row["arm_rewards"] == arm and row["reward"] == question
        assert len(row["arm_components"]) == 3 and set(row["question_components"]) == set(rewards.NAMES)
        assert [c["correctness"] for c in row["arm_components"]] == [
            1.0 if o["correct"] else -0.5 for o in row["arm_outputs"]
        ]

    regenerated_home = tmp_path / "regenerated"
    shutil.copytree(workdir, regenerated_home)
    # rescore with new weights: a new version, lineage to the source
    code, out, err = run_cli(
        "rollouts", "rescore", "--workdir", workdir, "--weights", "correctness=2.0", "--json"
    )
    assert code == 0, err
    rescored = last_json(out)
    assert not rescored["skipped"] and rescored["version"] != first["version"]
    from looper.store.artifacts import Store

    manifest = Store(workdir).resolve("rollouts", rescored["version"]).manifest
    assert (
        manifest["rescored_from"] == first["version"] and manifest["rewards"]["weights"]["correctness"] == 2.0
    )
    new_rows = rows_of(rescored["path"])
    assert [r["arm_rewards"] for r in new_rows] != [r["arm_rewards"] for r in rows]
    # ... the version and rows regenerating with those weights gives
    code, out, err = run_cli(
        "rollouts", "--model", tiny_model_dir, "--workdir", regenerated_home, *FAST, "--weights", "correctness=2.0",
        "--json",
    )  # fmt: skip
    assert code == 0, err
    regenerated = last_json(out)
    assert regenerated["version"] == rescored["version"] and not regenerated["skipped"]
    again = rows_of(regenerated["path"])
    for a, b in zip(sorted(new_rows, key=lambda r: r["id"]), sorted(again, key=lambda r: r["id"])):
        assert a["arm_rewards"] == b["arm_rewards"] and a["reward"] == b["reward"]
        assert a["arm_components"] == b["arm_components"]
    # unchanged weights: up to date, exit 0
    code, out, err = run_cli(
        "rollouts", "rescore", rescored["version"], "--workdir", workdir, "--weights", "correctness=2"
    )
    assert code == 0 and "up to date" in out
    code, out, err = run_cli("rollouts", "rescore", "--workdir", workdir, "--weights", "speed=2")
    assert code == 1 and "--weights 'speed=2'" in err


def test_pipeline_rewards_table(tmp_path):
    from looper.config import read_pipeline_file

    path = tmp_path / "p.toml"
    path.write_text(
        "[rewards]\ncorrectness = 2.0\nlength_free_tokens = 300\n"
        "[rewards.schedule]\nformat = [{at = 0.0, weight = 1.0}, {at = 0.3, weight = 0.0, shape = 'cosine'}]\n"
    )
    tables = read_pipeline_file(path)
    assert (
        tables["ppo"]["rewards"]["correctness"] == 2.0
        and tables["rollouts"]["rewards"]["length_free_tokens"] == 300
    )
    assert "rewards" not in tables["eval"]
    path.write_text("[rewards]\nspeed = 1.0\n")
    with pytest.raises(LooperError, match="unknown key 'speed' in \\[rewards\\]"):
        read_pipeline_file(path)
