"""FAB (Croce & Hein, ICML 2020), L-inf/L2/L1: AutoAttack's minimal-perturbation attack.

Each iteration linearises g(x) = z_t(x) - z_y(x) of the main head at the current point,
projects both that point and the clean image onto the hyperplane g = 0 (inside [0, 1]),
and steps to a convex combination biased towards the clean image; once an iterate is
misclassified it is kept if it is the smallest yet and the iterate is pulled back towards x.
FAB-T fixes the class t (a target rank by the clean logits); untargeted FAB (AutoAttack
plus) takes, at every iteration, the class whose linearised boundary is the closest in the
norm (|g_k| over the dual norm of its gradient, one backward pass per class, as the
reference). On a CAS model the gradient of g passes through the CAS masks like any other layer.

    x_adv = fab(model_fn, x, y, eps=8/255, key=key, target_ranks=range(2, 11))   # FAB-T
    x_adv = fab(model_fn, x, y, eps=8/255, key=key, target_ranks=None, restarts=5)  # FAB

An image counts as fooled when the smallest adversarial found lies within eps; the result is
that example, and x elsewhere. `key` (one key or N keys) only seeds restarts after the first.
`norm` ("linf", "l2" or "l1") picks the projection, the sizes that weigh the step towards x,
the smallest-adversarial bookkeeping, the eps check and the restarts' random start.
"""
import functools
from typing import Sequence, Union

import jax
import jax.numpy as jnp

import numpy as np

from cas_jax import errors
from cas_jax.attacks import cascade
from cas_jax.attacks import engine
from cas_jax.attacks import norms
from cas_jax.attacks.apgd import ranked_targets
from cas_jax.attacks.engine import jit_with_model, predict
from cas_jax.attacks.fab_projections import (project_onto_hyperplane_l1,
                                             project_onto_hyperplane_l2,
                                             project_onto_hyperplane_linf)

Array = jax.Array

_PROJECTIONS = {"linf": project_onto_hyperplane_linf, "l2": project_onto_hyperplane_l2,
                "l1": project_onto_hyperplane_l1}
# The norm a hyperplane's distance divides by: the dual of the attack's.
_DUAL = {"linf": "l1", "l2": "l2", "l1": "linf"}


def _random_start(keys: Array, x: Array, radius, norm: str) -> Array:
  """A restart's start on the radius-sphere, as the reference: a uniform (L-inf) or Gaussian
  (L2, L1) direction scaled to length radius in the norm; clipped to [0, 1]."""
  sample = ((lambda k, s: jax.random.uniform(k, s, x.dtype, -1.0, 1.0)) if norm == "linf"
            else (lambda k, s: jax.random.normal(k, s, x.dtype)))
  direction = engine.per_example(sample, keys, x.shape)
  return jnp.clip(x + radius * norms.normalize(direction, norm), 0.0, 1.0)


def _into_ball(x_adv: Array, x: Array, eps, norm: str) -> Array:
  """x_adv into the eps-ball around x (and [0, 1]): L-inf clips, L2 and L1 shrink x_adv - x."""
  if norm == "linf":
    return engine.project(x_adv, x, eps)
  size = norms.norm_of((x_adv - x).reshape(x.shape[0], -1), norm)
  shrunk = x + (x_adv - x) * engine.per_image(eps / jnp.maximum(size, 1e-12), x)
  return jnp.where(engine.per_image(size > eps, x), shrunk, x_adv)


def _target_boundary(logits_fn, z: Array, y: Array, targets: Array, norm: str):
  """(w, g) of g(z) = z_t - z_y at z: its per-image gradient (N, D) and value (N,)."""
  rows = jnp.arange(z.shape[0])

  def gap(v):
    logits = logits_fn(v)
    per_example = logits[rows, targets] - logits[rows, y]
    return jnp.sum(per_example), per_example

  grad, value = jax.grad(gap, has_aux=True)(z)
  return grad.reshape(z.shape[0], -1), value


def _closest_boundary(logits_fn, z: Array, y: Array, targets, norm: str):
  """(w, g) of the class k != y whose linearised boundary z_k = z_y is the closest to z:
  the smallest |z_k - z_y| / (1e-12 + dual norm of its gradient), the first on a tie.

  One forward pass and a backward pass per class (plus one for z_y), each class's gradient
  in turn, so memory holds two gradients whatever the number of classes.
  """
  del targets
  n = z.shape[0]
  rows = jnp.arange(n)
  logits, pullback = jax.vjp(logits_fn, z)
  grad_of = lambda classes: pullback(jax.nn.one_hot(classes, logits.shape[-1],
                                                    dtype=logits.dtype))[0].reshape(n, -1)
  grad_y, logit_y = grad_of(y), logits[rows, y]

  def visit(k, best):
    w = grad_of(jnp.full((n,), k)) - grad_y
    value = logits[:, k] - logit_y
    dist = jnp.abs(value) / (1e-12 + norms.norm_of(w, _DUAL[norm]))
    closer = (dist < best[2]) & (k != y)
    return (jnp.where(closer[:, None], w, best[0]), jnp.where(closer, value, best[1]),
            jnp.where(closer, dist, best[2]))

  w, value, _ = jax.lax.fori_loop(0, logits.shape[-1], visit,
                                  (jnp.zeros_like(grad_y), jnp.zeros_like(logit_y),
                                   jnp.full((n,), jnp.inf, logits.dtype)))
  return w, value


