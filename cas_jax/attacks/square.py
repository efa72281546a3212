"""Square Attack (Andriushchenko et al., ECCV 2020), L-inf: a score-based black-box attack.

Start from vertical stripes of +-eps; each query redraws one random square window of the
image to +-eps per channel and keeps it when the margin z_y - max_{k != y} z_k of the main
head falls (or the image becomes misclassified). The window's side follows the schedule p(i)
of `square_fraction`. It needs only logits, so masks and gradients play no part:

    x_adv = square(model_fn, x, y, eps=8/255, key=key)             # AutoAttack's 5000 queries

Windows and signs are drawn per image (the reference code shares one window across the
batch), so an image's result does not depend on its batch. Images are NHWC.
"""

import jax
import jax.numpy as jnp

from cas_jax import errors
from cas_jax import losses
from cas_jax.attacks import engine
from cas_jax.attacks.engine import jit_with_model, predict

Array = jax.Array

# p(i) = p_init / 2^k after the k-th of these iteration counts (rescaled to 10000 queries
# when `rescale_schedule`; AutoAttack's standard version does not rescale).
_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def square_fraction(iteration, queries: int, p_init: float = 0.8,
                    rescale_schedule: bool = False):
  """The fraction p of the image a square covers at `iteration` (works on traced ints)."""
  it = (iteration * 10000) // queries if rescale_schedule else iteration
  halvings = sum(jnp.asarray(it > t, jnp.int32) for t in _HALVINGS)
  return p_init / 2.0 ** halvings


def _margin(model_fn, z: Array, y: Array) -> Array:
  """z_y - max_{k != y} z_k of the main head: what Square lowers (<= 0: misclassified)."""
  return -losses.margin(engine.main_logits(model_fn, z), y)


def vertical_stripes(keys: Array, x: Array, eps) -> Array:
  """Square's start: x + eps * a random sign per column and channel (constant down a column)."""
  signs = lambda k, shape: jnp.where(jax.random.bernoulli(k, 0.5, shape), 1.0, -1.0)
  stripes = engine.per_example(signs, engine.fold_keys(keys, 0), (x.shape[0], 1) + x.shape[2:])
  return jnp.clip(x + eps * stripes, 0.0, 1.0)


@jit_with_model("total_queries", "p_init", "rescale_schedule")
def square_run(model_fn, x: Array, y: Array, keys: Array, x_best: Array, margin_best: Array,
               first_query, end_query, eps, *, total_queries: int, p_init: float = 0.8,
               rescale_schedule: bool = False):
  """Queries first_query .. end_query - 1 of one Square run of total_queries, from (x_best,
  margin_best); it stops once every image is fooled (margin <= 0).

  Returns (x_best, margin_best, the queries made): the query index, not the chunk, draws each
  window, so a run split into chunks equals one run.
  """
  n, height, width, channels = x.shape
  rows = jnp.arange(height)[None, :, None, None]
  cols = jnp.arange(width)[None, None, :, None]
  first_query = jnp.asarray(first_query, jnp.int32)
  end = jnp.minimum(jnp.asarray(end_query, jnp.int32), total_queries)
  state = (first_query, x_best, margin_best)

  def proposal(k, side):
    """A window's top-left corner and its per-channel signs, from one draw of uniforms."""
    u = jax.random.uniform(k, (2 + channels,))
    top = jnp.floor(u[0] * (height - side)).astype(jnp.int32)
    left = jnp.floor(u[1] * (width - side)).astype(jnp.int32)
    return top, left, jnp.where(u[2:] < 0.5, -1.0, 1.0)

  proposal_keys = engine.fold_keys(keys, 1)

  def body(state):
    i, x_best, margin_best = state
    p = square_fraction(i, total_queries, p_init, rescale_schedule)
    side = jnp.clip(jnp.round(jnp.sqrt(p * height * width)).astype(jnp.int32), 1,
                    min(height, width))
    top, left, channel_signs = jax.vmap(proposal, in_axes=(0, None))(
        engine.fold_keys(proposal_keys, i), side)
    within = lambda index, start: ((index >= start[:, None, None, None])
                                   & (index < start[:, None, None, None] + side))
    window = within(rows, top) & within(cols, left)
    x_new = engine.project(
        x_best + window * 2.0 * eps * channel_signs[:, None, None, :], x, eps)
    margin = _margin(model_fn, x_new, y)
    # Images already misclassified stop; the rest keep a proposal that lowers the margin.
    accept = (margin_best > 0) & ((margin < margin_best) | (margin <= 0))
    x_best = jnp.where(accept[:, None, None, None], x_new, x_best)
    return i + 1, x_best, jnp.where(accept, margin, margin_best)

  def running(state):
    i, _, margin_best = state
    return (i < end) & jnp.any(margin_best > 0)

  last, x_best, margin_best = jax.lax.while_loop(running, body, state)
  return x_best, margin_best, last - first_query


@jit_with_model("total_queries", "p_init", "rescale_schedule")
def square_chunk(model_fn, x: Array, y: Array, keys: Array, carry, first_query, end_query, eps,
                 *, total_queries: int, p_init: float = 0.8, rescale_schedule: bool = False):
  """One chunk of Square queries: (x_best, fooled, carry for the next chunk, forward passes).

  carry None starts the run (vertical stripes, one query); else it is (x_best, margin).
  """
  starts = carry is None
  if starts:
    x_best = vertical_stripes(keys, x, eps)
    carry = (x_best, _margin(model_fn, x_best, y))
  x_best, margin, made = square_run(model_fn, x, y, keys, *carry, first_query, end_query, eps,
                                    total_queries=total_queries, p_init=p_init,
                                    rescale_schedule=rescale_schedule)
  return x_best, margin <= 0, (x_best, margin), made + int(starts)


def square(model_fn, x: Array, y: Array, *, eps=8 / 255, key: Array, queries: int = 5000,
           p_init: float = 0.8, rescale_schedule: bool = False, active=None) -> Array:
  """Square Attack on `active` images (default: those classified correctly); else x stays."""
  x, y = engine.check_images_and_labels(x, y)
  engine.check_eps(eps)
  if queries < 1 or not 0.0 < p_init <= 1.0:
    raise errors.UserError(f"queries={queries} must be >= 1 and p_init={p_init} in (0, 1]")
  keys = engine.example_keys(key, x.shape[0])
  if active is None:
    active = jnp.argmax(predict(model_fn, x, keys), -1) == y
  x_best, fooled, _, _ = square_chunk(model_fn, x, y, keys, None, 0, queries, eps,
                                      total_queries=queries, p_init=p_init,
                                      rescale_schedule=rescale_schedule)
  keep = engine.per_image(jnp.asarray(active) & fooled, x)
  return jnp.where(keep, x_best, x)
