"""The attack engine: start in the eps-ball, then a compiled loop of gradient -> step -> projection.

Every white-box attack in cas_jax (and the adversaries of `train_step`) is `ascend` with
its own per-example loss and step rule:

    loss_fn = lambda x_adv: losses.cross_entropy(logits_fn(x_adv), y)
    x_adv = engine.ascend(loss_fn, x, eps=8/255, step_size=2/255, steps=10, key=key)

`loss_fn(x_adv)` returns one loss per example; the engine ascends their sum, which gives
per-example gradients because examples do not interact in an evaluation-mode forward pass.
The ball is the static `norm`'s ("linf", default, "l2" or "l1"): norms.py holds what depends
on it (projection, random start, steepest step, distance, eps range), re-exported here.
A randomized model is attacked the same way: its loss averaged over draws
(`mean_over_draws`) is just another loss, fresh at every step (`with_step=True`).

The helpers every attack uses to hand a model to jit live here too: `jit_with_model`,
`as_partial`, `call_model` / `predict` (deterministic or one draw of a randomized model),
`per_image` (broadcast a per-image value over an image batch) and the per-example key streams.
"""
import functools
from typing import Any, Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from cas_jax import errors
from cas_jax.attacks import norms
from cas_jax.attacks.norms import NORMS, check_norm, distance  # pylint: disable=unused-import

Array = jax.Array
LossFn = Callable[[Array], Array]
StepRule = Callable[[Array, Array, Any], Array]

STARTS = ("uniform", "normal", "none")


def split_outputs(outputs) -> Tuple[Array, tuple]:
  """(logits, cas_logits) from a model function's output: an array or a (logits, cas) pair."""
  if isinstance(outputs, (tuple, list)):
    logits, cas_logits = outputs
    return logits, tuple(cas_logits)
  return outputs, ()


def project(x_adv: Array, x: Array, eps, norm: str = "linf") -> Array:
  """x_adv moved into the `norm` ball of radius eps around x and into [0, 1] (norms.project)."""
  return norms.project(x_adv, x, eps, norm)


def check_eps(eps, norm: str = "linf", dim=None) -> None:
  """One UserError line for a (Python) eps outside its norm's range (norms.check_eps).

  L-inf (0, 1], L2 (0, sqrt(dim)], L1 (0, dim]; dim = values per image (no bound when None).
  """
  norms.check_eps(eps, norm, dim)


def _as_jax(a) -> Array:
  """a as a JAX array; host data through device_put (jnp.asarray compiles a staging program
  per shape for it)."""
  if isinstance(a, (jax.Array, jax.core.Tracer)):
    return jnp.asarray(a)
  return jax.device_put(np.asarray(a))


def check_images(x) -> Array:
  """x (numpy or JAX) as a JAX float array of NHWC images in [0, 1]; else a ValueError naming the fix.

  The shape is always checked; the values only when they are concrete (not traced by jit/grad).
  """
  if isinstance(x, jax.core.Tracer):
    values = None
  else:
    values = np.asarray(x) if isinstance(x, np.ndarray) else x
  x = _as_jax(x)
  if x.ndim != 4:
    raise errors.UserError(f"images must be NHWC of rank 4 (N, H, W, C), got shape {x.shape}; add the "
                     "missing axes (x[None] for one image, x[..., None] for one channel) or "
                     "reshape flat inputs to (N, H, W, C) and flatten inside the model function")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(jnp.float32)
  if values is not None and x.size:
    low, high = float(values.min()), float(values.max())
    if not 0.0 <= low <= high <= 1.0:
      raise errors.UserError(f"images must lie in [0, 1], got values in [{low:g}, {high:g}]; scale "
                       "them (e.g. x / 255 for 8-bit pixels) and undo any normalisation, which "
                       "belongs inside the model function")
  return x


