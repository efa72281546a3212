"""Targeted FAB (Croce & Hein, ICML 2020), L-inf: the minimal-perturbation attack of AutoAttack.

Each iteration linearises g(x) = z_t(x) - z_y(x) of the main head at the current point,
projects both that point and the clean image onto the hyperplane g = 0 (inside [0, 1]),
and steps to a convex combination biased towards the clean image; once an iterate is
misclassified it is kept if it is the smallest yet and the iterate is pulled back towards x.
On a CAS model the gradient of g passes through the CAS masks like any other layer.

    x_adv = fab(model_fn, x, y, eps=8/255, key=key, target_ranks=range(2, 11))   # FAB-T

An image counts as fooled when the smallest adversarial found lies within eps; the result is
that example, and x elsewhere. `key` (one key or N keys) only seeds restarts after the first.
"""
import functools
from typing import Sequence, Union

import jax
import jax.numpy as jnp

import numpy as np

from cas_jax import errors
from cas_jax.attacks import cascade
from cas_jax.attacks import engine
from cas_jax.attacks.apgd import ranked_targets
from cas_jax.attacks.engine import jit_with_model, predict

Array = jax.Array


def project_onto_hyperplane_linf(points: Array, w: Array, b: Array,
                                 max_newton_steps: int = 100) -> Array:
  """Smallest L-inf step d (per row) with w.(points + d) = b and points + d in [0, 1].

  Where the box does not reach the hyperplane, d moves to the box corner closest to it.
  points, w: (N, D); b: (N,). On the path d_i(lam) = -sign(w_i) min(lam, room_i), the fall
  of w.x, sum_i |w_i| min(lam, room_i), is concave, increasing and piecewise linear in lam:
  Newton's method from lam = target / sum|w| (below the root) climbs to the root without
  overshooting and lands on it exactly once in its segment, typically in ~5 steps (a sort
  over the D coordinates, as the reference does, is ~10x slower on CPU).
  """
  side = jnp.where(jnp.sum(w * points, -1) - b >= 0, 1.0, -1.0)[:, None]
  w, b = w * side, b * side[:, 0]  # now w.points >= b: w.x must fall by `target`
  target = jnp.sum(w * points, -1) - b
  room = jnp.where(w < 0, 1.0 - points, points)
  w_abs = jnp.abs(w)
  safe = lambda v: jnp.where(v > 0, v, 1.0)

  def newton(state):
    lam, moving, count = state
    fall = jnp.sum(w_abs * jnp.minimum(lam[:, None], room), -1)
    slope = jnp.sum(jnp.where(room > lam[:, None], w_abs, 0.0), -1)
    step = jnp.where(moving & (slope > 0), jnp.maximum(target - fall, 0.0) / safe(slope), 0.0)
    # A row that converged stays where it is, so no row's result depends on its batch.
    return lam + step, moving & (step > 1e-7), count + 1

  lam, _, _ = jax.lax.while_loop(
      lambda state: jnp.any(state[1]) & (state[2] < max_newton_steps), newton,
      (target / safe(jnp.sum(w_abs, -1)), jnp.ones(target.shape, bool), 0))
  reachable = (target < jnp.sum(w_abs * room, -1))[:, None]
  return -jnp.sign(w) * jnp.where(reachable, jnp.minimum(lam[:, None], room), room)


