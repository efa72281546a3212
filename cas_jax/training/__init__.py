"""Training: the train state, the jit-compiled `train_step` and the loop that checkpoints it.

Owns `train.create_train_state`, `train.train_step` (the adversary's PGD loop and the combined
CAS objective in one compiled program, data-parallel over every device),
`train.train_and_evaluate` (resume, preemption, divergence, per-epoch robust accuracy) and the
metric writers (JSON lines, TensorBoard). It may import `cas_jax.evaluation` (the per-epoch
check), `cas_jax.attacks`, `cas_jax.models` and the shared top-level modules; never analysis or
experiments.
"""