def check_images_and_labels(x, y) -> Tuple[Array, Array]:
  """(x, y) as JAX arrays: NHWC images in [0, 1] (check_images) and one integer label per image."""
  x = check_images(x)
  y = _as_jax(y)
  if y.ndim != 1 or y.shape[0] != x.shape[0]:
    raise errors.UserError(f"labels must have shape (N,) = ({x.shape[0]},), one per image, got "
                     f"{y.shape}; pass class indices (argmax of one-hot labels), as many as images")
  if not jnp.issubdtype(y.dtype, jnp.integer):
    raise errors.UserError(f"labels must be integer class indices, got dtype {y.dtype}; convert them "
                     "with y.astype(int)")
  return x, y


def example_keys(key: Array, n: int) -> Array:
  """One key per example: key folded with 0..n-1, or `key` itself when it is already a batch of n.

  Randomness drawn per example (not per batch) makes an attack's result on an image
  independent of the batch it is in: evaluation passes keys folded with global image indices.
  """
  is_typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
  if key.ndim == (1 if is_typed else 2):
    if key.shape[0] != n:
      raise errors.UserError(f"got {key.shape[0]} per-example keys for a batch of {n} examples")
    return key
  return index_keys(key, jnp.arange(n))


def index_keys(key: Array, indices: Array) -> Array:
  """One key per example: `key` folded with each example's (global) index."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(indices)


def fold_keys(keys: Array, *data) -> Array:
  """Each per-example key folded with the integers `data` in turn (a separate random stream)."""
  for d in data:
    keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, d)
  return keys


def per_example(sample_fn: Callable[[Array, tuple], Array], key: Array, shape: tuple) -> Array:
  """Draw sample_fn(key_i, shape[1:]) for each example i of a batch of shape `shape`."""
  return jax.vmap(lambda k: sample_fn(k, shape[1:]))(example_keys(key, shape[0]))


def random_start(key: Array, x: Array, eps, start: str = "uniform", sigma: float = 0.001,
                 norm: str = "linf") -> Array:
  """A starting point: random in the eps-ball (norms.start_in_ball), x + sigma * N(0, 1)
  (TRADES / MART), or x itself; projected into the `norm` ball and the box."""
  if start == "uniform":
    x0 = norms.start_in_ball(lambda sample: per_example(sample, key, x.shape), x, eps, norm)
  elif start == "normal":
    x0 = x + sigma * per_example(lambda k, s: jax.random.normal(k, s, x.dtype), key, x.shape)
  elif start == "none":
    x0 = x
  else:
    raise errors.UserError(f"unknown start {start!r}; valid: {', '.join(STARTS)}")
  return project(x0, x, eps, norm)


def sign_step(x_adv: Array, grad: Array, step_size) -> Array:
  """The PGD step rule: x + step_size * sign(grad)."""
  return x_adv + step_size * jnp.sign(grad)


def ascend(loss_fn: LossFn, x: Array, *, eps, step_size, steps: int, key: Array,
           start: str = "uniform", sigma: float = 0.001, step_rule: Optional[StepRule] = None,
           with_step: bool = False, track: Optional[Tuple[Any, Callable]] = None,
           norm: str = "linf"):
  """Maximise sum(loss_fn(x_adv)) over the `norm` eps-ball around x with `steps` projected steps.

  step_rule(x_adv, grad, step_size) defaults to the norm's steepest step (norms.steepest_step:
  sign under L-inf, grad / ||grad||_2 under L2, a sparse step under L1).

  with_step: loss_fn(x_adv, i) also gets the step index i (e.g. fresh random draws per
  step), and step_size may be a function of i. track = (state, update): loss_fn returns
  (per-example loss, aux), every iterate updates state = update(state, x_adv, aux), and
  ascend returns (x_final, state) (e.g. the best iterate so far).
  """
  x = check_images(x)
  norm = check_norm(norm)
  check_eps(eps, norm, _pixels(x))
  if step_rule is None:
    step_rule = lambda x_adv, grad, size: norms.steepest_step(x_adv, grad, size, norm)

  def objective(z, i):
    value = loss_fn(z, i) if with_step else loss_fn(z)
    value, aux = value if track is not None else (value, None)
    return jnp.sum(value), aux

  grad_fn = jax.grad(objective, has_aux=True)
  size_at = step_size if callable(step_size) else lambda i: step_size

  def body(i, carry):
    x_adv, state = carry
    grad, aux = grad_fn(x_adv, i)
    if track is not None:
      state = track[1](state, x_adv, aux)
    return project(step_rule(x_adv, grad, size_at(i)), x, eps, norm), state

  carry = (random_start(key, x, eps, start, sigma, norm), None if track is None else track[0])
  x_adv, state = jax.lax.fori_loop(0, steps, body, carry)
  x_adv = jax.lax.stop_gradient(x_adv)
  return x_adv if track is None else (x_adv, state)


def picked_loss(family, index) -> Callable:
  """(outputs, *labels) -> family[index](outputs, *labels) with a traced `index` (lax.switch):
  one compiled program serves every per-example loss of the family, and only the picked one is
  computed and differentiated.

  Its gradient with respect to the outputs is taken inside the picked branch, in the forward
  pass (a custom VJP), so that differentiating the family does not differentiate the switch:
  JAX traces that in about 6x the time of the switch's own branches (0.2-0.3 s per program
  for the six APGD losses). The backward pass scales each row's gradient by its cotangent,
  which is exact because a member's loss of row i depends on row i of the outputs only.
  """
  def value_and_output_grad(member):
    def run(outputs, *labels):
      def total(o):
        value = member(o, *labels)
        return jnp.sum(value), value
      (_, value), grad = jax.value_and_grad(total, has_aux=True)(outputs)
      return value, grad
    return run

  @jax.custom_vjp
  def picked(index, outputs, labels):
    return jax.lax.switch(index, family, outputs, *labels)

  def forward(index, outputs, labels):  # (the loss, the residual: its output gradient)
    return jax.lax.switch(index, [value_and_output_grad(m) for m in family], outputs, *labels)

  def backward(grad, cotangent):
    rows = lambda g: g * cotangent.reshape(cotangent.shape + (1,) * (g.ndim - 1))
    return None, jax.tree.map(rows, grad), None

  picked.defvjp(forward, backward)
  return lambda outputs, *labels: picked(index, outputs, labels)


def mean_over_draws(draw_loss: Callable[[Array, int], Any], draws: int) -> Callable:
  """z -> the mean over d < draws of draw_loss(z, d) (any pytree): Expectation over
  Transformation's loss (and, if draw_loss returns them, the draws' mean logits).

  Each draw is rematerialised in the backward pass, so memory stays that of one draw.
  """
  one = jax.checkpoint(draw_loss)
  return lambda z: jax.tree.map(lambda a: jnp.mean(a, axis=0),
                                jax.lax.map(lambda d: one(z, d), jnp.arange(draws)))


def misclassified_tracker(x: Array, y: Array):
  """ascend's `track` for a loss_fn whose aux is the logits: (last misclassified iterate, ever)."""
  def update(state, x_adv, logits):
    wrong = jnp.argmax(logits, -1) != y
    return jnp.where(per_image(wrong, x_adv), x_adv, state[0]), state[1] | wrong
  return (x, jnp.zeros(x.shape[:1], bool)), update


