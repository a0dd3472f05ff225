"""Rewards in TRL's signature: the registry of plain reward functions, weight schedules, the adapter
that hands them to TRL trainers, and the per-question summaries.

Imports regime_w, the store and the top-level helpers; never training, eval, stages or the loop.
"""
