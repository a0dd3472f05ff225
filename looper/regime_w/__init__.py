"""Regime W: coherence scores over several sampled "arms" per question, and the RL rewards built on them.

See :mod:`looper.regime_w.scoring` (pure per-question scores) and
:mod:`looper.regime_w.reward` (question- and arm-level rewards).
"""
