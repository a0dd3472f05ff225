"""The CLI surface: help, not-yet-built commands, errors, config files, status."""

from __future__ import annotations

import subprocess
import sys

from conftest import last_json


def test_help_lists_commands_and_defaults(run_cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # rich wraps help text to the terminal width
    code, out, _ = run_cli("--help")
    assert code == 0
    for command in ("prepare", "sft", "rollouts", "ppo", "eval", "status"):
        assert command in out
    code, out, _ = run_cli("prepare", "--help")
    assert code == 0 and "[default: 0.2]" in out and "--skip-bad" in out


def test_config_file_supplies_defaults_and_cli_overrides(run_cli, gsm8k_dir, tmp_path):
    pipeline = tmp_path / "p.toml"
    pipeline.write_text(f"[common]\nseed = 4\n[prepare]\nsource = '{gsm8k_dir}'\ndev_fraction = 0.1\n")
    code, out, err = run_cli("--config", pipeline, "prepare", "--workdir", tmp_path, "--json")
    assert code == 0, err
    assert last_json(out)["counts"]["dev"] == 5
    code, out, _ = run_cli(
        "--config", pipeline, "prepare", "--dev-fraction", "0.2", "--workdir", tmp_path, "--json"
    )
    assert last_json(out)["counts"]["dev"] == 10


def test_unknown_config_key_is_one_line_error(run_cli, tmp_path):
    pipeline = tmp_path / "p.toml"
    pipeline.write_text("[prepare]\nsed = 1\n")
    code, _, err = run_cli("--config", pipeline, "prepare", "--workdir", tmp_path)
    assert code == 1 and "unknown key 'sed' in [prepare]" in err and len(err.strip().splitlines()) == 1


def test_looper_home_sets_workdir(run_cli, gsm8k_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LOOPER_HOME", str(tmp_path / "home"))
    code, out, err = run_cli("prepare", "--source", gsm8k_dir, "--json")
    assert code == 0, err
    assert last_json(out)["path"].startswith(str(tmp_path / "home" / "data" / "prepare"))


def test_status_shows_artifacts_and_staleness(run_cli, gsm8k_dir, tmp_path):
    from looper.store.artifacts import Store

    _, out, _ = run_cli("prepare", "--source", gsm8k_dir, "--workdir", tmp_path, "--json")
    store = Store(tmp_path)
    prep = store.resolve("prepare")
    run = store.begin("sft", "s1")
    (run.path / "adapter.bin").write_bytes(b"w")
    run.commit(config={}, inputs={"prepare": prep}, identity={})
    code, out, _ = run_cli("status", "--workdir", tmp_path, "--json")
    rows = {r["stage"]: r for r in last_json(out)["artifacts"]}
    assert code == 0 and rows["sft"]["stale"] == [] and rows["prepare"]["latest"]
    run_cli("prepare", "--source", gsm8k_dir, "--workdir", tmp_path, "--seed", "9")
    _, out, _ = run_cli("status", "--workdir", tmp_path, "--json")
    assert {r["stage"]: r for r in last_json(out)["artifacts"]}["sft"]["stale"] == ["prepare"]


def test_console_script_unexpected_error_is_one_line(tmp_path):
    """A real subprocess: the installed entry point, exit code and stderr as a user sees them."""
    workdir = tmp_path / "file-not-dir"
    workdir.write_text("x")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "looper",
            "prepare",
            "--source",
            "synthetic",
            "--synthetic-train",
            "10",
            "--synthetic-test",
            "2",
            "--workdir",
            str(workdir),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "--debug" in proc.stderr