@jit_with_model("steps", "alpha_max", "eta", "backtrack")
def fab_targeted_run(model_fn, x: Array, y: Array, targets: Array, x_start: Array, *,
                     steps: int, alpha_max: float = 0.1, eta: float = 1.05,
                     backtrack: float = 0.9):
  """One FAB-T run towards `targets`: (smallest adversarial found, its L-inf size or inf)."""
  n = x.shape[0]
  flat = lambda a: a.reshape(n, -1)
  per_image = lambda v: v.reshape((n,) + (1,) * (x.ndim - 1))
  logits_fn = lambda z: engine.main_logits(model_fn, z)
  rows = jnp.arange(n)

  def gap(z):
    logits = logits_fn(z)
    per_example = logits[rows, targets] - logits[rows, y]
    return jnp.sum(per_example), per_example

  gap_grad = jax.grad(gap, has_aux=True)

  def body(_, s):
    x1, best, dist = s
    grad, value = gap_grad(x1)
    w = flat(grad)
    b = jnp.sum(w * flat(x1), -1) - value
    d1 = project_onto_hyperplane_linf(flat(x1), w, b)
    d0 = project_onto_hyperplane_linf(flat(x), w, b)
    a1 = jnp.maximum(jnp.max(jnp.abs(d1), -1), 1e-8)
    a0 = jnp.maximum(jnp.max(jnp.abs(d0), -1), 1e-8)
    alpha = per_image(jnp.clip(a1 / (a1 + a0), 0.0, alpha_max))
    x1 = jnp.clip((x1 + eta * d1.reshape(x.shape)) * (1 - alpha)
                  + (x + eta * d0.reshape(x.shape)) * alpha, 0.0, 1.0)
    fooled = jnp.argmax(logits_fn(x1), -1) != y
    size = jnp.max(jnp.abs(flat(x1 - x)), -1)
    smaller = fooled & (size < dist)
    best = jnp.where(per_image(smaller), x1, best)
    dist = jnp.where(smaller, size, dist)
    x1 = jnp.where(per_image(fooled), x + (x1 - x) * backtrack, x1)
    return x1, best, dist

  _, best, dist = jax.lax.fori_loop(0, steps, body, (x_start, x, jnp.full((n,), jnp.inf)))
  return best, dist


@jit_with_model("steps", "alpha_max", "eta", "backtrack")
def fab_round(model_fn, x: Array, y: Array, keys: Array, eps, *, steps: int, rank,
              restart=0, number=0, alpha_max: float = 0.1, eta: float = 1.05,
              backtrack: float = 0.9):
  """Round `number` of FAB-T (a target rank, a restart) on a batch: (x_adv, fooled).

  rank, restart and number are traced: every target and restart runs one compiled program.
  It costs `steps` gradient passes and steps + 2 forward passes (`round_passes`).
  """
  targets = ranked_targets(predict(model_fn, x, keys), rank)
  keys = engine.fold_keys(keys, number)
  start = jnp.where(jnp.asarray(restart) == 0, x, engine.random_start(keys, x, eps / 2))
  best, dist = fab_targeted_run(model_fn, x, y, targets, start, steps=steps,
                                alpha_max=alpha_max, eta=eta, backtrack=backtrack)
  fooled = (dist <= eps) & (jnp.argmax(predict(model_fn, best, keys), -1) != y)
  return engine.project(best, x, eps), fooled


def round_passes(steps: int):
  """(forward, gradient) batch passes of one fab_round."""
  return steps + 2, steps


def fab(model_fn, x: Array, y: Array, *, eps=8 / 255, key: Array, steps: int = 100,
        target_ranks: Union[int, Sequence[int]] = 2, restarts: int = 1,
        alpha_max: float = 0.1, eta: float = 1.05, backtrack: float = 0.9,
        active=None) -> Array:
  """FAB-T: for each target rank (by the clean logits), then each restart, on the still-robust.

  The first restart starts at x (as AutoAttack's FAB-T); later ones at a uniform point of
  the eps/2-ball. range(2, 11) is AutoAttack's FAB-T on 10 classes. `active` (N,) bool
  picks the images to attack (default: those classified correctly).
  """
  x, y = engine.check_images_and_labels(x, y)
  engine.check_eps(eps)
  if steps < 1 or restarts < 1:
    raise errors.UserError(f"steps={steps} and restarts={restarts} must both be >= 1")
  ranks = (target_ranks,) if isinstance(target_ranks, int) else tuple(target_ranks)
  keys = engine.example_keys(key, x.shape[0])
  clean_logits = predict(model_fn, x, keys)
  for rank in ranks:
    ranked_targets(clean_logits, rank)  # validates the rank
  robust = jnp.argmax(clean_logits, -1) == y if active is None else jnp.asarray(active)
  forward, gradient = round_passes(steps)
  rounds = [(r, i) for r in ranks for i in range(restarts)]
  units = [cascade.attack_unit(
      f"fab/{number}", functools.partial(fab_round, model_fn, steps=steps, rank=rank,
                                         restart=restart, number=number,
                                         alpha_max=alpha_max, eta=eta, backtrack=backtrack),
      eps, keys, forward, gradient)
      for number, (rank, restart) in enumerate(rounds)]
  return cascade.attack_in_rounds(units, x, y, keys, np.asarray(robust))
