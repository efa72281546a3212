"""Evaluation: what turns attacks into a verdict on a model.

Owns the attack names and budgets (`attack_registry`), the plan that turns names into compiled
units of the survivor cascade (`attack_plan`), the robustness report with its sanity checks and
costs (`report`), and the entry points `evaluate.robustness_report(model_fn, x, y)` and
`evaluate.evaluate_workdir(config, workdir)`. It may import `cas_jax.attacks`, `cas_jax.models`
and the shared top-level modules (configs, errors, input_pipeline, losses, provenance,
checkpointing, preemption); never training, analysis or experiments.
"""
