"""A full disk says so (issue 12, failure 8): `no space left on <path> (needs ~X MB)`, nothing
half-written, and the run resumes once there is room. Uses a real small tmpfs (skipped where
this process may not mount one)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from conftest import last_json

from looper.errors import LooperError
from looper.store import disk
from looper.store.artifacts import atomic_write_bytes, read_rows, write_parquet


def mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip() or 'not permitted'})")


@pytest.fixture
def small_disk(tmp_path):
    path = tmp_path / "fs"
    mount_tmpfs(path, "256k")
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path) -> Path:
    """Take every free byte of the file system holding `path`."""
    filler = path / "filler"
    with open(filler, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError:
            pass
    return filler


SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string())])


def test_table_and_json_writes_on_a_full_disk(small_disk):
    rows = [{"id": str(i), "text": os.urandom(500).hex()} for i in range(400)]  # ~400 KB: more than fits
    write_parquet(small_disk / "kept.parquet", rows[:2], SCHEMA)
    with pytest.raises(disk.NoSpace) as err:
        write_parquet(small_disk / "shard.parquet", rows, SCHEMA)
    assert str(err.value).startswith(f"no space left on {small_disk} (needs ~1 MB)")
    assert sorted(p.name for p in small_disk.iterdir()) == ["kept.parquet"]  # no temp file, old file whole
    assert read_rows(small_disk / "kept.parquet") == rows[:2]

    fill(small_disk)
    with pytest.raises(LooperError, match=rf"^no space left on {small_disk} \(needs ~1 MB\)"):
        atomic_write_bytes(small_disk / "manifest.json", b"{}" * 1000)
    assert not (small_disk / "manifest.json").exists()


def test_torch_save_on_a_full_disk_says_so(small_disk):
    """torch's own message is `[enforce fail at inline_container.cc] ...` with no errno."""
    with pytest.raises(disk.NoSpace, match=rf"^no space left on {small_disk} \(needs ~4 MB\)"):
        with disk.space_for(small_disk, 4 * 2**20):
            torch.save({"w": torch.zeros(1 << 20)}, small_disk / "optimizer.pt")


def test_sft_on_a_disk_that_fills_up_stops_cleanly_then_resumes(
    run_cli, tiny_model_dir, tmp_path, monkeypatch
):
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    from looper.config import PrepareConfig
    from looper.stages import prepare
    from looper.train import runner

    home = tmp_path / "home"
    mount_tmpfs(home, "64m")
    try:
        prepare.run(
            PrepareConfig(source="synthetic", synthetic_train=50, synthetic_test=10, workdir=str(home))
        )
        reference_home = tmp_path / "reference"
        shutil.copytree(home, reference_home)
        args = [
            "sft",
            "--model",
            tiny_model_dir,
            "--batch-size",
            "4",
            "--grad-accum",
            "1",
            "--dev-limit",
            "4",
        ]
        args += [
            "--eval-steps",
            "100",
            "--no-gradient-checkpointing",
            "--max-steps",
            "6",
            "--save-steps",
            "3",
        ]
        args += ["--logging-steps", "1", "--json"]
        code, out, err = run_cli(*args, "--workdir", reference_home)
        assert code == 0, err
        reference = last_json(out)

        class FillAfterFirstSave(TrainerCallback):  # another job takes the disk after checkpoint-3
            def on_save(self, args, state, control, **kwargs):
                if state.global_step == 3:
                    fill(home)

        real_callbacks = runner.TrainingRun.callbacks
        monkeypatch.setattr(
            runner.TrainingRun, "callbacks", lambda job: [*real_callbacks(job), FillAfterFirstSave()]
        )
        code, out, err = run_cli(*args, "--workdir", home)
        assert code == 1 and err.count("\n") == 1, err
        assert err.startswith("error: no space left on ") and " MB): free some space" in err
        assert "Traceback" not in err and "enforce fail" not in err

        monkeypatch.setattr(runner.TrainingRun, "callbacks", real_callbacks)
        (home / "filler").unlink()  # room again
        code, out, err = run_cli(*args, "--workdir", home)
        assert code == 0, err
        assert "sft: resuming from checkpoint-3" in out
        resumed = last_json(out)
        a = load_file(f"{reference['path']}/adapter_model.safetensors")
        b = load_file(f"{resumed['path']}/adapter_model.safetensors")
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6)
    finally:
        subprocess.run(["umount", "-l", str(home)], check=False)


def test_read_only_home_reads_and_refuses_writes_in_one_line(run_cli, tmp_path):
    home = tmp_path / "ro"
    mount_tmpfs(home, "16m")
    try:
        args = ["prepare", "--source", "synthetic", "--synthetic-train", "20", "--synthetic-test", "4"]
        assert run_cli(*args, "--workdir", home)[0] == 0
        subprocess.run(["mount", "-o", "remount,ro", str(home)], check=True)
        code, out, err = run_cli(*args, "--workdir", home)
        assert code == 0 and "up to date, skipped" in out, err  # finished work still reads
        assert run_cli("status", "--workdir", home)[0] == 0
        code, _, err = run_cli(*args, "--seed", "7", "--workdir", home)
        assert code == 1 and err.count("\n") == 1
        assert err.startswith(f"error: cannot write in {home / 'data' / 'prepare'} (Read-only file system)")
    finally:
        subprocess.run(["umount", "-l", str(home)], check=False)