def prefer_misclassified(x_last: Array, last_logits: Array, y: Array, tracked) -> Array:
  """x_last where it is misclassified or no iterate was; else the last misclassified iterate."""
  x_wrong, ever_wrong = tracked
  earlier = ever_wrong & (jnp.argmax(last_logits, -1) == y)
  return jnp.where(per_image(earlier, x_last), x_wrong, x_last)


# ----------------------------------------------------------------- models under jit


def per_image(values: Array, like: Array) -> Array:
  """(N,) values reshaped to broadcast against a batch `like` of shape (N, ...)."""
  return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))


def as_partial(fn):
  """fn as a jax.tree_util.Partial, a pytree argument of jit (None passes through).

  A plain function becomes a Partial without arguments (compiled once per function object);
  a Partial(apply_fn, variables) passes its arrays as traced inputs: the weights are not
  baked into the program as constants, and new weights reuse the compilation. Its function
  runs under a jit of its own (`traced_once`).
  """
  if fn is None:
    return None
  if isinstance(fn, jax.tree_util.Partial):
    return jax.tree_util.Partial(traced_once(fn.func), *fn.args, **fn.keywords)
  return jax.tree_util.Partial(traced_once(fn))


_TRACED_ONCE_MARK = "_cas_jax_traced_once"
_JITTED = "_cas_jax_jitted"


