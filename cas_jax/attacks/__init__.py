"""Attacks on any JAX classifier, all built on one engine (`engine.ascend`)."""
