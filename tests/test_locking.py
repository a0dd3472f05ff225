"""One run per stage version (issue 12, failure 1): the lock, and a commit that publishes only whole artifacts."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from looper.errors import LooperError
from looper.store import integrity
from looper.store.artifacts import Store

REPO = Path(__file__).resolve().parents[1]


def holder(workdir: Path, stage: str, version: str) -> subprocess.Popen:
    """Another process that takes the version's run lock (as a stage run does) and sleeps."""
    code = textwrap.dedent(
        f"""
        import sys, time
        from looper.store.artifacts import Store
        store = Store({str(workdir)!r})
        store.begin({stage!r}, {version!r})
        print("locked", flush=True)
        time.sleep(60)
        """
    )
    env = os.environ | {"PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_run_of_a_version_stops_naming_the_holder(tmp_path):
    proc = holder(tmp_path, "prepare", "abc123")
    try:
        with pytest.raises(LooperError) as err:
            Store(tmp_path).reuse("prepare", "abc123", False)
        message = str(err.value)
        partial = tmp_path / "data" / "prepare" / "abc123.partial"
        assert message.startswith(f"another looper prepare run holds {partial} (pid {proc.pid}, started 20")
        assert "--wait" in message
    finally:
        proc.kill()
        proc.wait()


def test_lock_of_a_killed_run_is_taken_over(tmp_path):
    proc = holder(tmp_path, "prepare", "abc123")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    run = Store(tmp_path).begin("prepare", "abc123", resume=True)  # no error: the kernel dropped the lock
    assert f"pid {os.getpid()}" in (tmp_path / "data" / "prepare" / "abc123.lock").read_text()
    (run.path / "rows.jsonl").write_bytes(b"{}\n")
    assert run.commit(config={}, inputs={}, identity={}).version == "abc123"
    assert not (
        tmp_path / "data" / "prepare" / "abc123.lock"
    ).exists()  # a run that ends removes its lock file


def test_wait_queues_behind_the_holder_then_reuses_its_artifact(tmp_path):
    first = Store(tmp_path)
    run = first.begin("prepare", "abc123")
    (run.path / "rows.jsonl").write_bytes(b"{}\n")
    found = []
    waiter = threading.Thread(
        target=lambda: found.append(Store(tmp_path, wait=True).reuse("prepare", "abc123", False))
    )
    waiter.start()
    time.sleep(0.5)
    assert waiter.is_alive() and not found  # blocked on the lock
    run.commit(config={}, inputs={}, identity={})
    waiter.join(10)
    assert found and found[0].version == "abc123"  # up to date: it did not redo the work


def test_interleaved_runs_never_publish_a_manifest_alone(tmp_path):
    """The issue's race, made deterministic: two runs of one version both past their 'already made?'
    check; the first publishes (renaming the .partial away), then the second commits. Before the
    lock, the second's commit re-created the .partial holding only a manifest and swapped it in."""
    a, b = Store(tmp_path), Store(tmp_path)
    run_a = a.begin("rollouts", "abc123", resume=True)
    for j in range(3):
        (run_a.path / f"shard-{j:05d}.parquet").write_bytes(b"rows %d" % j)
    with pytest.raises(LooperError, match="another looper rollouts run holds"):
        b.begin("rollouts", "abc123", resume=True)
    published = run_a.commit(config={}, inputs={}, identity={})
    assert sorted(p.name for p in published.path.iterdir()) == [
        "manifest.json",
        "shard-00000.parquet",
        "shard-00001.parquet",
        "shard-00002.parquet",
    ]
    assert integrity.problems(published.path, published.manifest) == []


def test_commit_never_recreates_a_vanished_partial(tmp_path):
    run = Store(tmp_path).begin("rollouts", "abc123")
    (run.path / "shard-00000.parquet").write_bytes(b"rows")
    os.rename(run.path, tmp_path / "elsewhere")  # what the other run's publish used to do
    with pytest.raises(LooperError, match="vanished before commit"):
        run.commit(config={}, inputs={}, identity={})
    assert not run.path.exists()
    assert not (tmp_path / "data" / "rollouts" / "abc123").exists()
    assert Store(tmp_path).latest("rollouts") is None


def test_commit_refuses_missing_required_files_and_files_changed_under_it(tmp_path, monkeypatch):
    store = Store(tmp_path)
    run = store.begin("rollouts", "abc123")
    (run.path / "shard-00000.parquet").write_bytes(b"rows")
    with pytest.raises(LooperError, match=r"incomplete \(shard-00001.parquet missing\)"):
        run.commit(config={}, inputs={}, identity={}, required=["shard-00000.parquet", "shard-00001.parquet"])

    # a file rewritten between hashing and publishing (another writer) is caught by the re-check
    real = integrity.file_records

    def then_tamper(root):
        records = real(root)
        (root / "shard-00000.parquet").write_bytes(b"rowz")  # same size, other bytes
        return records

    monkeypatch.setattr(integrity, "file_records", then_tamper)
    with pytest.raises(LooperError, match=r"changed while committing \(shard-00000.parquet corrupt"):
        run.commit(config={}, inputs={}, identity={})
    assert store.latest("rollouts") is None and not (tmp_path / "data" / "rollouts" / "abc123").exists()


def test_manifest_lists_every_file_with_its_sha256(tmp_path):
    run = Store(tmp_path).begin("prepare", "abc123")
    (run.path / "train.parquet").write_bytes(b"train")
    (run.path / "sub").mkdir()
    (run.path / "sub" / "x.txt").write_bytes(b"x")
    artifact = run.commit(config={}, inputs={}, identity={})
    files = {f["path"]: f for f in artifact.manifest["files"]}
    assert set(files) == {"train.parquet", "sub/x.txt"}
    assert files["train.parquet"]["bytes"] == 5
    assert re.fullmatch(r"[0-9a-f]{64}", files["train.parquet"]["sha256"])


@pytest.mark.slow  # five CLI processes; ~1-2 min on a shared 2-core box
def test_concurrent_rollouts_on_a_finished_partial_publish_it_whole(run_cli, tiny_model_dir, tmp_path):
    """The issue's reproduction: a rollouts `.partial` holding every shard and no manifest (a kill at
    commit), then two `looper rollouts` at once (and then three with --wait). Before the lock, some
    tries published a version holding only manifest.json, marked LATEST."""
    from conftest import last_json
    from test_rollouts import FAST

    from looper.config import PrepareConfig
    from looper.stages import prepare

    prepare.run(
        PrepareConfig(source="synthetic", synthetic_train=30, synthetic_test=6, workdir=str(tmp_path))
    )
    args = ["rollouts", "--model", str(tiny_model_dir), "--workdir", str(tmp_path), *FAST, "--limit", "6"]
    args += ["--shard-size", "2"]
    code, out, err = run_cli(*args, "--json")
    assert code == 0, err
    final = Path(last_json(out)["path"])
    partial = final.with_name(final.name + ".partial")
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for extra in ([], ["--wait"]):
        final.rename(partial)
        (partial / "manifest.json").unlink()
        (final.parent / "LATEST").unlink()
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "looper", *args, *extra],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2 if not extra else 3)
        ]
        results = [(p.communicate(timeout=300), p.returncode) for p in procs]
        results = [(code, out, err) for (out, err), code in results]
        for code, _, err in results:
            assert code == 0 or (not extra and "another looper rollouts run holds" in err), err
        assert any(code == 0 and "done ->" in out for code, out, _ in results)  # one of them published it
        assert not partial.exists() and Store(tmp_path).latest("rollouts") == final.name
        manifest = Store(tmp_path).resolve("rollouts").manifest
        assert sorted(p.name for p in final.glob("shard-*.parquet")) == [
            f"shard-{j:05d}.parquet" for j in range(3)
        ]
        assert integrity.problems(final, manifest) == [] and manifest["counts"]["questions"] == 6
