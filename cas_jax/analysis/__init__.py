"""Analysis: the paper's channel analyses of a trained model and their figures.

Owns the statistics of the features (`channels`: magnitude, activation frequency, class
separation, `analyze_workdir` behind `--mode=analyze`) and their drawing (`figures`: PNG and JSON).
It may import `cas_jax.evaluation` (the report's formats), `cas_jax.attacks`, `cas_jax.models`
and the shared top-level modules; never training or experiments.
"""
