"""`python -m looper ...` (and `accelerate launch -m looper ...`) runs the CLI."""

from looper.cli import main

main()
