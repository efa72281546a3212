"""Square Attack (Andriushchenko et al., ECCV 2020), L-inf/L2/L1: a score-based black-box attack.

Start from vertical stripes of +-eps; each query redraws one random square window of the
image to +-eps per channel and keeps it when the margin z_y - max_{k != y} z_k of the main
head falls (or the image becomes misclassified). The window's side follows the schedule p(i)
of `square_fraction`. It needs only logits, so masks and gradients play no part:

    x_adv = square(model_fn, x, y, eps=8/255, key=key)             # AutoAttack's 5000 queries

Under L2 and L1 (norm="l2" / "l1", as the reference): the start is a grid of windows of
side h // 5, each holding the pattern `_window_pattern` with a random sign per channel, scaled
to the eps-sphere (L2) or projected into the eps-ball (L1); each query takes two windows of
odd side >= 3, clears the second, and refills the first with the pattern plus its old content,
rescaled so that the perturbation's mass stays near eps (see `_lp_proposal`).

Windows and signs are drawn per image (the reference code shares one window across the
batch), so an image's result does not depend on its batch. Images are NHWC.
"""
import jax
import jax.numpy as jnp
import numpy as np

from cas_jax import errors
from cas_jax import losses
from cas_jax.attacks import engine
from cas_jax.attacks.engine import jit_with_model, predict
from cas_jax.attacks import norms

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


def _lp_size(v: Array, norm: str, axes) -> Array:
  """The L2 or L1 norm of v over `axes` (kept as size-1 axes)."""
  if norm == "l2":
    return jnp.sqrt(jnp.sum(v * v, axes, keepdims=True))
  return jnp.sum(jnp.abs(v), axes, keepdims=True)


