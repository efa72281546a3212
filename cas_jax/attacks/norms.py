"""Threat models: the L-inf, L2 and L1 balls of radius eps around x, intersected with [0, 1].

Every attack names its ball with a static `norm` ("linf", the default, "l2" or "l1") and
leaves what depends on it to these functions (engine.py re-exports them):

  project          L-inf: clip to the eps box, then to [0, 1] (as always).
                   L2: scale the perturbation into the ball, then clip to [0, 1] (the
                   official L2 APGD's projection; the result lies in both sets).
                   L1: the exact Euclidean projection onto the L1 ball intersected with the
                   box (what the official `L1_projection` computes), by sorting breakpoints.
  start_in_ball    L-inf: uniform in the cube. L2: x + eps * t / ||t||_2, t ~ N(0, I).
                   L1: x + t, t ~ N(0, I), projected (the official APGD's starts).
  direction        the steepest-ascent direction of unit norm: L-inf sign(g); L2
                   g / ||g||_2; L1 the sparse step sign(g) on the coordinates whose |g| is
                   in the top `sparsity` fraction, divided by their count (official L1-APGD).
  steepest_step    PGD's step rule. Under L1 it first drops the coordinates the box blocks
                   (at 1 with g > 0, at 0 with g < 0) and keeps the top PGD_L1_SPARSITY of
                   the rest: a simple sparse steepest step (cf. Tramer & Boneh's SLIDE).
  distance         ||x_adv - x|| per example.
  check_eps        L-inf: eps in (0, 1]. L2: eps in (0, sqrt(D)], the box's diameter. L1:
                   eps in (0, D]; D = pixels per image (a larger ball holds the whole box).
"""
import math

import jax
import jax.numpy as jnp

from cas_jax import errors

Array = jax.Array

NORMS = ("linf", "l2", "l1")
PGD_L1_SPARSITY = 0.05  # the fraction of coordinates a PGD-L1 step moves (at least one)
_TINY = 1e-12  # the official APGD's guard in its normalisation
_TINY_L1 = 1e-10  # and in its L1 step's


def check_norm(norm) -> str:
  """norm in lower case if it names one of NORMS, else one UserError line naming them."""
  name = norm.lower() if isinstance(norm, str) else norm
  if name not in NORMS:
    raise errors.UserError(f"unknown norm {norm!r}; valid: {', '.join(NORMS)}")
  return name


def check_eps(eps, norm: str = "linf", dim=None) -> None:
  """One UserError line for a (Python) eps outside the range of its norm (see the module doc)."""
  norm = check_norm(norm)
  if not isinstance(eps, (int, float)):
    return
  if norm == "linf":
    if not 0.0 < eps <= 1.0:
      raise errors.UserError(f"eps={eps} is outside (0, 1]; images are in [0, 1], e.g. eps=8/255.")
    return
  bound = None if dim is None else (math.sqrt(dim) if norm == "l2" else float(dim))
  if eps <= 0.0 or (bound is not None and eps > bound):
    limit = "" if bound is None else (f", {'sqrt(D)' if norm == 'l2' else 'D'}={bound:g}"
                                      f" for D={dim} pixels per image")
    raise errors.UserError(f"eps={eps} is outside the {norm} range (0{limit}]; e.g. eps=0.5 "
                           "for l2 or eps=12 for l1 on CIFAR-10")


def _rows(v: Array) -> Array:
  return v.reshape(v.shape[0], -1)


def _per_image(values: Array, like: Array) -> Array:
  return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))


def norm_of(v: Array, norm: str) -> Array:
  """The per-example norm (N,) of a batch v."""
  if norm == "linf":
    return jnp.max(jnp.abs(_rows(v)), axis=1)
  if norm == "l2":
    return jnp.sqrt(jnp.sum(_rows(v) ** 2, axis=1))
  return jnp.sum(jnp.abs(_rows(v)), axis=1)


def distance(x_adv: Array, x: Array, norm: str = "linf") -> Array:
  """||x_adv - x|| in `norm`, one value per example: (N,)."""
  return norm_of(x_adv - x, check_norm(norm))


def normalize(v: Array, norm: str) -> Array:
  """v / (||v|| + 1e-12) per example, as the official APGD normalises."""
  return v / (_per_image(norm_of(v, norm), v) + _TINY)


