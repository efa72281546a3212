"""Flax CAS networks (placeholder until the models land)."""
