"""cas_jax: Channel-wise Activation Suppressing (ICLR 2021) and adversarial training in JAX.

    import cas_jax
    entry, report = cas_jax.benchmark("model.pt", arch="wrn", eps="8/255", n_examples=1000)
"""

__version__ = "0.1.0"


def __getattr__(name):
  """`cas_jax.benchmark`, imported on first use (importing cas_jax stays free of JAX)."""
  if name == "benchmark":
    from cas_jax.evaluation.benchmark import benchmark  # pylint: disable=g-import-not-at-top
    return benchmark
  raise AttributeError(f"module 'cas_jax' has no attribute {name!r}")
