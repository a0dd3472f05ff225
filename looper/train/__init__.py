"""Training glue shared by the training stages: one TrainingRun (resume, metrics, publish), checkpoints,
distributed helpers and the GRPO arithmetic (advantages, adaptive KL, step plans).

Imports rewards, policy, generation, store and below; never eval, stages or the loop.
"""
