"""AutoAttack (Croce & Hein, ICML 2020), L-inf, in JAX, with CAS-aware (joint-loss) variants.

The standard version runs APGD-CE, APGD-T (9 target classes), FAB-T (9 target classes) and
Square (5000 queries) in turn; each stage attacks only the images that every earlier stage
left robust. The "rand" version, for randomized defenses, runs APGD-CE and APGD-DLR with
EOT over 20 draws of `model_fn(x, keys)` (one key per example, as attacks/randomized.py).

    x_adv = autoattack(model_fn, x, y, eps=8/255, key=key)
    x_adv, robust = autoattack(model_fn, x, y, eps=8/255, key=key, loss="joint",
                               return_per_attack=True)
    robust["square"].mean()      # robust accuracy after the whole ensemble
    x_adv = autoattack(random_model_fn, x, y, eps=8/255, key=key, version="rand")

loss="joint" makes the APGD stages ascend the joint losses of the main and CAS heads (CE,
targeted DLR, DLR; weight `beta`); FAB-T linearises the main head's z_t - z_y, whose
gradient passes through the CAS masks either way, and Square uses the main-head margin.
Inside each attack, the images still robust are gathered at the Python level and padded
to N, N/2, N/4 or N/8 rows, never fewer than 32 (engine.run_on_subset): at most 4
compilations per attack and batch size N, none per exact count, for at most twice the rows.
Compiled runs are cached per model_fn object: pass the same one across batches, or better a
jax.tree_util.Partial(apply_fn, variables), whose weights are then traced inputs (not
constants baked into each program) and whose compilations survive new weights.
"""
import functools
from typing import Callable, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from cas_jax.attacks import engine
from cas_jax.attacks.apgd import apgd
from cas_jax.attacks.engine import predict
from cas_jax.attacks.fab import fab
from cas_jax.attacks.square import square

Array = jax.Array
# Position in ATTACKS is each attack's fold_in tag: an image's randomness in one attack does
# not depend on which other attacks ran.
ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square", "apgd-dlr")
VERSIONS = {"standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
            "rand": ("apgd-ce", "apgd-dlr")}
LOSS_MODES = ("main", "joint")
_PREDICT_STREAM = len(ATTACKS)

# An attack stage: (x, y, keys, active) -> x_adv; it attacks the `active` images only.
Stage = Callable[[Array, Array, Array, np.ndarray], Array]


def run_stages(stages: Sequence[Tuple[str, Stage]], x: Array, y: Array, keys: Array,
               predict_fn):
  """Run (name, stage) pairs in order, each on the images still robust after the ones before.

  predict_fn(x, keys) -> logits decides robustness. Returns x_adv (the first adversarial
  example found per image, else x) and {"clean": flags, name: flags after that stage, ...}.
  """
  robust = np.asarray(jnp.argmax(predict_fn(x, keys), -1) == y)
  per_attack, x_adv = {"clean": robust}, x
  for name, stage in stages:
    if robust.any():
      x_stage = stage(x, y, keys, robust)
      fooled = robust & np.asarray(jnp.argmax(predict_fn(x_stage, keys), -1) != y)
      x_adv = jnp.where(engine.per_image(fooled, x), x_stage, x_adv)
      robust = robust & ~fooled
    per_attack[name] = robust
  return x_adv, per_attack


def autoattack(model_fn, x: Array, y: Array, *, eps=8 / 255, version: str = "standard",
               key: Array, loss: str = "main", beta: float = 2.0,
               attacks: Optional[Sequence[str]] = None, return_per_attack: bool = False,
               apgd_steps: int = 100, fab_steps: int = 100, square_queries: int = 5000,
               target_classes: int = 9, eot_draws: int = 20):
  """AutoAttack; with return_per_attack, also {"clean" and each attack: robust flags after it}.

  `attacks` overrides the version's list (run in the order given), e.g. ("apgd-ce", "square").
  The step, query, target and draw counts default to AutoAttack's; tests make them small.
  """
  x, y = engine.check_images_and_labels(x, y)
  engine.check_eps(eps)
  if version not in VERSIONS:
    raise ValueError(f"unknown version {version!r}; valid: {', '.join(VERSIONS)}")
  if loss not in LOSS_MODES:
    raise ValueError(f"unknown loss {loss!r}; valid: 'main' (every attack on the main logits) "
                     "or 'joint' (APGD on the joint losses of the main and CAS heads)")
  names = VERSIONS[version] if attacks is None else tuple(attacks)
  unknown = [a for a in names if a not in ATTACKS]
  if unknown or not names:
    raise ValueError(f"unknown attacks {unknown or names}; valid: {', '.join(ATTACKS)}")
  randomized = version == "rand"
  if randomized and set(names) - set(VERSIONS["rand"]):
    raise ValueError(f"version='rand' runs gradient attacks with EOT only: "
                     f"{', '.join(VERSIONS['rand'])}; got {', '.join(names)}")
  if target_classes < 1:
    raise ValueError(f"target_classes={target_classes} must be >= 1 (AutoAttack uses 9)")

  keys = engine.example_keys(key, x.shape[0])
  predict_fn = lambda z, ks: predict(model_fn, z, engine.fold_keys(ks, _PREDICT_STREAM), randomized)
  num_classes = jax.eval_shape(predict_fn, x, keys).shape[-1]
  ranks = range(2, min(target_classes, num_classes - 1) + 2)
  joint = loss == "joint"
  eot = eot_draws if randomized else None
  builders: Dict[str, Callable] = {
      "apgd-ce": functools.partial(apgd, loss="joint_ce" if joint else "ce", steps=apgd_steps,
                                   beta=beta, eot=eot),
      "apgd-dlr": functools.partial(apgd, loss="joint_dlr" if joint else "dlr",
                                    steps=apgd_steps, beta=beta, eot=eot),
      "apgd-t": functools.partial(apgd, loss="joint_targeted_dlr" if joint else "targeted_dlr",
                                  steps=apgd_steps, beta=beta, target_ranks=ranks),
      "fab-t": functools.partial(fab, steps=fab_steps, target_ranks=ranks),
      "square": functools.partial(square, queries=square_queries),
  }

  def stage(name):
    tag = ATTACKS.index(name)
    return lambda xs, ys, ks, active: builders[name](
        model_fn, xs, ys, eps=eps, key=engine.fold_keys(ks, tag), active=active)

  x_adv, per_attack = run_stages([(n, stage(n)) for n in names], x, y, keys, predict_fn)
  return (x_adv, per_attack) if return_per_attack else x_adv
