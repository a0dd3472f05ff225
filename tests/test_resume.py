"""Resume that never gets stuck (issue 12, failures 2 and 8): incomplete checkpoints are
skipped, damaged shards and eval chunks regenerated, resumed manifests count the whole run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import last_json
from safetensors.torch import load_file, save_file

from looper.train import checkpoints, runner

SFT_FAST = ["--batch-size", "4", "--grad-accum", "1", "--dev-limit", "4", "--eval-steps", "100"]
SFT_FAST += ["--no-gradient-checkpointing", "--learning-rate", "1e-2"]


def fake_checkpoint(trainer_dir: Path, step: int) -> Path:
    """A checkpoint laid out as transformers writes one (weights, optimizer, trainer state last)."""
    folder = trainer_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    save_file({"lora_A": torch.ones(4, 4)}, folder / "adapter_model.safetensors")
    torch.save({"state": {0: torch.zeros(4, 4)}}, folder / "optimizer.pt")
    torch.save({"last_epoch": step}, folder / "scheduler.pt")
    torch.save({"cpu": torch.random.get_rng_state()}, folder / "rng_state.pth")
    (folder / "looper_totals.json").write_text(json.dumps({"step": step, "loss_sum": 1.0, "tokens": 10}))
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return folder


def cut(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda c: (c / "trainer_state.json").unlink(), "trainer_state.json missing"),
        (lambda c: (c / "trainer_state.json").write_text('{"global_st'), "trainer_state.json unreadable"),
        (lambda c: (c / "optimizer.pt").unlink(), "optimizer.pt missing"),
        (lambda c: cut(c / "optimizer.pt"), "optimizer.pt unreadable"),
        (lambda c: (c / "adapter_model.safetensors").unlink(), "no weights"),
        (lambda c: cut(c / "adapter_model.safetensors"), "adapter_model.safetensors"),
        # issue 22 item 5: resumed silently before, publishing another adapter under the same version
        (lambda c: (c / "scheduler.pt").unlink(), "scheduler.pt missing"),
        (lambda c: cut(c / "scheduler.pt"), "scheduler.pt unreadable"),
        (lambda c: (c / "rng_state.pth").unlink(), "rng_state.pth missing"),
        (lambda c: cut(c / "rng_state.pth"), "rng_state.pth unreadable"),
        # killed before the run totals were written: the manifest would count tokens since the resume only
        (lambda c: (c / "looper_totals.json").unlink(), "looper_totals.json missing"),
        (lambda c: cut(c / "looper_totals.json"), "looper_totals.json missing or unreadable"),
    ],
)
def test_incomplete_checkpoint_is_skipped_for_the_previous_one(tmp_path, capsys, damage, reason):
    fake_checkpoint(tmp_path, 3)
    newest = fake_checkpoint(tmp_path, 6)
    damage(newest)
    assert runner.last_checkpoint(tmp_path, "sft") == str(tmp_path / "checkpoint-3")
    out = capsys.readouterr().out
    assert out.startswith(f"sft: skipping incomplete checkpoint-6 ({reason}")
    assert not newest.exists()  # removed: the trainer's rotation must not keep or pick it later
    assert checkpoints.checkpoint_problem(tmp_path / "checkpoint-3") is None


def test_no_complete_checkpoint_starts_over(tmp_path, capsys):
    (fake_checkpoint(tmp_path, 2) / "optimizer.pt").unlink()
    assert runner.last_checkpoint(tmp_path, "ppo") is None
    assert "ppo: skipping incomplete checkpoint-2 (optimizer.pt missing)" in capsys.readouterr().out


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from looper.config import PrepareConfig
    from looper.stages import prepare

    workdir = tmp_path_factory.mktemp("work")
    prepare.run(
        PrepareConfig(source="synthetic", synthetic_train=50, synthetic_test=10, workdir=str(workdir))
    )
    return workdir


def test_sft_resumes_past_a_checkpoint_cut_off_mid_save(
    run_cli, prepared, tiny_model_dir, tmp_path, monkeypatch
):
    """ppo killed mid-save / sft on a full disk left a checkpoint without its trainer state:
    every rerun failed on it. Now it resumes from the one before, with the same adapter and
    the same whole-run train_loss and train_tokens as an uninterrupted run."""
    from trl import SFTTrainer as Trainer

    args = ["sft", "--model", tiny_model_dir, *SFT_FAST, "--max-steps", "8", "--save-steps", "3", "--json"]
    straight, broken = tmp_path / "a", tmp_path / "b"
    shutil.copytree(prepared, straight)
    shutil.copytree(prepared, broken)
    code, out, err = run_cli(*args, "--workdir", straight)
    assert code == 0, err
    reference = last_json(out)

    original_step, calls = Trainer.training_step, {"n": 0}

    def crash_in_step_seven(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt  # after checkpoint-3 and checkpoint-6
        return original_step(self, *a, **k)

    monkeypatch.setattr(Trainer, "training_step", crash_in_step_seven)
    assert run_cli(*args, "--workdir", broken)[0] == 130
    monkeypatch.setattr(Trainer, "training_step", original_step)
    trainer_dir = next((broken / "checkpoints" / "sft").glob("*.partial")) / "trainer"
    (trainer_dir / "checkpoint-6" / "trainer_state.json").unlink()  # the save that never finished

    code, out, err = run_cli(*args, "--workdir", broken)
    assert code == 0, err
    assert "sft: skipping incomplete checkpoint-6 (trainer_state.json missing)" in out
    assert "sft: resuming from checkpoint-3" in out
    resumed = last_json(out)
    assert resumed["counts"]["train_tokens"] == reference["counts"]["train_tokens"]
    assert resumed["metrics"]["train_loss"] == pytest.approx(reference["metrics"]["train_loss"], rel=1e-4)
    a = load_file(f"{reference['path']}/adapter_model.safetensors")
    b = load_file(f"{resumed['path']}/adapter_model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6)


def test_rollouts_regenerate_a_truncated_shard_and_say_what_they_resume(run_cli, tiny_model_dir, tmp_path):
    from test_rollouts import FAST, rows_of

    from looper.config import PrepareConfig
    from looper.stages import prepare

    prepare.run(
        PrepareConfig(source="synthetic", synthetic_train=30, synthetic_test=6, workdir=str(tmp_path))
    )
    args = ["rollouts", "--model", tiny_model_dir, "--workdir", tmp_path, *FAST, "--limit", "6"]
    code, out, err = run_cli(*args, "--shard-size", "2", "--json")
    assert code == 0, err
    done = last_json(out)
    straight = rows_of(done["path"])

    # what a kill at commit leaves, with one shard cut off by a full disk
    final = Path(done["path"])
    partial = final.with_name(final.name + ".partial")
    final.rename(partial)
    (partial / "manifest.json").unlink()
    (final.parent / "LATEST").unlink()
    cut(partial / "shard-00001.parquet")

    code, out, err = run_cli(*args, "--shard-size", "2", "--json")
    assert code == 0, err
    assert f"rollouts: {partial / 'shard-00001.parquet'} does not read back whole (" in out
    assert f"rollouts: resuming {partial}: 2 of 3 chunks already done" in out
    again = rows_of(last_json(out)["path"])
    assert [r["id"] for r in again] == [r["id"] for r in straight]
    assert [[o["text"] for o in r["arm_outputs"]] for r in again] == [
        [o["text"] for o in r["arm_outputs"]] for r in straight
    ]


def test_eval_regenerates_a_truncated_chunk_and_says_so(run_cli, tiny_model_dir, tmp_path):
    from looper.config import PrepareConfig
    from looper.stages import prepare

    prepare.run(
        PrepareConfig(source="synthetic", synthetic_train=30, synthetic_test=6, workdir=str(tmp_path))
    )
    args = [
        "eval",
        "--model",
        tiny_model_dir,
        "--workdir",
        tmp_path,
        "--compare",
        "base",
        "--max-new-tokens",
        "4",
    ]
    code, out, err = run_cli(*args, "--json")
    assert code == 0, err
    first = last_json(out)
    chunk = next((tmp_path / "data" / "eval" / "cache").rglob("chunk-00000.parquet"))
    cut(chunk)
    shutil.rmtree(first["path"])
    (tmp_path / "data" / "eval" / "LATEST").unlink()

    code, out, err = run_cli(*args, "--json")
    assert code == 0, err
    assert f"eval: base: resuming from 1 cached chunk(s) in {chunk.parent}" in out
    assert f"eval: {chunk} does not read back whole (" in out
    assert last_json(out)["metrics"] == first["metrics"]


def test_metrics_line_cut_off_by_a_kill_does_not_block_resume(tmp_path):
    fake_checkpoint(tmp_path / "trainer", 2)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_bytes(b'{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert runner.resume_point(tmp_path / "trainer", metrics, "sft") == str(
        tmp_path / "trainer" / "checkpoint-2"
    )
    assert metrics.read_bytes() == b'{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