def l1_box_projection(delta: Array, x: Array, eps) -> Array:
  """The perturbation closest to delta (L2) with ||d||_1 <= eps and x + d in [0, 1].

  Per coordinate d_i = sign(delta_i) * clip(|delta_i| - lam, 0, room_i), room_i the distance
  to the box face delta_i points at; lam = 0 when that meets the budget, else the lam where
  sum_i |d_i| = eps, found exactly: f(lam) is piecewise linear with breakpoints |delta_i| -
  room_i (a coordinate leaves the box face) and |delta_i| (it reaches 0), sorted.
  """
  n = delta.shape[0]
  eps = jnp.broadcast_to(jnp.asarray(eps, delta.dtype), (n,))
  a = jnp.abs(_rows(delta))
  room = jnp.where(_rows(delta) > 0, 1.0 - _rows(x), _rows(x))
  room = jnp.where(a > 0, jnp.maximum(room, 0.0), 0.0)
  clipped = jnp.minimum(a, room)  # lam = 0: the box projection
  points = jnp.concatenate([a, a - room], axis=1)
  slopes = jnp.concatenate([jnp.ones_like(a), -jnp.ones_like(a)], axis=1)
  order = jnp.argsort(-points, axis=1)
  points = jnp.take_along_axis(points, order, axis=1)  # descending
  active = jnp.cumsum(jnp.take_along_axis(slopes, order, axis=1), axis=1)  # below points[k]
  # f at each breakpoint, from f(points[0]) = 0 as lam falls.
  gains = (points[:, :-1] - points[:, 1:]) * active[:, :-1]
  f_at = jnp.concatenate([jnp.zeros((n, 1), a.dtype), jnp.cumsum(gains, axis=1)], axis=1)
  last = jnp.sum(f_at < eps[:, None], axis=1) - 1  # f_at is non-decreasing: the last below
  f_last = jnp.take_along_axis(f_at, last[:, None], axis=1)[:, 0]
  p_last = jnp.take_along_axis(points, last[:, None], axis=1)[:, 0]
  a_last = jnp.take_along_axis(active, last[:, None], axis=1)[:, 0]
  lam = p_last - (eps - f_last) / jnp.maximum(a_last, 1)
  over = jnp.sum(clipped, axis=1) > eps
  lam = jnp.where(over, jnp.maximum(lam, 0.0), 0.0)
  d = jnp.sign(_rows(delta)) * jnp.clip(a - lam[:, None], 0.0, room)
  # Rounding in the sums may leave ||d||_1 a few ulps over eps: shrink (stays in the box).
  total = jnp.sum(jnp.abs(d), axis=1)
  d = d * jnp.where(total > eps, eps / jnp.where(total > 0, total, 1.0), 1.0)[:, None]
  return d.reshape(delta.shape)


def project(x_adv: Array, x: Array, eps, norm: str = "linf") -> Array:
  """x_adv moved into the `norm` ball of radius eps around x and into [0, 1] (module doc)."""
  if norm == "linf":
    return jnp.clip(jnp.clip(x_adv, x - eps, x + eps), 0.0, 1.0)
  if norm == "l2":
    delta = x_adv - x
    length = _per_image(norm_of(delta, "l2"), delta)
    return jnp.clip(x + delta / (length + _TINY) * jnp.minimum(eps, length), 0.0, 1.0)
  if norm == "l1":  # the clip only undoes x + (1 - x) rounding above 1
    return jnp.clip(x + l1_box_projection(x_adv - x, x, eps), 0.0, 1.0)
  return project(x_adv, x, eps, check_norm(norm))  # "L2" -> "l2", or one UserError line


def start_in_ball(draw, x: Array, eps, norm: str = "linf") -> Array:
  """The random start before projection; draw(sample_fn) draws sample_fn(key, shape) per example."""
  norm = check_norm(norm)
  if norm == "linf":
    return x + draw(lambda k, s: jax.random.uniform(k, s, x.dtype, -eps, eps))
  t = draw(lambda k, s: jax.random.normal(k, s, x.dtype))
  return x + eps * normalize(t, "l2") if norm == "l2" else x + t


def sparse_direction(grad: Array, sparsity) -> Array:
  """The official L1-APGD's step: sign(g) on the top `sparsity` fraction of |g|, over their count.

  sparsity: a scalar or one per example; ties at the cut all move; the result has unit L1 norm.
  """
  magnitude = _rows(jnp.abs(grad))
  dim = magnitude.shape[1]
  cut = jnp.clip((1.0 - jnp.broadcast_to(sparsity, (grad.shape[0],))) * dim, 0, dim - 1)
  threshold = jnp.take_along_axis(jnp.sort(magnitude, axis=1), cut.astype(jnp.int32)[:, None],
                                  axis=1)
  signs = jnp.sign(grad * (_per_image(threshold[:, 0], grad) <= jnp.abs(grad)))
  return signs / (_per_image(norm_of(signs, "l1"), grad) + _TINY_L1)


def direction(grad: Array, norm: str = "linf", sparsity=PGD_L1_SPARSITY) -> Array:
  """The steepest-ascent direction of unit `norm` for gradient grad (module doc)."""
  if norm == "linf":
    return jnp.sign(grad)
  if norm == "l2":
    return normalize(grad, "l2")
  if norm == "l1":
    return sparse_direction(grad, sparsity)
  return direction(grad, check_norm(norm), sparsity)  # "L2" -> "l2", or one UserError line


def steepest_step(x_adv: Array, grad: Array, step_size, norm: str = "linf") -> Array:
  """PGD's step rule: x_adv + step_size * direction (L1: among coordinates the box lets move)."""
  norm = check_norm(norm)
  if norm == "linf":
    return x_adv + step_size * jnp.sign(grad)
  if norm == "l1":
    grad = jnp.where(((x_adv >= 1.0) & (grad > 0)) | ((x_adv <= 0.0) & (grad < 0)), 0.0, grad)
  return x_adv + step_size * direction(grad, norm)
