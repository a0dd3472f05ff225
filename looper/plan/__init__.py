"""`looper plan`: the pipeline-file checks, the environment checks and the GPU memory estimates.

Imports generation, regime_w, data, store and below; never training, eval, stages or the loop.
"""
