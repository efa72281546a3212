"""Each attack breaks images that a weaker one leaves standing: an attack that returned its
input unchanged (or only its random start) fails every test here.

A ReLU network on 64 random 4x4x3 images, labelled by its own predictions (all correct).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cas_jax.attacks.apgd import apgd
from cas_jax.attacks.fab import fab
from cas_jax.attacks.randomized import eot_pgd
from cas_jax.attacks.square import square
from cas_jax.attacks.white_box import fgsm

N, EPS = 64, 0.05
W1 = jax.random.normal(jax.random.key(0), (48, 32)) / np.sqrt(48)
W2 = jax.random.normal(jax.random.key(1), (32, 10)) / np.sqrt(32)
NOISE = jax.random.normal(jax.random.key(5), (48, 10))
X = jax.random.uniform(jax.random.key(3), (N, 4, 4, 3))
KEY = jax.random.key(7)


def mlp(x):
  return jax.nn.relu(x.reshape(x.shape[0], -1) @ W1) @ W2 * 4.0


def masked(x):
  """mlp without a gradient: only a query-based attack can move."""
  return jax.lax.stop_gradient(mlp(x))


def noisy_gradient(x, keys):
  """mlp's logits exactly, but each draw adds +-3 NOISE to the input gradient (mean zero)."""
  sign = jax.vmap(lambda k: jnp.where(jax.random.bernoulli(k), 1.0, -1.0))(keys)
  flat = x.reshape(x.shape[0], -1)
  return mlp(x) + ((flat - jax.lax.stop_gradient(flat)) @ NOISE) * (3.0 * sign[:, None])


Y = jnp.argmax(mlp(X), -1)


def broken(x_adv):
  return np.asarray(jnp.argmax(mlp(x_adv), -1) != Y)


@pytest.fixture(scope="module")
def fgsm_broken():
  return broken(fgsm(mlp, X, Y, eps=EPS, key=KEY))


def _stronger(strong, weak, margin):
  assert strong.sum() >= weak.sum() + margin, (strong.sum(), weak.sum())
  assert np.any(strong & ~weak)  # some image only the stronger attack breaks


def test_apgd_breaks_images_fgsm_leaves(fgsm_broken):
  _stronger(broken(apgd(mlp, X, Y, eps=EPS, key=KEY, steps=10)), fgsm_broken, 4)


def test_fab_breaks_images_fgsm_leaves(fgsm_broken):
  _stronger(broken(fab(mlp, X, Y, eps=EPS, key=KEY, steps=10, target_ranks=range(2, 5))),
            fgsm_broken, 4)


def test_square_breaks_a_model_without_gradients_that_apgd_cannot():
  by_apgd = broken(apgd(masked, X, Y, eps=EPS, key=KEY, steps=10))
  by_square = broken(square(masked, X, Y, eps=EPS, key=KEY, queries=200))
  _stronger(by_square, by_apgd, 5)


def test_eot_averages_the_gradient_over_draws():
  one = broken(eot_pgd(noisy_gradient, X, Y, eps=EPS, steps=10, draws=1, key=KEY))
  many = broken(eot_pgd(noisy_gradient, X, Y, eps=EPS, steps=10, draws=32, key=KEY))
  _stronger(many, one, 5)
