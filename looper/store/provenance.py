"""What every manifest records about the software that made it: package versions, git commit.

Kept out of `looper.store.artifacts` (which re-exports `environment`) to keep that module short.
"""

from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "pyarrow", "vllm")


def environment() -> dict[str, Any]:
    """Package versions and git commit recorded in every manifest, for traceability."""
    import platform

    import looper

    packages = {"python": platform.python_version(), "looper": looper.__version__}
    for name in PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"],
                cwd=Path(looper.__file__).parent,
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"packages": packages, "git_commit": commit}
