"""How an attacked image is judged: correct under the main head, or under most of `draws`
fresh draws of a randomized model (each image's draws from its own key, a stream of its own).

    check = verdicts.judge(model_fn, None, 0)          # deterministic: one forward pass
    still_correct, passes = check(x_adv, y, keys)
    check = verdicts.judge(None, random_model_fn, 10)  # randomized: the majority of 10 draws

Every attack of a report and the public `autoattack()` judge with these, so a verdict does
not depend on which entry point ran the attack.
"""
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from cas_jax.attacks import engine

Array = jax.Array
VERDICT_STREAM = 0x7E5  # fold_in tag of the fresh draws that judge a randomized model
# (x_adv, y, keys) -> (still classified correctly (B,), forward passes it took)
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


def judge(model, random_model: Optional[Callable], draws: int) -> Judge:
  """(x_adv, y, keys) -> (still correct, forward passes): `model`, or most of `draws` draws
  of `random_model` when draws > 0."""
  if not draws:
    return lambda x_adv, y, keys: (correct(engine.as_partial(model), x_adv, y), 1)
  random_model = engine.as_partial(random_model)
  return lambda x_adv, y, keys: (correct_fraction(random_model, x_adv, y, keys, draws) > 0.5,
                                 draws)
