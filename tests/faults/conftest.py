"""Fixtures of the fault-injection suite (the reference home, the ledger of counts) and the hook
that writes the counts RELIABILITY.md records.

Every test here is marked slow (`make test-faults`, or `make test-all`). At the end of a session that ran
any of them, the counts go to `$LOOPER_FAULTS_SUMMARY` (default: faults-summary.json in the
rootdir) and to the terminal; `python tests/faults/reliability.py` turns that file into
RELIABILITY.md.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections import Counter
from pathlib import Path

import pytest

from faults.harness import DATA_STAGES, GRADED, STAGE_ARGS, TRAIN_STAGES, grade_rollouts, latest, looper

LEDGER: Counter[str] = Counter()
NOTES: list[str] = []
FAILED: list[str] = []
STAGES = ("prepare", "sft", "rollouts", "ppo", "dpo", "eval")


@pytest.fixture(scope="session")
def ledger() -> Counter[str]:
    """Counts kept across the suite: kills, kills survived, rows lost/doubled, stuck resumes, bad inputs."""
    return LEDGER


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """(home, {stage: version}) built by uninterrupted runs of every stage.

    With LOOPER_FAULTS_REFERENCE=DIR the home is kept in DIR and reused by later sessions (while
    developing the suite; stages already there are skipped as up to date)."""
    keep = os.environ.get("LOOPER_FAULTS_REFERENCE")
    home = Path(keep) if keep else tmp_path_factory.mktemp("reference") / "home"
    versions = {}
    for stage in STAGES:
        if stage == "ppo" and not (home / "data" / "rollouts" / GRADED).is_dir():
            grade_rollouts(home)  # ppo and dpo learn from the graded copy of the rollouts
        result = looper(home, stage, *STAGE_ARGS.get(stage, []))
        assert result.code == 0, f"reference {stage} failed:\n{result.err[-3000:]}"
        versions[stage] = latest(home, stage)
    assert set(versions) == set(DATA_STAGES) | set(TRAIN_STAGES)
    return home, versions


def pytest_runtest_logreport(report):
    if "tests/faults/" not in report.nodeid:
        return
    if report.failed:
        FAILED.append(report.nodeid.split("::", 1)[1])
    elif report.skipped and isinstance(report.longrepr, tuple):
        NOTES.append(f"skipped {report.nodeid.split('::', 1)[1]}: {report.longrepr[2]}")


def pytest_sessionfinish(session, exitstatus):
    if not LEDGER:
        return
    path = Path(
        os.environ.get("LOOPER_FAULTS_SUMMARY", Path(str(session.config.rootpath)) / "faults-summary.json")
    )
    summary = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "seed": int(os.environ.get("LOOPER_FAULT_SEED", "12")),
        "kill_points": os.environ.get("LOOPER_KILL_POINTS", "sample"),
        "kill_points_per_stage": {
            k.removeprefix("killpoints_"): v
            for k, v in LEDGER.items()
            if k.removeprefix("killpoints_") in STAGES or k == "killpoints_loop"
        },
        "tests_failed": session.testsfailed,
        "tests_collected": session.testscollected,
        "counts": dict(sorted(LEDGER.items())),
        "failed": FAILED,
        "notes": NOTES,
    }
    path.write_text(json.dumps(summary, indent=2) + "\n")


def pytest_terminal_summary(terminalreporter):
    if LEDGER:
        terminalreporter.section("fault-injection counts")
        for key, value in sorted(LEDGER.items()):
            terminalreporter.write_line(f"{key:32s} {value}")
