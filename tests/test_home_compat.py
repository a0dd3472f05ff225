"""A home made before a refactor is reused after it: versions hash stage, schema, identity and
inputs, never module paths. `tests/fixtures/home-before-layout` was made by main 9937746 (the flat
`looper/` layout) with `looper --config pipelines/tiny-test.toml prepare` then `sft`; the same
commands on today's code must find those exact versions and skip."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import last_json

FIXTURE = Path(__file__).parent / "fixtures" / "home-before-layout"
PIPELINE = Path(__file__).resolve().parents[1] / "pipelines" / "tiny-test.toml"
MADE = {"prepare": "2c43d5d9e5f6", "sft": "75d44e44aa2f"}


@pytest.mark.parametrize("stage", list(MADE))
def test_home_made_by_the_flat_layout_is_reused(run_cli, tmp_path, stage):
    home = tmp_path / "home"
    shutil.copytree(FIXTURE, home)
    code, out, err = run_cli("--config", PIPELINE, stage, "--workdir", home, "--json")
    assert code == 0, err
    result = last_json(out)
    assert (result["version"], result["skipped"]) == (MADE[stage], True)
