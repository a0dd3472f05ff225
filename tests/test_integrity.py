"""Artifacts that verify themselves (issue 12, failure 3): corrupt manifests, damaged files,
interrupted runs and dangling pointers are named, with what to do; `looper verify`; `gc --broken`."""

from __future__ import annotations

import pytest
from conftest import last_json

from looper.errors import LooperError
from looper.store.artifacts import Store, read_rows

PREPARE = ["prepare", "--source", "synthetic", "--synthetic-train", "20", "--synthetic-test", "4", "--json"]


def prepare(run_cli, workdir, *extra):
    code, out, err = run_cli(*PREPARE, "--workdir", workdir, *extra)
    assert code == 0, err
    return last_json(out)


def test_corrupt_manifest_of_an_old_version_is_named_and_recoverable(run_cli, tmp_path):
    old = prepare(run_cli, tmp_path, "--seed", "1")
    new = prepare(run_cli, tmp_path, "--seed", "2")
    manifest = tmp_path / "data" / "prepare" / old["version"] / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:40])  # cut off mid-write

    code, out, err = run_cli("status", "--workdir", tmp_path)
    assert code == 0 and "JSONDecodeError" not in out + err
    assert f"UNREADABLE MANIFEST  {manifest}: invalid JSON" in out
    assert f"{new['version']}  20" in out  # the good version is still listed

    code, _, err = run_cli("gc", "--keep", "1", "--workdir", tmp_path)
    assert code == 1 and err.count("\n") == 1
    assert f"error: {manifest}: unreadable manifest (invalid JSON" in err and "`looper gc --broken`" in err
    assert "`looper prepare --force`" in err

    # the stage that would rebuild it: an error naming the file and both ways out; --force works
    code, _, err = run_cli(*PREPARE, "--workdir", tmp_path, "--seed", "1")
    assert code == 1 and f"{manifest}: unreadable manifest" in err and "Traceback" not in err
    again = prepare(run_cli, tmp_path, "--seed", "1", "--force")
    assert again["version"] == old["version"] and not again["skipped"]
    assert Store(tmp_path).resolve("prepare", old["version"]).manifest["files"]
    assert prepare(run_cli, tmp_path, "--seed", "1")["skipped"]


def test_a_broken_input_stops_a_stage_with_a_one_line_error(run_cli, tmp_path, tiny_model_dir):
    done = prepare(run_cli, tmp_path)
    manifest = tmp_path / "data" / "prepare" / done["version"] / "manifest.json"
    manifest.write_text("{not json")
    code, out, err = run_cli("sft", "--model", tiny_model_dir, "--workdir", tmp_path, "--max-steps", "1")
    assert code == 1 and err.startswith(f"error: {manifest}: unreadable manifest (invalid JSON")
    assert "JSONDecodeError" not in err


def test_gc_broken_removes_broken_versions_and_dangling_latest(run_cli, tmp_path):
    good = prepare(run_cli, tmp_path, "--seed", "1")
    bad = prepare(run_cli, tmp_path, "--seed", "2")  # latest
    root = tmp_path / "data" / "prepare"
    (root / bad["version"] / "manifest.json").write_bytes(b"")
    (root / "0123456789ab").mkdir()  # a version dir without manifest
    code, out, _ = run_cli("gc", "--broken", "--dry-run", "--workdir", tmp_path)
    assert code == 0 and (root / bad["version"]).is_dir()
    code, out, _ = run_cli("gc", "--broken", "--workdir", tmp_path)
    assert code == 0
    assert f"broken {root / bad['version']}: manifest.json unreadable" in out
    assert f"broken {root / '0123456789ab'}: manifest.json missing" in out
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == [good["version"]]
    assert not (root / "LATEST").exists()  # it named the removed version
    code, out, _ = run_cli("status", "--workdir", tmp_path)
    assert "UNREADABLE" not in out and "DANGLING" not in out
    assert prepare(run_cli, tmp_path, "--seed", "2")["version"] == bad["version"]  # rebuilt, latest again
    assert Store(tmp_path).latest("prepare") == bad["version"]


def test_verify_and_status_find_damaged_files(run_cli, tmp_path):
    done = prepare(run_cli, tmp_path)
    path = tmp_path / "data" / "prepare" / done["version"]
    code, out, _ = run_cli("verify", "--workdir", tmp_path)
    assert code == 0 and f"ok      prepare   {done['version']}" in out
    assert "verified 1 artifact(s): 0 with problems" in out

    train = path / "train.parquet"
    data = train.read_bytes()
    train.write_bytes(data[: len(data) // 2])  # truncated to half
    code, out, _ = run_cli("verify", "prepare", "--workdir", tmp_path)
    assert code == 1 and f"CORRUPT prepare   {done['version']}" in out
    assert f"train.parquet truncated or grown ({len(data) // 2} bytes, manifest says {len(data)})" in out
    code, out, _ = run_cli("status", "--workdir", tmp_path)
    assert code == 0 and "CORRUPT" in out and "train.parquet truncated" in out
    with pytest.raises(LooperError, match=r"train.parquet: unreadable table .*looper verify"):
        read_rows(train)

    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF  # same size, other bytes: only a re-hash sees it
    train.write_bytes(bytes(flipped))
    code, out, _ = run_cli("verify", "prepare", "latest", "--workdir", tmp_path)
    assert code == 1 and "train.parquet corrupt (sha256 differs)" in out

    (path / "dev.parquet").unlink()
    code, out, _ = run_cli("verify", "prepare", done["version"], "--workdir", tmp_path)
    assert code == 1 and "dev.parquet missing" in out
    code, _, err = run_cli("verify", "nosuchstage", "--workdir", tmp_path)
    assert code == 1 and "not a stage" in err


def test_status_shows_interrupted_running_and_dangling(run_cli, tmp_path):
    done = prepare(run_cli, tmp_path)
    root = tmp_path / "data" / "prepare"
    store = Store(tmp_path)
    run = store.begin("prepare", "feedbeef0000")  # a live run in this process: its lock is held
    code, out, _ = run_cli("status", "--workdir", tmp_path)
    assert "RUNNING" in out and f"{run.path}: running (pid " in out
    (run.path / "shard-00000.parquet").write_bytes(b"done")  # it had saved something
    store.unlock("prepare", "feedbeef0000")  # as if that run had died
    code, out, _ = run_cli("status", "--workdir", tmp_path)
    assert f"INTERRUPTED  {run.path}: resumable: rerun the same command" in out
    (root / "LATEST").write_text("0a0a0a0a0a0a\n")
    code, out, _ = run_cli("status", "--workdir", tmp_path, "--json")
    assert "DANGLING LATEST latest" in out and "LATEST names a version that is not there" in out
    states = {row["version"]: row["state"] for row in last_json(out)["artifacts"]}
    assert states == {done["version"]: "ok", "feedbeef0000": "interrupted", "0a0a0a0a0a0a": "dangling"}


def test_rerun_rebuilds_a_finished_copy_with_a_damaged_file(run_cli, tmp_path):
    done = prepare(run_cli, tmp_path)
    train = tmp_path / "data" / "prepare" / done["version"] / "train.parquet"
    train.write_bytes(train.read_bytes()[:100])
    code, out, err = run_cli(*PREPARE, "--workdir", tmp_path)
    assert code == 0, err
    assert f"prepare {done['version']}: the finished copy is damaged (train.parquet truncated or grown" in out
    assert "rebuilding it" in out and not last_json(out)["skipped"]
    assert run_cli("verify", "--workdir", tmp_path)[0] == 0
    assert not list((tmp_path / "data" / "prepare").glob(".*.old-*"))  # the damaged copy is gone