@jit_with_model("steps", "alpha_max", "eta", "backtrack", "norm")
def fab_run(model_fn, x: Array, y: Array, targets, x_start: Array, *, steps: int,
            alpha_max: float = 0.1, eta: float = 1.05, backtrack: float = 0.9,
            norm: str = "linf"):
  """One FAB run towards `targets` (FAB-T), or with targets=None towards the closest
  boundary (untargeted FAB): (smallest adversarial found, its `norm` size or inf)."""
  n = x.shape[0]
  flat = lambda a: a.reshape(n, -1)
  per_image = lambda v: v.reshape((n,) + (1,) * (x.ndim - 1))
  logits_fn = lambda z: engine.main_logits(model_fn, z)
  boundary = _closest_boundary if targets is None else _target_boundary

  def body(_, s):
    x1, best, dist = s
    w, value = boundary(logits_fn, x1, y, targets, norm)
    b = jnp.sum(w * flat(x1), -1) - value
    # Both projections in one call (rows are independent): one projection loop compiled.
    d1, d0 = jnp.split(_PROJECTIONS[norm](jnp.concatenate([flat(x1), flat(x)]),
                                          jnp.concatenate([w, w]), jnp.concatenate([b, b])), 2)
    a1 = jnp.maximum(norms.norm_of(d1, norm), 1e-8)
    a0 = jnp.maximum(norms.norm_of(d0, norm), 1e-8)
    alpha = per_image(jnp.clip(a1 / (a1 + a0), 0.0, alpha_max))
    x1 = jnp.clip((x1 + eta * d1.reshape(x.shape)) * (1 - alpha)
                  + (x + eta * d0.reshape(x.shape)) * alpha, 0.0, 1.0)
    fooled = jnp.argmax(logits_fn(x1), -1) != y
    size = norms.norm_of(flat(x1 - x), norm)
    smaller = fooled & (size < dist)
    best = jnp.where(per_image(smaller), x1, best)
    dist = jnp.where(smaller, size, dist)
    x1 = jnp.where(per_image(fooled), x + (x1 - x) * backtrack, x1)
    return x1, best, dist

  _, best, dist = jax.lax.fori_loop(0, steps, body, (x_start, x, jnp.full((n,), jnp.inf)))
  return best, dist


@jit_with_model("steps", "alpha_max", "eta", "backtrack", "norm")
def fab_round(model_fn, x: Array, y: Array, keys: Array, eps, *, steps: int, rank,
              restart=0, number=0, alpha_max: float = 0.1, eta: float = 1.05,
              backtrack: float = 0.9, norm: str = "linf"):
  """Round `number` of FAB-T (a target rank, a restart), or of untargeted FAB (rank=None, a
  restart), on a batch: (x_adv, fooled).

  rank, restart and number are traced: every target and restart runs one compiled program
  (rank=None another). Restart 0 starts at x, later ones on the eps/2-sphere. Costs in
  `round_passes`.
  """
  targets = None if rank is None else ranked_targets(predict(model_fn, x, keys), rank)
  keys = engine.fold_keys(keys, number)
  start = jnp.where(jnp.asarray(restart) == 0, x, _random_start(keys, x, eps / 2, norm))
  best, dist = fab_run(model_fn, x, y, targets, start, steps=steps, alpha_max=alpha_max,
                       eta=eta, backtrack=backtrack, norm=norm)
  fooled = (dist <= eps) & (jnp.argmax(predict(model_fn, best, keys), -1) != y)
  return _into_ball(best, x, eps, norm), fooled


def round_passes(steps: int, targeted: bool = True):
  """(forward, gradient) batch passes of one fab_round: a forward and a gradient pass per
  step, the final check, and FAB-T's clean pass for its targets. An untargeted gradient pass
  is one forward pass and a backward pass per class (+1), counted as one row, as the
  reference's forward hook counts its own."""
  return steps + 1 + int(targeted), steps


def fab(model_fn, x: Array, y: Array, *, eps=8 / 255, key: Array, steps: int = 100,
        target_ranks: Union[None, int, Sequence[int]] = 2, restarts: int = 1,
        alpha_max: float = 0.1, eta: float = 1.05, backtrack: float = 0.9,
        active=None, norm: str = "linf") -> Array:
  """FAB-T: for each target rank (by the clean logits), then each restart, on the still-robust.

  target_ranks=None: untargeted FAB (the closest boundary), each restart in turn; with
  restarts=5 it is AutoAttack plus's FAB. The first restart starts at x (as AutoAttack's);
  later ones on the eps/2-sphere (as the reference). range(2, 11) is AutoAttack's FAB-T on
  10 classes. `active` (N,) bool picks the images to attack (default: those classified
  correctly). eps is measured in `norm`.
  """
  x, y = engine.check_images_and_labels(x, y)
  norm = norms.check_norm(norm)
  norms.check_eps(eps, norm)
  if steps < 1 or restarts < 1:
    raise errors.UserError(f"steps={steps} and restarts={restarts} must both be >= 1")
  ranks = ((target_ranks,) if target_ranks is None or isinstance(target_ranks, int)
           else tuple(target_ranks))
  keys = engine.example_keys(key, x.shape[0])
  clean_logits = predict(model_fn, x, keys)
  for rank in ranks:
    if rank is not None:
      ranked_targets(clean_logits, rank)  # validates the rank
  robust = jnp.argmax(clean_logits, -1) == y if active is None else jnp.asarray(active)
  forward, gradient = round_passes(steps, target_ranks is not None)
  rounds = [(r, i) for r in ranks for i in range(restarts)]
  units = [cascade.attack_unit(
      f"fab/{number}", functools.partial(fab_round, model_fn, steps=steps, rank=rank,
                                         restart=restart, number=number,
                                         alpha_max=alpha_max, eta=eta, backtrack=backtrack,
                                         norm=norm),
      eps, keys, forward, gradient)
      for number, (rank, restart) in enumerate(rounds)]
  return cascade.attack_in_rounds(units, x, y, keys, np.asarray(robust))
