"""How an attacked image is judged: correct under the main head, or under most of `draws`
fresh draws of a randomized model (each image's draws from its own key, a stream of its own).

    check = verdicts.judge(model_fn, None, 0)          # deterministic: one forward pass
    still_correct, passes, padding_rows = check(x_adv, y, keys)
    check = verdicts.judge(None, random_model_fn, 10)  # randomized: the majority of 10 draws

A report's judge cuts and pads its batches to sizes of its own (`shapes`, a
cascade.BatchShapes), so that the verdict program compiles for at most 3 batch sizes however
many sizes the attacks ran at; the rows that padding adds are the judge's third value.

Every attack of a report and the public `autoattack()` judge with these, so a verdict does
not depend on which entry point ran the attack.
"""
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from cas_jax.attacks import cascade
from cas_jax.attacks import engine

Array = jax.Array
VERDICT_STREAM = 0x7E5  # fold_in tag of the fresh draws that judge a randomized model
# (x_adv, y, keys) -> (still classified correctly (B,), forward passes per image, padding rows
# the judge added beyond the batch, its passes included)
Judge = Callable[[Array, Array, Array], tuple]


@jax.jit
def correct(model, x: Array, y: Array) -> Array:
  """Per image, whether the model's main head classifies it y."""
  return jnp.argmax(engine.main_logits(model, x), -1) == y


@functools.partial(jax.jit, static_argnames="draws")
def correct_fraction(random_model, x: Array, y: Array, keys: Array, draws: int) -> Array:
  """Per image, the fraction of `draws` fresh draws of a randomized model that classify it y."""
  keys = engine.fold_keys(keys, VERDICT_STREAM)
  hits = jax.lax.map(lambda d: jnp.argmax(engine.main_logits(
      lambda z: random_model(z, engine.fold_keys(keys, d)), x), -1) == y, jnp.arange(draws))
  return jnp.mean(hits, axis=0)


def judge(model, random_model: Optional[Callable], draws: int,
          shapes: Optional[cascade.BatchShapes] = None) -> Judge:
  """(x_adv, y, keys) -> (still correct, forward passes, padding rows): `model`, or most of
  `draws` draws of `random_model` when draws > 0; in batches of `shapes`' sizes if given."""
  passes = max(draws, 1)
  if draws:
    random_model = engine.as_partial(random_model)
    verdict = lambda x, y, keys: correct_fraction(random_model, x, y, keys, draws) > 0.5
  else:
    model = engine.as_partial(model)
    verdict = lambda x, y, keys: correct(model, x, y)

  def check(x_adv, y, keys):
    if shapes is None or shapes.size_for(y.shape[0]) == y.shape[0]:
      return verdict(x_adv, y, keys), passes, 0
    still, padding = _in_batches(verdict, shapes, x_adv, y, keys)
    return still, passes, passes * padding
  return check


def _in_batches(verdict, shapes: cascade.BatchShapes, x_adv, y, keys):
  """verdict over batches of `shapes`' sizes, each placed as the batch it comes from: the
  verdicts and the padding rows."""
  impl = jax.random.key_impl(keys)
  arrays = (x_adv, y, jax.random.key_data(keys))
  host = tuple(np.asarray(a) for a in arrays)
  still, padding = np.zeros(y.shape[0], bool), 0
  for take, rows in shapes.batches(np.arange(y.shape[0])):
    xb, yb, kb = (_placed_as(h[rows], a) for h, a in zip(host, arrays))
    value = verdict(xb, yb, jax.random.wrap_key_data(kb, impl=impl))
    still[take] = np.asarray(value)[:take.size]
    padding += rows.size - take.size
  return still, padding


def _placed_as(host: np.ndarray, array) -> Array:
  """host on the device(s) of `array`, with its sharding if it is committed to one: the
  verdict program compiled for the batches an attack hands over serves these too (a committed
  and an uncommitted input are two compilations)."""
  if getattr(array, "committed", False):
    return jax.device_put(host, array.sharding)
  return jax.device_put(host)  # uncommitted, as jnp.asarray gives, without its staging program
