"""cas_jax: Channel-wise Activation Suppressing (ICLR 2021) and adversarial training in JAX."""

__version__ = "0.1.0"
