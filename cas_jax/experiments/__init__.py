"""Experiments: one command per paper table, from settings to runs to tables.

Owns the driver (`driver`: the settings of every table and figure, `cas-jax-experiments`), the
runs of a setting (`runs`: reuse, train, evaluate with a cache), the tables and plots (`tables`)
and their paired statistics (`statistics`). It sits on top: it may import `cas_jax.training`,
`cas_jax.evaluation`, `cas_jax.attacks`, `cas_jax.models` and the shared top-level modules;
nothing imports it but the console entry point.
"""
