"""Looper: staged post-training of reasoning LLMs on grade-school math.

prepare -> sft -> rollouts (Regime W) -> ppo -> eval; each stage reads and writes
versioned artifacts (see `looper.store.artifacts`) so any stage can be rerun on its own.
"""

__version__ = "0.1.0"
