"""Models and policies: resolving a model spec (hub id, GGUF, `looper:tiny`), loading it with an adapter,
choosing a generation backend for a policy, exporting a policy.

Imports the store, data and generation wings below it; never training, eval, stages or the loop.
"""
