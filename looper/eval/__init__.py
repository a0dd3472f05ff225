"""Evaluation pieces the eval stage composes: questions and prompts, cached scored completions, the report.

Imports policy, generation, data, store and below; never training, stages or the loop.
"""