def _window_pattern(r: Array, c: Array, side, norm: str, size: int) -> Array:
  """The reference's eta(side) at coordinates (r, c) relative to a window (0 outside it).

  Its top side // 2 rows hold +1/(k+1)^q summed over the concentric squares k around their
  centre (q = 2 for L2, 4 for L1), its bottom rows the same pattern negated; each half has
  norm 1, then the whole has norm 1. `side` may be traced; size >= side is static.
  """
  power = 2 if norm == "l2" else 4
  tail = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, size + 2) ** power)])
  tail = jnp.asarray(tail, jnp.float32)  # tail[n] = sum_{k < n} 1 / (k + 1)^q

  def raw(r, c):
    upper = r < side // 2
    rows = jnp.where(upper, side // 2, side - side // 2)
    i = jnp.where(upper, r, r - side // 2)
    ring = jnp.maximum(jnp.abs(i - rows // 2), jnp.abs(c - side // 2))
    inside = (r >= 0) & (r < side) & (c >= 0) & (c < side)
    value = tail[side // 2 + 1] - tail[jnp.clip(ring, 0, size + 1)]
    return jnp.where(inside & upper, value, 0.0), jnp.where(inside & ~upper, value, 0.0)

  grid = jnp.arange(size)
  top, bottom = raw(grid[:, None], grid[None, :])
  top_size, bottom_size = _lp_size(top, norm, None), _lp_size(bottom, norm, None)
  whole = _lp_size(top / jnp.maximum(top_size, 1e-30) - bottom / jnp.maximum(bottom_size, 1e-30),
                   norm, None)
  top, bottom = raw(r, c)
  return (top / jnp.maximum(top_size, 1e-30) - bottom / jnp.maximum(bottom_size, 1e-30)) / whole


def _into_l1_ball(x: Array, delta: Array, eps) -> Array:
  """x + delta moved to the nearest point of [0, 1] with L1 distance <= eps from x (the
  reference's L1_projection: norms.l1_box_projection)."""
  return jnp.clip(x + norms.l1_box_projection(delta, x, eps), 0.0, 1.0)


def _lp_start(keys: Array, x: Array, eps, norm: str) -> Array:
  """The reference's L2 / L1 start: a grid of side-(h // 5) window patterns with a random
  sign per window and channel (and a random transpose per window), scaled to eps (L2, then
  clipped to [0, 1]) or projected into the eps-ball (L1)."""
  n, height, width, channels = x.shape
  side = max(height // 5, 1)  # the reference needs height >= 5
  offset = (height - 5 * side) // 2
  grid_rows, grid_cols = height // side, width // side
  rows, cols = np.arange(height) - offset, np.arange(width) - offset
  cell_row = np.clip(rows // side, 0, grid_rows - 1)
  cell_col = np.clip(cols // side, 0, grid_cols - 1)
  on_grid = (((rows >= 0) & (rows // side < grid_rows))[:, None]
             & ((cols >= 0) & (cols // side < grid_cols))[None, :])
  draws = engine.per_example(lambda k, s: jax.random.uniform(k, s), engine.fold_keys(keys, 0),
                             (n, grid_rows, grid_cols, 1 + channels))
  draws = draws[:, cell_row][:, :, cell_col]  # (N, H, W, 1 + C): each pixel's window's draws
  r, c = np.broadcast_arrays((rows % side)[:, None], (cols % side)[None, :])
  flip = draws[..., 0] < 0.5
  pattern = _window_pattern(jnp.where(flip, c, r), jnp.where(flip, r, c), side, norm,
                            min(height, width))
  delta = (pattern * on_grid)[..., None] * jnp.where(draws[..., 1:] < 0.5, -1.0, 1.0)
  if norm == "l2":
    return jnp.clip(x + eps * delta / (_lp_size(delta, norm, (1, 2, 3)) + 1e-12), 0.0, 1.0)
  return _into_l1_ball(x, delta, eps * (1.0 - 1e-6))


def _lp_proposal(k: Array, x: Array, x_best: Array, p, eps, norm: str) -> Array:
  """One image's L2 / L1 proposal (the reference's): windows 1 and 2 of odd side >= 3; window
  2 is cleared, window 1 gets (pattern * channel signs + its old content at unit norm),
  rescaled per channel to the mass of both windows plus an even share of what the image lacks
  of eps; then the whole is scaled to eps (L2) or projected into the eps-ball (L1)."""
  height, width, channels = x.shape
  side = jnp.round(jnp.sqrt(p * height * width)).astype(jnp.int32)
  side = jnp.maximum(side, 3)
  side = jnp.minimum(side + (side % 2 == 0), min(height, width))
  u = jax.random.uniform(k, (5 + channels,))
  spans = jnp.array([height, width, height, width]) - side
  top1, left1, top2, left2 = jnp.floor(u[:4] * spans).astype(jnp.int32)
  rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
  in_window = lambda top, left: ((rows >= top) & (rows < top + side) & (cols >= left)
                                 & (cols < left + side))[..., None]
  window1, window2 = in_window(top1, left1), in_window(top2, left2)
  r, c = rows - top1, cols - left1
  flip = u[4] > 0.5
  pattern = _window_pattern(jnp.where(flip, c, r), jnp.where(flip, r, c), side, norm,
                            min(height, width))
  delta = x_best - x
  spatial = lambda v: _lp_size(v, norm, (0, 1))
  old = delta * window1 / (1e-12 + spatial(delta * window1))
  new = pattern[..., None] * jnp.where(u[5:] < 0.5, -1.0, 1.0) + old
  image_size, both_windows = _lp_size(delta, norm, None), spatial(delta * (window1 | window2))
  if norm == "l2":
    mass = jnp.sqrt(jnp.maximum(eps ** 2 - image_size ** 2, 0.0) / channels + both_windows ** 2)
  else:
    mass = (jnp.maximum(eps - image_size, 0.0) / channels + both_windows) * channels
  new = new / (1e-12 + spatial(new)) * mass
  delta = jnp.where(window1, new, jnp.where(window2, 0.0, delta))
  if norm == "l2":
    return jnp.clip(x + eps * delta / (_lp_size(delta, norm, None) + 1e-12), 0.0, 1.0)
  return _into_l1_ball(x[None], delta[None], eps * (1.0 - 1e-6))[0]


@jit_with_model("total_queries", "p_init", "rescale_schedule", "norm")
def square_run(model_fn, x: Array, y: Array, keys: Array, x_best: Array, margin_best: Array,
               first_query, end_query, eps, *, total_queries: int, p_init: float = 0.8,
               rescale_schedule: bool = False, norm: str = "linf"):
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

  def linf_proposal(step_keys, p, x_best):
    side = jnp.clip(jnp.round(jnp.sqrt(p * height * width)).astype(jnp.int32), 1,
                    min(height, width))
    top, left, channel_signs = jax.vmap(proposal, in_axes=(0, None))(step_keys, side)
    within = lambda index, start: ((index >= start[:, None, None, None])
                                   & (index < start[:, None, None, None] + side))
    window = within(rows, top) & within(cols, left)
    return engine.project(
        x_best + window * 2.0 * eps * channel_signs[:, None, None, :], x, eps)

  def body(state):
    i, x_best, margin_best = state
    p = square_fraction(i, total_queries, p_init, rescale_schedule)
    step_keys = engine.fold_keys(proposal_keys, i)
    if norm == "linf":
      x_new = linf_proposal(step_keys, p, x_best)
    else:
      x_new = jax.vmap(_lp_proposal, in_axes=(0, 0, 0, None, None, None))(
          step_keys, x, x_best, p, eps, norm)
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


def square_chunk(model_fn, x: Array, y: Array, keys: Array, carry, first_query, end_query, eps,
                 *, total_queries: int, p_init: float = 0.8, rescale_schedule: bool = False,
                 norm: str = "linf"):
  """One chunk of Square queries: (x_best, fooled, carry for the next chunk, forward passes).

  carry None starts the run (vertical stripes under L-inf, `_lp_start` under L2 / L1, one
  query); else it is (x_best, margin). Both run one compiled program (`_square_chunk`: the
  start is a traced branch).
  """
  starts = carry is None
  if starts:
    carry = (x, np.zeros(x.shape[:1], x.dtype))  # numpy: no program compiled for the zeros
  return _square_chunk(model_fn, x, y, keys, *carry, np.asarray(starts), first_query,
                       end_query, eps, total_queries=total_queries, p_init=p_init,
                       rescale_schedule=rescale_schedule, norm=norm)


@jit_with_model("total_queries", "p_init", "rescale_schedule", "norm")
def _square_chunk(model_fn, x: Array, y: Array, keys: Array, x_best: Array, margin: Array,
                  starts: Array, first_query, end_query, eps, *, total_queries: int,
                  p_init: float, rescale_schedule: bool, norm: str):
  """square_chunk's program: from (x_best, margin), or from Square's start where `starts`."""
  def start():
    x_start = vertical_stripes(keys, x, eps) if norm == "linf" else _lp_start(keys, x, eps, norm)
    return x_start, _margin(model_fn, x_start, y).astype(x.dtype)

  x_best, margin = jax.lax.cond(starts, start, lambda: (x_best, margin.astype(x.dtype)))
  x_best, margin, made = square_run(model_fn, x, y, keys, x_best, margin, first_query, end_query,
                                    eps, total_queries=total_queries, p_init=p_init,
                                    rescale_schedule=rescale_schedule, norm=norm)
  return x_best, margin <= 0, (x_best, margin), made + starts.astype(jnp.int32)


def square(model_fn, x: Array, y: Array, *, eps=8 / 255, key: Array, queries: int = 5000,
           p_init: float = 0.8, rescale_schedule: bool = False, active=None,
           norm: str = "linf") -> Array:
  """Square Attack on `active` images (default: those classified correctly); else x stays."""
  x, y = engine.check_images_and_labels(x, y)
  norm = norms.check_norm(norm)
  norms.check_eps(eps, norm)
  if queries < 1 or not 0.0 < p_init <= 1.0:
    raise errors.UserError(f"queries={queries} must be >= 1 and p_init={p_init} in (0, 1]")
  keys = engine.example_keys(key, x.shape[0])
  if active is None:
    active = jnp.argmax(predict(model_fn, x, keys), -1) == y
  x_best, fooled, _, _ = square_chunk(model_fn, x, y, keys, None, 0, queries, eps,
                                      total_queries=queries, p_init=p_init,
                                      rescale_schedule=rescale_schedule, norm=norm)
  keep = engine.per_image(jnp.asarray(active) & fooled, x)
  return jnp.where(keep, x_best, x)
