"""The thread policy `looper` chooses before torch loads (`looper.threads`): PASSIVE waits and the
affinity's core count, each unless the user's environment says otherwise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from looper.threads import apply_thread_policy

ROOT = Path(__file__).resolve().parents[1]


def test_policy_fills_only_what_the_environment_lacks(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    env = {}
    assert apply_thread_policy(env) == {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "3"}
    assert env == {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "3"}
    users = {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "1"}
    assert apply_thread_policy(users) == {} and users == {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "1"}
    empty = {"OMP_NUM_THREADS": ""}  # an empty value counts as unset
    assert apply_thread_policy(empty)["OMP_NUM_THREADS"] == "3"


# Runs `looper --help` through the console entry point in a fresh interpreter, then loads torch.
# OMP_DISPLAY_ENV makes OpenMP (libgomp) print the settings it read when torch loaded it.
PROBE = """
import json, os, sys
sys.argv = ["looper", "--help"]
from looper import cli
torch_before = "torch" in sys.modules
try:
    cli.main()
except SystemExit:
    pass
import torch
print(json.dumps({"torch_before": torch_before, "threads": torch.get_num_threads(),
                  "wait": os.environ.get("OMP_WAIT_POLICY"), "num": os.environ.get("OMP_NUM_THREADS")}))
"""


def probe(**env: str) -> tuple[dict, str]:
    """(what the probe saw, what OpenMP says it read)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        env=base | {"PYTHONPATH": str(ROOT), "OMP_DISPLAY_ENV": "TRUE"} | env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stdout + done.stderr


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="needs CPU affinity (Linux)")
def test_cli_sets_the_policy_before_torch_loads():
    seen, openmp = probe()
    cores = str(len(os.sched_getaffinity(0)))
    assert seen["torch_before"] is False and seen["wait"] == "PASSIVE" and seen["num"] == cores
    assert "OMP_WAIT_POLICY = 'PASSIVE'" in openmp and f"OMP_NUM_THREADS = '{cores}'" in openmp


def test_the_users_thread_settings_win():
    seen, openmp = probe(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="ACTIVE")
    assert seen == {"torch_before": False, "threads": 1, "wait": "ACTIVE", "num": "1"}
    assert "OMP_WAIT_POLICY = 'ACTIVE'" in openmp and "OMP_NUM_THREADS = '1'" in openmp
