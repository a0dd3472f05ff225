"""SIGKILL a stage just before each of its filesystem mutations under the home, rerun, compare.

`LOOPER_KILL_AT=N` (looper/store/faults.py, an audit hook `python -m looper` installs) kills the
run just before its N-th mutation under LOOPER_HOME: a file opened for writing, a rename or
replace, an unlink, a mkdir or rmdir, a symlink. A first uninterrupted run with LOOPER_KILL_LOG
counts a stage's points; then for every N (LOOPER_KILL_POINTS=all, what `make test-faults` sets)
or an even sample of them (the default, 6: `make test-all`; LOOPER_KILL_POINTS=N for N), a copy of the home without the stage
is killed at N and the same command rerun. The rerun must finish, and the home must then hold
what the uninterrupted run's home holds: the same versions with the same content hashes and
counts (rows and adapter bytes are in the hash), the same LATEST pointers, the same set of
files (nothing stray: no temp file, lock, .partial or trainer state), and `looper gc --broken`
must find nothing to remove.

Stages: sft, rollouts, ppo and dpo (on the graded rollouts), eval, and a 2-round `looper loop`
(tests/faults/faults.toml's [loop]) from a home holding prepare and sft.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from faults.harness import STAGE_ARGS, looper, stage_root

pytestmark = pytest.mark.slow

STAGES = ("sft", "rollouts", "ppo", "dpo", "eval", "loop")
SAMPLE = 6  # points per stage without LOOPER_KILL_POINTS=all (first, last and evenly between)
# What a 2-round loop makes besides its own artifact: the reference home's copies are removed.
LOOP_MAKES = ("rollouts", "ppo", "dpo", "eval")


def catalog(home: Path) -> dict:
    """What a home holds: {stage: {version: (hash, counts)}, LATEST pointers}, and its file paths."""
    import json

    held = {}
    for root in (home / "data", home / "checkpoints"):
        for stage_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink()):
            for version in sorted(p for p in stage_dir.iterdir() if (p / "manifest.json").is_file()):
                m = json.loads((version / "manifest.json").read_text())
                held[f"{stage_dir.name}/{version.name}"] = (m["hash"], m["counts"])
            if (stage_dir / "LATEST").is_file():
                held[f"{stage_dir.name}/LATEST"] = (stage_dir / "LATEST").read_text().strip()
    paths = {str(p.relative_to(home)) for p in home.rglob("*")}
    return {"artifacts": held, "paths": sorted(paths)}


def without(reference: Path, dest: Path, stage: str) -> Path:
    shutil.copytree(reference, dest, symlinks=True)
    for name in LOOP_MAKES + ("loop",) if stage == "loop" else (stage,):
        shutil.rmtree(stage_root(dest, name), ignore_errors=True)
    if stage in ("loop", "rollouts"):  # the graded copy of the rollouts is ppo/dpo's, not made here
        shutil.rmtree(stage_root(dest, "rollouts"), ignore_errors=True)
    return dest


def args_for(stage: str) -> list[str]:
    return [stage, *STAGE_ARGS.get(stage, [])]


@pytest.fixture(scope="session")
def uninterrupted(reference, tmp_path_factory):
    """{stage: (home after an uninterrupted run, its catalog, the run's mutation log)}, made on demand."""
    made: dict[str, tuple[Path, dict, list[str]]] = {}

    def get(stage: str):
        if stage not in made:
            ref_home, _ = reference
            base = tmp_path_factory.mktemp(f"uninterrupted-{stage}")
            home = without(ref_home, base / "home", stage)
            log = base / "mutations.log"
            result = looper(home, *args_for(stage), env={"LOOPER_KILL_LOG": str(log)})
            assert result.code == 0, f"uninterrupted {stage} failed:\n{result.err[-3000:]}"
            made[stage] = (home, catalog(home), log.read_text().splitlines())
        return made[stage]

    return get


def chosen_points(total: int) -> list[int]:
    """LOOPER_KILL_POINTS: `all`, `sample` (SAMPLE points, the default) or a number of points, each
    set evenly spaced with the first and the last included; or `A-B`, the points A to B (to split a
    stage's points across processes or sessions)."""
    wanted = os.environ.get("LOOPER_KILL_POINTS", "sample")
    if "-" in wanted:
        first, last = map(int, wanted.split("-"))
        return list(range(max(first, 1), min(last, total) + 1))
    count = total if wanted == "all" else SAMPLE if wanted == "sample" else int(wanted)
    if count >= total:
        return list(range(1, total + 1))
    step = (total - 1) / max(count - 1, 1)
    return sorted({1 + round(i * step) for i in range(count)})


@pytest.mark.parametrize("stage", STAGES)
def test_kill_before_every_mutation(reference, uninterrupted, ledger, tmp_path, stage):
    ref_home, _ = reference
    want_home, want, log = uninterrupted(stage)
    failures = []
    for n in chosen_points(len(log)):
        home = without(ref_home, tmp_path / f"home-{n}", stage)
        ledger["killpoints_tried"] += 1
        killed = looper(home, *args_for(stage), env={"LOOPER_KILL_AT": str(n)})
        if not killed.killed:
            failures.append(
                f"point {n} ({log[n - 1]}): not reached (exit {killed.code}): {killed.err[-500:]}"
            )
            ledger["killpoints_not_reached"] += 1
            continue
        rerun = looper(home, *args_for(stage))
        if rerun.code != 0:
            ledger["killpoints_stuck"] += 1
            failures.append(f"point {n} ({log[n - 1]}): rerun failed: {rerun.err.strip()[-800:]}")
            continue
        got = catalog(home)
        broken = looper(home, "gc", "--broken", "--dry-run")
        problems = []
        if got["artifacts"] != want["artifacts"]:
            diff = {
                k: (want["artifacts"].get(k), got["artifacts"].get(k))
                for k in set(want["artifacts"]) | set(got["artifacts"])
                if want["artifacts"].get(k) != got["artifacts"].get(k)
            }
            problems.append(f"artifacts differ: {diff}")
            ledger["killpoints_diverged"] += 1
        stray = sorted(set(got["paths"]) - set(want["paths"]))
        lost = sorted(set(want["paths"]) - set(got["paths"]))
        if stray or lost:
            problems.append(f"files differ: stray {stray[:8]}, missing {lost[:8]}")
        if broken.code != 0 or "would remove" in broken.out:
            problems.append(f"gc --broken finds: {broken.out.strip()} {broken.err.strip()}")
        if stray or lost or broken.code != 0 or "would remove" in broken.out:
            ledger["killpoints_stray_files"] += 1
        if problems:
            failures.append(f"point {n} ({log[n - 1]}): " + "; ".join(problems))
        else:
            ledger["killpoints_identical"] += 1
            shutil.rmtree(home)  # the tmp dir would keep every home of the stage
    ledger[f"killpoints_{stage}"] += len(log)
    assert not failures, f"{stage}: {len(failures)} kill point(s) of {len(log)} failed:\n" + "\n".join(
        failures
    )
