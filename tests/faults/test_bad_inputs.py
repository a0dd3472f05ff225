"""Hostile and broken inputs: each must fail with one line on stderr (naming what is wrong) and
leave the home exactly as it was (no `.partial`, no cache entry, no LATEST change).

Runs the CLI in-process (`run_cli`, tests/conftest.py): these fail before any work starts.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from faults.harness import GRADED, PIPELINE, tree

pytestmark = pytest.mark.slow


def adapter(path: Path, model_dir: Path, base_name: str) -> Path:
    """A PEFT LoRA adapter made on `model_dir`, its adapter_config.json naming `base_name`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    model.save_pretrained(path)
    config_file = path / "adapter_config.json"
    config_file.write_text(
        json.dumps(json.loads(config_file.read_text()) | {"base_model_name_or_path": base_name})
    )
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from looper.policy.models import resolve_model
    from looper.policy.tiny import tiny_model

    d = tmp_path_factory.mktemp("bad-inputs")
    tiny = Path(resolve_model("looper:tiny").path)
    good = {"question": "Ann has 2 apples and buys 3. How many?", "answer": "2 + 3 = 5\n#### 5"}
    files = {
        "malformed": "\n".join([json.dumps(good), '{"question": "cut off', json.dumps(good)]),
        "missing-field": json.dumps({"question": "no answer here"}),
        "non-numeric": json.dumps(good | {"answer": "lots\n#### many"}),
    }
    for name, text in files.items():
        (d / f"{name}.jsonl").write_text(text + "\n")
    (d / "arms.toml").write_text("[[arm]]\nname = 'x'\ntemperature = 'hot'\n[[arm\n")
    pipeline = PIPELINE.read_text()
    (d / "unknown-key.toml").write_text(pipeline.replace("[sft]\n", "[sft]\nmax_stepz = 3\n"))
    (d / "bad-type.toml").write_text(pipeline.replace("[sft]\nmax_steps = 4", '[sft]\nmax_steps = "four"'))
    adapter(d / "other-base", tiny, "org/other-model")
    adapter(d / "misfit", tiny_model(d / "narrow-model", hidden_size=32), str(tiny))
    return d


CASES = {
    "prepare --source missing": ("prepare", "--source", "{d}/nowhere"),
    "prepare malformed JSONL": ("prepare", "--source", "{d}/malformed.jsonl"),
    "prepare missing field": ("prepare", "--source", "{d}/missing-field.jsonl"),
    "prepare non-numeric gold": ("prepare", "--source", "{d}/non-numeric.jsonl"),
    "prepare --limit -1": ("prepare", "--limit", "-1"),
    "rollouts --offset -2": ("rollouts", "--offset", "-2"),
    "rollouts --shard-size -1": ("rollouts", "--shard-size", "-1"),
    "rollouts --shard 3/2": ("rollouts", "--shard", "3/2"),
    "rollouts --cf-arms unknown": ("rollouts", "--cf-arms", "nosuch-arm"),
    "rollouts --arm-file broken": ("rollouts", "--arm-file", "{d}/arms.toml"),
    "rollouts --policy other base": ("rollouts", "--policy", "{d}/other-base"),
    "sft --max-steps 0": ("sft", "--max-steps", "0"),
    "sft --batch-size 0": ("sft", "--batch-size", "0"),
    "ppo --questions-per-minibatch 0": ("ppo", "--rollouts", GRADED, "--questions-per-minibatch", "0"),
    "ppo --rollouts unknown": ("ppo", "--rollouts", "nosuchversion"),
    "dpo on rollouts with no right arm": ("dpo", "--rollouts", "latest-real"),
    "eval --compare unknown": ("eval", "--compare", "base,nosuch"),
    "eval --source missing": ("eval", "--source", "{d}/missing.jsonl"),
    "eval --compare other base": ("eval", "--compare", "base,{d}/other-base"),
    "eval --compare misfit shapes": ("eval", "--compare", "base,{d}/misfit", "--allow-base-mismatch"),
    "pipeline unknown key": ("--config", "{d}/unknown-key.toml", "sft"),
    "pipeline bad type": ("--config", "{d}/bad-type.toml", "sft"),
    "export onto an existing dir": ("export", "--model", "sft", "--out", "{d}"),
}


@pytest.fixture(scope="module")
def home(reference, tmp_path_factory):
    ref_home, versions = reference
    home = tmp_path_factory.mktemp("bad-inputs-home") / "home"
    shutil.copytree(ref_home, home, symlinks=True)
    return home, versions


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_one_line_nothing_left(run_cli, inputs, home, ledger, case):
    workdir, versions = home
    args = [a.format(d=inputs) for a in CASES[case]]
    args = [versions["rollouts"] if a == "latest-real" else a for a in args]
    if args[0] != "--config":
        args = ["--config", str(PIPELINE), *args]
    before = tree(workdir)
    ledger["bad_inputs_tried"] += 1
    code, _, err = run_cli(*args, "--workdir", workdir)
    lines = [line for line in err.splitlines() if line.strip()]
    one_line = code != 0 and len(lines) == 1 and "Traceback" not in err
    unchanged = tree(workdir) == before
    ledger["bad_inputs_one_line_clean"] += one_line and unchanged
    assert one_line, f"exit {code}, stderr:\n{err}"
    assert unchanged, "the failed run left something behind"
