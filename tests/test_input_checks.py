"""Every public attack and evaluate.robustness_report: numpy or JAX inputs alike, bad ones refused.

engine.check_images_and_labels is the one check behind them: NHWC images in [0, 1], one
integer label per image; shapes also under jit, values only where they are concrete.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cas_jax import attacks
from cas_jax.evaluation import evaluate
from cas_jax.evaluation.attack_registry import AttackBudget
from cas_jax.attacks import engine

W = jnp.asarray(np.random.default_rng(0).standard_normal((48, 10)) / 7, jnp.float32)
KEY = jax.random.key(0)


def linear(x):
  return x.reshape(x.shape[0], -1) @ W


def noisy_linear(x, keys):
  return linear(x)


def _data(n=8):
  rng = np.random.default_rng(1)
  x = rng.uniform(0.0, 1.0, (n, 4, 4, 3)).astype(np.float32)
  return x, np.argmax(np.asarray(linear(jnp.asarray(x))), -1).astype(np.int64)


# Every public function that takes images and labels, called with tiny budgets.
ENTRY_POINTS = {
    "pgd": functools.partial(attacks.pgd, linear, steps=2),
    "fgsm": functools.partial(attacks.fgsm, linear),
    "cw_inf": functools.partial(attacks.cw_inf, linear, steps=2),
    "margin_decomposition": functools.partial(attacks.margin_decomposition, linear, steps=2),
    "eot_pgd": functools.partial(attacks.eot_pgd, noisy_linear, steps=2, draws=1),
    "avg_pgd": functools.partial(attacks.avg_pgd, noisy_linear, steps=2, draws=1),
    "transfer": functools.partial(attacks.transfer, linear, steps=2),
    "n_attack": functools.partial(attacks.n_attack, linear, population=4, max_iters=2),
    "apgd": functools.partial(attacks.apgd, linear, steps=2),
    "fab": functools.partial(attacks.fab, linear, steps=2),
    "square": functools.partial(attacks.square, linear, queries=2),
    "autoattack": functools.partial(attacks.autoattack, linear, apgd_steps=2, fab_steps=2,
                                    square_queries=2, target_classes=2),
    "robustness_report": lambda x, y, eps, key: evaluate.robustness_report(
        linear, x, y, eps=eps, key=key, attacks="pgd2"),
}


def test_every_public_attack_is_checked():
  """A new public attack must be added to ENTRY_POINTS (and so to these checks)."""
  takes_images = {name for name in attacks.__all__
                  if name not in ("ascend", "project", "attack_loss", "ATTACK_LOSSES")}
  assert takes_images == set(ENTRY_POINTS) - {"robustness_report"}


@pytest.mark.parametrize("name", ["pgd", "autoattack"])
def test_numpy_inputs_give_the_jax_result(name):
  x, y = _data()
  from_numpy = ENTRY_POINTS[name](x, y, eps=0.1, key=KEY)
  from_jax = ENTRY_POINTS[name](jnp.asarray(x), jnp.asarray(y, jnp.int32), eps=0.1, key=KEY)
  np.testing.assert_array_equal(np.asarray(from_numpy), np.asarray(from_jax))
  assert np.abs(np.asarray(from_jax) - x).max() > 0.0  # the attack did move


def test_robustness_report_takes_numpy_and_jax_alike():
  x, y = _data()
  options = dict(eps=0.1, key=KEY, attacks="pgd2,aa", budget=AttackBudget(
      apgd_steps=2, fab_steps=2, square_queries=2, target_classes=2))
  from_numpy = evaluate.robustness_report(linear, x, y, **options)
  from_jax = evaluate.robustness_report(linear, jnp.asarray(x), jnp.asarray(y), **options)
  for name, verdict in from_numpy.verdicts.items():
    np.testing.assert_array_equal(verdict, from_jax.verdicts[name], err_msg=name)


BAD_INPUTS = {
    # name: (change to (x, y), message the error must contain)
    "8-bit pixels": (lambda x, y: (np.round(x * 255), y), r"\[0, 1\].*x / 255"),
    "negative pixels": (lambda x, y: (x - 0.5, y), r"in \[0, 1\], got values in \[-0\.4"),
    "nan pixels": (lambda x, y: (np.where(x > 0.9, np.nan, x), y), r"\[0, 1\]"),
    "one image without the batch axis": (lambda x, y: (x[0], y[:1]), r"rank 4.*x\[None\]"),
    "flat images": (lambda x, y: (x.reshape(len(y), -1), y), r"rank 4.*flatten inside"),
    "fewer labels than images": (lambda x, y: (x, y[:-1]), r"shape \(N,\) = \(8,\)"),
    "one-hot labels": (lambda x, y: (x, np.eye(10)[y]), r"one per image.*argmax"),
    "float labels": (lambda x, y: (x, y.astype(np.float32)), r"integer.*astype\(int\)"),
}


@pytest.mark.parametrize("bad", sorted(BAD_INPUTS))
@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_bad_images_or_labels_raise_a_value_error_naming_the_fix(name, bad):
  change, message = BAD_INPUTS[bad]
  x, y = change(*_data())
  with pytest.raises(ValueError, match=message):
    ENTRY_POINTS[name](x, y, eps=0.1, key=KEY)


def test_under_jit_shapes_are_checked_and_values_cannot_be():
  x, y = _data()
  pgd = jax.jit(lambda x, y: attacks.pgd(linear, x, y, eps=0.1, steps=2, key=KEY))
  with pytest.raises(ValueError, match="rank 4"):
    pgd(x[0], y[:1])
  with pytest.raises(ValueError, match="one per image"):
    pgd(x, y[:-1])
  # Traced values are unknown when the check runs: out-of-range images pass through.
  assert pgd(x * 255, y).shape == x.shape
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    engine.ascend(lambda z: jnp.sum(z, (1, 2, 3)), x * 255, eps=0.1, step_size=0.01, steps=1,
                  key=KEY)
