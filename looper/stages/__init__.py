"""One module per stage, each with a single `run(config) -> StageResult` entry point.

Stages meet only through artifacts (`looper.store.artifacts`) and the wings below them (train, eval,
generation, rewards, policy, store); a stage never imports another stage. Only `looper.loop` and the
CLI import stages.
"""

from looper.store.result import StageResult

__all__ = ["StageResult"]
