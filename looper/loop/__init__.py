"""`looper loop`: rounds of rollouts -> ppo (or dpo / sft on rollouts) -> dev eval, built on the stages.

The only wing that imports `looper.stages`; only the CLI imports it.
"""
