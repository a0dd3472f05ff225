"""Shared fixtures: run the real CLI in-process, small GSM8K-format files, the tiny model."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

SHARED_GSM8K = Path(__file__).resolve().parents[2] / "shared" / "gsm8k"


def _choose_vllm_platform() -> None:
    """vLLM (GPU-stack venv only) picks its platform once, when first imported - and TRL imports
    it along with itself - so the choice is made here, before any test module loads: with no
    CUDA device, vLLM's CPU platform, under which tests/test_vllm_contract.py builds engine configs."""
    if importlib.util.find_spec("vllm") is None or "VLLM_TARGET_DEVICE" in os.environ:
        return
    import torch

    if not torch.cuda.is_available():
        os.environ["VLLM_TARGET_DEVICE"] = "cpu"


_choose_vllm_platform()


@pytest.fixture
def run_cli(capsys, monkeypatch):
    """Run `looper ARGS...` through the console entry point; returns (exit code, stdout, stderr)."""
    from looper import cli

    monkeypatch.delenv("LOOPER_HOME", raising=False)
    monkeypatch.delenv("LOOPER_CONFIG", raising=False)
    for name in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS"):  # main sets them where unset: undone after the test
        monkeypatch.setenv(name, os.environ.get(name, ""))

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["looper", *map(str, args)])
        try:
            cli.main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        out, err = capsys.readouterr()
        return code, out, err

    return run


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def write_gsm8k(path: Path, rows: list[dict | str]) -> Path:
    """A GSM8K-format JSONL file; str rows are written verbatim (for malformed lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def make_rows(n: int, start: int = 0) -> list[dict]:
    return [
        {
            "question": f"Ann has {i} apples and buys 2 more. How many apples does she have?",
            "answer": f"Ann has {i} + 2 = <<{i}+2={i + 2}>>{i + 2} apples.\n#### {i + 2}",
        }
        for i in range(start, start + n)
    ]


@pytest.fixture
def gsm8k_dir(tmp_path) -> Path:
    """A small GSM8K-format source directory: 50 train, 10 test questions, no overlap."""
    src = tmp_path / "src"
    write_gsm8k(src / "train.jsonl", make_rows(50))
    write_gsm8k(src / "test.jsonl", make_rows(10, start=1000))
    return src


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from looper.policy.tiny import tiny_model

    return tiny_model(tmp_path_factory.mktemp("tiny") / "model")
