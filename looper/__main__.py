"""`python -m looper ...` (and `accelerate launch -m looper ...`) runs the CLI."""

from looper.store import faults

faults.install_kill_hook()  # test-only: LOOPER_KILL_AT / LOOPER_KILL_LOG (tests/faults/test_killpoints.py)

from looper.cli import main  # noqa: E402

main()
