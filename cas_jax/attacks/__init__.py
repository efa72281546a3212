"""Attacks on any JAX classifier, all built on one engine (`engine.ascend`).

Modules: engine (the loop), norms (the L-inf / L2 / L1 balls: engine.NORMS, engine.distance),
white_box (PGD, FGSM, CW-inf, MD), randomized (EOT, Avg-PGD), blackbox (transfer, N-Attack),
apgd, fab, square, autoattack.

    from cas_jax import attacks
    x_adv = attacks.pgd(logits_fn, x, y, eps=8/255, steps=20, key=key)
    x_adv = attacks.autoattack(logits_fn, x, y, eps=8/255, version="standard", key=key)
    # CAS-aware (adaptive): model_fn(x) -> (logits, cas_logits) and a joint loss.
    x_adv = attacks.pgd(apply_fn, x, y, eps=8/255, steps=20, key=key, loss="joint_ce", beta=2.0)
    x_adv = attacks.autoattack(apply_fn, x, y, eps=8/255, key=key, loss="joint", beta=2.0)
    # Other threat models: norm="l2" or "l1" on the white-box, randomized and APGD attacks.
    x_adv = attacks.apgd(logits_fn, x, y, eps=0.5, key=key, norm="l2")

Images are NHWC in [0, 1]; `key` is one key or one key per example (then an image's result
does not depend on the batch it is in).

The folder owns the attacks alone, pure functions of a model function, and the survivor cascade
(cascade.py) that runs an attack's compiled units on the images still standing. It may import
only the shared top-level modules (errors, losses, preemption); never models, evaluation or
anything above.
"""
from cas_jax.attacks.apgd import apgd
from cas_jax.attacks.autoattack import autoattack
from cas_jax.attacks.blackbox import n_attack, transfer
from cas_jax.attacks.engine import ascend, project
from cas_jax.attacks.fab import fab
from cas_jax.attacks.white_box import ATTACK_LOSSES, attack_loss, cw_inf, fgsm, margin_decomposition, pgd
from cas_jax.attacks.randomized import avg_pgd, eot_pgd
from cas_jax.attacks.square import square

__all__ = ["apgd", "ascend", "attack_loss", "ATTACK_LOSSES", "autoattack", "avg_pgd",
           "cw_inf", "eot_pgd", "fab", "fgsm", "margin_decomposition", "n_attack", "pgd",
           "project", "square", "transfer"]