def _marked_jit(func):
  jitted = jax.jit(func)
  setattr(jitted, _TRACED_ONCE_MARK, True)
  return jitted


@functools.lru_cache(maxsize=64)
def _jit_partial(func, args: tuple, keywords: tuple):
  return _marked_jit(functools.partial(func, *args, **dict(keywords)))


def held_function(func):
  """The function behind the wrappers cas_jax and JAX put around a model's function: the
  partial that jax.tree_util.Partial holds in a shim, the function under `traced_once`'s jit."""
  if type(func).__name__ == "_HashableCallableShim":  # how jax.tree_util.Partial holds a partial
    return held_function(func.fun)
  if getattr(func, _TRACED_ONCE_MARK, False):
    return held_function(func.__wrapped__)
  return func


def traced_once(func):
  """func under a jit of its own, the same object for the same func: every program that
  calls the model traces it once per input shape instead of at each call site (a network
  called by an attack's start, loop and final check, then by the next attack's program,
  was traced from Python each time; XLA inlines the call, the computation is unchanged).

  A functools.partial of hashable arguments (evaluate.bind_model's, one per checkpoint) gets
  the jit of any equal partial; any other func keeps its jit on itself (it lives as long as
  func); a callable that takes no attributes (a bound method) is returned as it is.
  """
  if getattr(func, _TRACED_ONCE_MARK, False):
    return func
  func = held_function(func)
  if type(func) is functools.partial:  # equal partials share one jit, as jit's own cache does
    try:
      return _jit_partial(func.func, func.args, tuple(sorted(func.keywords.items())))
    except TypeError:  # unhashable arguments (arrays): kept on the partial below
      pass
  jitted = getattr(func, _JITTED, None)
  if jitted is None:
    jitted = _marked_jit(func)
    try:
      setattr(func, _JITTED, jitted)
    except (AttributeError, TypeError):
      return func
  return jitted


def jit_with_model(*static_argnames: str):
  """jax.jit for functions of (model_fn, ...): model_fn travels as a Partial (`as_partial`)."""
  def decorate(fn):
    compiled = jax.jit(fn, static_argnames=static_argnames)

    @functools.wraps(fn)
    def call(model_fn, *args, **kwargs):
      return compiled(as_partial(model_fn), *args, **kwargs)
    call.jitted = compiled
    return call
  return decorate


def _pixels(x: Array) -> int:
  """The number of values per image of a batch x (D, the dimension of the eps-ball)."""
  return int(np.prod(x.shape[1:]))


def compiled_attack(*static_argnames: str):
  """jit for a public attack fn(model_fn, x, y, **options): x, y, norm and eps are checked
  first (one clear line; the norm's name lower-cased), model_fn travels as a Partial
  (`as_partial`), eps, key and the other options are traced except `static_argnames`. A
  Partial(apply_fn, variables) compiles once for any weights.
  """
  def decorate(fn):
    compiled = jit_with_model(*static_argnames)(fn)

    @functools.wraps(fn)
    def attack(model_fn, x, y, **options):
      x, y = check_images_and_labels(x, y)
      if "norm" in options:
        options["norm"] = check_norm(options["norm"])
      check_eps(options.get("eps", 0.5), options.get("norm", "linf"), _pixels(x))
      return compiled(model_fn, x, y, **options)
    attack.jitted = compiled.jitted
    return attack
  return decorate


def main_logits(model_fn, x: Array) -> Array:
  """The main head's logits of model_fn(x) (its CAS logits, if any, dropped)."""
  return split_outputs(model_fn(x))[0]


def call_model(model_fn, x: Array, keys: Array, randomized: bool):
  """model_fn(x), or model_fn(x, keys) (one draw per example) for a randomized model."""
  return model_fn(x, keys) if randomized else model_fn(x)


@jit_with_model("randomized")
def predict(model_fn, x: Array, keys: Array, randomized: bool = False) -> Array:
  """Main-head logits (one draw per example, from `keys`, for a randomized model)."""
  return split_outputs(call_model(model_fn, x, keys, randomized))[0]
