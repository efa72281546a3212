"""Tests for the white-box and black-box attacks (pgd.py, randomized.py, blackbox.py).

Tiny models written here: a linear model logits = x.flatten() @ W + b (whose worst-case L-inf
perturbation is known in closed form), a small MLP trained on separable synthetic data and a
randomized linear model. The attack losses by name: tests/test_attack_losses.py.
"""
import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cas_jax import losses
from cas_jax.attacks import blackbox
from cas_jax.attacks import engine
from cas_jax.attacks import white_box
from cas_jax.attacks import randomized

SHAPE = (4, 4, 1)
DIM = 16
N = 8

# Jitted once per (model_fn, shapes, static options): a test that reuses a model object and a
# batch shape reuses the compiled attack. It also shows every attack is jit-able.
pgd = jax.jit(white_box.pgd, static_argnums=0, static_argnames=("steps", "loss", "start"))
fgsm = jax.jit(white_box.fgsm, static_argnums=0, static_argnames=("loss",))
cw_inf = jax.jit(white_box.cw_inf, static_argnums=0, static_argnames=("steps", "loss"))
margin_decomposition = jax.jit(white_box.margin_decomposition, static_argnums=0,
                               static_argnames=("steps", "restarts", "change_point", "beta"))
eot_pgd = jax.jit(randomized.eot_pgd, static_argnums=0,
                  static_argnames=("steps", "draws", "loss", "noise_std", "start",
                                   "keep_misclassified"))
avg_pgd = jax.jit(randomized.avg_pgd, static_argnums=0,
                  static_argnames=("steps", "draws", "loss", "noise_std"))
transfer = jax.jit(blackbox.transfer, static_argnums=0, static_argnames=("attack", "steps", "loss"))
n_attack = jax.jit(blackbox.n_attack, static_argnums=0, static_argnames=("population", "max_iters"))


def _linear_fn(w, b):
  return lambda x: x.reshape(x.shape[0], -1) @ w + b


def _normal(seed, shape, scale=1.0):
  """Test data from NumPy: eager jax.random calls would each compile."""
  return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@functools.lru_cache(maxsize=None)
def _linear_model(seed, classes):
  return _linear_fn(_normal(seed, (DIM, classes)), _normal(seed + 1000, (classes,), 0.1))


@functools.lru_cache(maxsize=None)
def _ignoring_keys(model_fn):
  """A deterministic model in the randomized-model signature (x, keys) -> outputs."""
  return lambda x, keys: model_fn(x)


@functools.lru_cache(maxsize=None)
def _query_only(model_fn):
  """model_fn with a backward pass that raises: only query-based attacks can run on it."""
  @jax.custom_vjp
  def query_only_fn(x):
    return model_fn(x)

  def backward(residuals, g):
    raise AssertionError("the attack differentiated the model")

  query_only_fn.defvjp(lambda x: (model_fn(x), None), backward)
  return query_only_fn


def _noisy_linear_fn(w, b, noise_scale):
  """A randomized model: weights W + noise_scale * N(0, 1), drawn per example from keys[i]."""
  def random_model_fn(x, keys):
    noise = jax.vmap(lambda k: jax.random.normal(k, w.shape))(keys)
    return jnp.einsum("nd,ndc->nc", x.reshape(x.shape[0], -1), w + noise_scale * noise) + b
  return random_model_fn


# Two classes with w_1 - w_0 = +-2 in every coordinate, under unit weight noise per draw.
_COLUMN = jnp.sign(_normal(8, (DIM,)))
NOISY_W = jnp.stack([_COLUMN, -_COLUMN], axis=1)
NOISY_LINEAR = _noisy_linear_fn(NOISY_W, jnp.zeros(2), 1.0)


def _images(seed, n, low=0.0, high=1.0):
  return jnp.asarray(np.random.default_rng(seed).uniform(low, high, (n,) + SHAPE), jnp.float32)


def _edge_images(n):
  """Images with pixels at and near 0 and 1, where the [0, 1] box is active."""
  x = np.array(_images(1, n))
  flat = x.reshape(n, -1)
  flat[:, :4] = [0.0, 1.0, 0.002, 0.998]
  return jnp.asarray(flat.reshape(x.shape))


def _predict(model_fn, x):
  return jnp.argmax(engine.split_outputs(model_fn(x))[0], axis=-1)


def _accuracy(model_fn, x, y):
  return float(jnp.mean(_predict(model_fn, x) == y))


# Every attack as f(model_fn, x, y, eps, key), with few steps.
ATTACKS = {
    "pgd": lambda m, x, y, eps, key: pgd(m, x, y, eps=eps, steps=5, key=key),
    "fgsm": lambda m, x, y, eps, key: fgsm(m, x, y, eps=eps, key=key),
    "cw_inf": lambda m, x, y, eps, key: cw_inf(m, x, y, eps=eps, steps=5, key=key),
    "md": lambda m, x, y, eps, key: margin_decomposition(m, x, y, eps=eps, steps=6, key=key,
                                                         restarts=2),
    "eot_pgd": lambda m, x, y, eps, key: eot_pgd(NOISY_LINEAR, x, y, eps=eps, steps=20,
                                                 draws=32, key=key, loss="cw"),
    "avg_pgd": lambda m, x, y, eps, key: avg_pgd(_ignoring_keys(m), x, y, eps=eps, steps=5,
                                                 draws=2, key=key, noise_std=0.05),
    "transfer_cw": lambda m, x, y, eps, key: transfer(m, x, y, attack="cw", eps=eps, steps=5,
                                                      key=key),
    "n_attack": lambda m, x, y, eps, key: n_attack(_query_only(m), x, y, eps=eps, key=key,
                                                   population=32, max_iters=40),
}
RAW_ATTACKS = {  # unjitted, so that a Python eps is checked
    "pgd": white_box.pgd, "fgsm": white_box.fgsm, "cw_inf": white_box.cw_inf,
    "md": white_box.margin_decomposition, "transfer": blackbox.transfer,
    "n_attack": blackbox.n_attack,
    "eot_pgd": lambda m, *args, **kw: randomized.eot_pgd(_ignoring_keys(m), *args, **kw),
    "avg_pgd": lambda m, *args, **kw: randomized.avg_pgd(_ignoring_keys(m), *args, **kw),
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attacks_stay_in_eps_ball_and_box(name):
  model_fn = _linear_model(0, 3)
  x = _edge_images(N)
  y = jnp.arange(N, dtype=jnp.int32) % 2  # NOISY_LINEAR has two classes
  for eps in (0.03, 0.5):
    x_adv = ATTACKS[name](model_fn, x, y, eps, jax.random.key(2))
    chex.assert_shape(x_adv, x.shape)
    assert float(jnp.max(jnp.abs(x_adv - x))) <= eps + 1e-6
    assert float(jnp.min(x_adv)) >= 0.0 and float(jnp.max(x_adv)) <= 1.0
    assert float(jnp.max(jnp.abs(x_adv - x))) > 0.0  # the attack did move


@pytest.mark.parametrize("name", sorted(RAW_ATTACKS))
def test_eps_outside_unit_interval_raises(name):
  for eps in (0.0, -0.1, 1.5):
    with pytest.raises(ValueError, match=r"outside \(0, 1\]"):
      RAW_ATTACKS[name](_linear_model(0, 3), _images(0, 2), jnp.zeros(2, jnp.int32), eps=eps,
                        key=jax.random.key(0))


@pytest.mark.parametrize("name", ["pgd", "fgsm", "cw_inf", "eot_pgd", "avg_pgd", "transfer"])
def test_unknown_loss_raises_listing_valid_names(name):
  with pytest.raises(ValueError, match="unknown attack loss 'xent'.*joint_ce"):
    RAW_ATTACKS[name](_linear_model(0, 3), _images(0, 2), jnp.zeros(2, jnp.int32), eps=0.1,
                      key=jax.random.key(0), loss="xent")


def test_unknown_transfer_attack_and_bad_md_change_point_raise():
  x, y, key = _images(0, 2), jnp.zeros(2, jnp.int32), jax.random.key(0)
  with pytest.raises(ValueError, match="valid: pgd, cw"):
    blackbox.transfer(_linear_model(0, 3), x, y, attack="fgsm", eps=0.1, key=key)
  with pytest.raises(ValueError, match="change_point"):
    white_box.margin_decomposition(_linear_model(0, 3), x, y, eps=0.1, steps=4,
                                   change_point=5, key=key)
  with pytest.raises(ValueError, match="restarts"):
    white_box.margin_decomposition(_linear_model(0, 3), x, y, eps=0.1, restarts=0, key=key)


# ---------------------------------------------------------------- closed form on a linear model


@pytest.mark.parametrize("attack", [
    lambda m, x, y, key: pgd(m, x, y, eps=0.05, steps=20, key=key),
    lambda m, x, y, key: cw_inf(m, x, y, eps=0.05, steps=20, key=key),
    lambda m, x, y, key: margin_decomposition(m, x, y, eps=0.05, key=key),
    # Crafted on the source alone (here the model itself): the source's worst case.
    lambda m, x, y, key: transfer(m, x, y, eps=0.05, steps=20, key=key),
    lambda m, x, y, key: transfer(m, x, y, attack="cw", eps=0.05, steps=20, key=key),
], ids=["pgd_ce", "cw_inf", "md", "transfer_pgd", "transfer_cw"])
def test_linear_model_worst_case_found(attack):
  """Two classes: the worst case of the margin is x - eps sign(w_y - w_t), margin + eps |w_y - w_t|_1."""
  w = _normal(5, (DIM, 2))
  b = jnp.array([0.3, -0.2])
  model_fn = _linear_fn(w, b)
  x = _images(6, 8, low=0.2, high=0.8)  # interior: the box is never active at eps = 0.05
  y = jnp.arange(8, dtype=jnp.int32) % 2
  direction = (w[:, 1 - y] - w[:, y]).T  # (N, DIM): gradient of the margin z_t - z_y
  expected_x = x + 0.05 * jnp.sign(direction).reshape(x.shape)
  expected_margin = (losses.margin(model_fn(x), y) + 0.05 * jnp.sum(jnp.abs(direction), axis=1))
  x_adv = attack(model_fn, x, y, jax.random.key(7))
  chex.assert_trees_all_close(x_adv, expected_x, atol=1e-6)
  chex.assert_trees_all_close(losses.margin(model_fn(x_adv), y), expected_margin, atol=1e-5)


def test_eot_ascends_the_expected_loss():
  """Gradients of one draw are noisy; averaged over many draws PGD reaches the mean model's optimum."""
  x = _images(9, N, low=0.2, high=0.8)
  y = jnp.arange(N, dtype=jnp.int32) % 2
  direction = (NOISY_W[:, 1 - y] - NOISY_W[:, y]).T  # the mean model's margin gradient
  expected_x = x + 0.05 * jnp.sign(direction).reshape(x.shape)
  x_adv = eot_pgd(NOISY_LINEAR, x, y, eps=0.05, steps=20, draws=32, key=jax.random.key(10),
                  loss="cw", keep_misclassified=False)  # the last iterate: the trajectory's end
  chex.assert_trees_all_close(x_adv, expected_x, atol=1e-6)
  # A single draw per step follows the noise: it misses the optimum on some pixels.
  one_draw = eot_pgd(NOISY_LINEAR, x, y, eps=0.05, steps=20, draws=1, key=jax.random.key(10),
                     loss="cw", keep_misclassified=False)
  assert float(jnp.mean(jnp.abs(one_draw - expected_x) < 1e-6)) < 0.95


def test_eot_on_deterministic_model_equals_pgd():
  model_fn = _linear_model(0, 3)
  x, y, key = _edge_images(N), jnp.arange(N, dtype=jnp.int32) % 2, jax.random.key(12)
  eot = eot_pgd(_ignoring_keys(model_fn), x, y, eps=0.1, steps=5, draws=3, key=key)
  np.testing.assert_array_equal(eot, pgd(model_fn, x, y, eps=0.1, steps=5, key=key))


def _ridge_model(center: float):
  """Class 1 wins only within 0.025 of mean pixel `center`, where its logit (and the loss of
  class 0) peaks: sign steps of 0.05 bounce across the ridge, misclassified every other step."""
  return lambda x: jnp.stack(
      [jnp.zeros(x.shape[0]), 0.1 - 160.0 * (jnp.mean(x, axis=(1, 2, 3)) - center) ** 2], -1)


@pytest.mark.parametrize("attack", ["pgd", "cw_inf", "eot_pgd"])
def test_pgd_family_keeps_any_misclassified_iterate(attack):
  """Broken with keep_misclassified == broken by the last iterate of some shorter run (runs of
  1..S steps share their trajectory's prefix): an independent computation of every iterate."""
  model_fn, x = _ridge_model(0.6), jnp.full((16,) + SHAPE, 0.5)
  y, key, steps = jnp.zeros(16, jnp.int32), jax.random.key(21), 9
  run = {"pgd": lambda m, **kw: white_box.pgd(m, x, y, **kw),
         "cw_inf": lambda m, **kw: white_box.cw_inf(m, x, y, **kw),
         "eot_pgd": lambda m, **kw: randomized.eot_pgd(_ignoring_keys(m), x, y, draws=2, **kw)}
  attack_fn = functools.partial(run[attack], model_fn, eps=0.2, key=key, step_size=0.05)
  broken = lambda x_adv: np.asarray(jnp.argmax(model_fn(x_adv), -1) != y)
  by_prefix = [broken(attack_fn(steps=s, keep_misclassified=False)) for s in range(steps + 1)]
  kept = attack_fn(steps=steps)
  np.testing.assert_array_equal(broken(kept), np.any(by_prefix, axis=0))
  assert np.any(by_prefix, axis=0).sum() > by_prefix[-1].sum()  # some last iterates recover
  assert float(jnp.max(jnp.abs(kept - x))) <= 0.2 + 1e-6


# ---------------------------------------------------------------- a trained model


@functools.lru_cache(maxsize=None)
def _trained_mlp():
  """A 2-layer MLP trained on two separable classes (pixel means 0.35 vs 0.65)."""
  def data(seed, n):
    y = jnp.arange(n, dtype=jnp.int32) % 2
    x = 0.35 + 0.3 * y[:, None, None, None] + _normal(seed, (n,) + SHAPE, 0.05)
    return jnp.clip(x, 0.0, 1.0), y

  def model_fn(params, x):
    h = jax.nn.relu(x.reshape(x.shape[0], -1) @ params["w1"] + params["b1"])
    return h @ params["w2"] + params["b2"]

  params = {"w1": _normal(13, (DIM, 16), 0.3), "b1": jnp.zeros(16),
            "w2": _normal(14, (16, 2), 0.3), "b2": jnp.zeros(2)}
  x_train, y_train = data(15, 256)
  optimizer = optax.adam(1e-2)

  def train_step(_, state):
    params, opt_state = state
    grads = jax.grad(lambda p: jnp.mean(losses.cross_entropy(model_fn(p, x_train), y_train)))(
        params)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state

  train = jax.jit(lambda params: jax.lax.fori_loop(0, 300, train_step,
                                                   (params, optimizer.init(params)))[0])
  params = train(params)
  x_test, y_test = data(16, 16)
  return functools.partial(model_fn, params), x_test, y_test


def test_accuracy_under_pgd_falls_to_zero_as_eps_grows():
  model_fn, x, y = _trained_mlp()
  assert _accuracy(model_fn, x, y) == 1.0
  accuracies = [_accuracy(model_fn, pgd(model_fn, x, y, eps=eps, steps=20, key=jax.random.key(0)),
                          y) for eps in (0.01, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5)]
  assert accuracies[0] >= 0.9, accuracies
  assert accuracies[-1] == 0.0, accuracies
  assert all(b <= a + 1 / 16 for a, b in zip(accuracies, accuracies[1:])), accuracies


def test_margin_decomposition_breaks_trained_model_at_large_eps():
  model_fn, x, y = _trained_mlp()
  x_adv = margin_decomposition(model_fn, x, y, eps=0.5, steps=10, key=jax.random.key(1))
  assert _accuracy(model_fn, x_adv, y) == 0.0


def test_keep_best_prefers_breaking_then_larger_margin():
  y = jnp.array([0, 0, 0])
  x0, x1 = jnp.zeros((3, 1)), jnp.ones((3, 1))
  # Example 0: only the candidate breaks. 1: both break, the best has the larger margin.
  # 2: neither breaks, the candidate has the larger margin.
  best = white_box.init_best(x0, jnp.array([[2.0, 0.0], [-1.0, 3.0], [3.0, 0.0]]), y)
  best = white_box.keep_best(best, x1, jnp.array([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]]), y)
  x_best, margin, broken = best
  np.testing.assert_array_equal(x_best[:, 0], [1.0, 0.0, 1.0])
  np.testing.assert_allclose(margin, [1.0, 4.0, -1.0])
  np.testing.assert_array_equal(broken, [True, True, False])
  # A later non-breaking candidate never replaces a breaking one, whatever its margin.
  later = jnp.array([[5.0, 0.0], [5.0, 0.0], [0.5, 0.0]])  # ex. 2: a larger margin again
  x_best, _, broken = white_box.keep_best(best, 2 * x1, later, y)
  np.testing.assert_array_equal(x_best[:, 0], [1.0, 0.0, 2.0])


# ---------------------------------------------------------------- batching and compilation


@pytest.mark.parametrize("name", ["pgd", "md", "eot_pgd", "n_attack"])
def test_result_does_not_depend_on_batching(name):
  model_fn = _linear_model(0, 3)
  x = _images(14, N)
  y = _predict(model_fn, x)
  key = jax.random.key(15)
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(N))  # from global indices
  attack = functools.partial(ATTACKS[name], model_fn, eps=0.1)
  whole = attack(x, y, key=key)
  halves = jnp.concatenate([attack(x[:4], y[:4], key=keys[:4]),
                            attack(x[4:], y[4:], key=keys[4:])])
  # N-Attack's 40 search iterations of a continuous update drift by up to ~1.5e-5 when a
  # build picks another matmul kernel for the half batch (a 1-ulp change of the weights moves
  # them that far); a batching mistake moves pixels by ~eps = 0.1. The verdicts are exact.
  chex.assert_trees_all_close(whole, halves, atol=1e-4 if name == "n_attack" else 1e-6, rtol=0)
  np.testing.assert_array_equal(_predict(model_fn, whole), _predict(model_fn, halves))
  assert float(jnp.max(jnp.abs(whole - x))) > 0.0


def test_compiled_pgd_is_one_loop_whatever_the_steps():
  model_fn = _linear_model(0, 3)
  x, y = _images(0, 2), jnp.zeros(2, jnp.int32)

  def jaxpr_text(steps):
    return str(jax.make_jaxpr(
        lambda z: white_box.pgd(model_fn, z, y, eps=0.1, steps=steps, key=jax.random.key(0)))(x))

  short, long = jaxpr_text(5), jaxpr_text(50)
  # fori_loop with a static trip count lowers to scan; either way exactly one loop primitive.
  assert len(re.findall(r"\b(?:while|scan)\[", short)) == 1
  assert short.count("dot_general") == long.count("dot_general")
  assert len(short.splitlines()) == len(long.splitlines())


# ---------------------------------------------------------------- black-box


def test_n_attack_breaks_linear_model_by_queries_only():
  """The model's backward pass raises, so N-Attack succeeds without any jax.grad through it."""
  model_fn = _query_only(_linear_model(0, 3))
  with pytest.raises(AssertionError, match="differentiated"):
    jax.grad(lambda z: jnp.sum(model_fn(z)))(_images(21, 2))
  x = _images(19, N, low=0.3, high=0.7)
  y = _predict(model_fn, x)
  x_adv = ATTACKS["n_attack"](model_fn, x, y, 0.3, jax.random.key(20))
  assert _accuracy(model_fn, x_adv, y) <= 0.25
  assert float(jnp.max(jnp.abs(x_adv - x))) <= 0.3 + 1e-6


def test_n_attack_loss_is_log_probability_gap():
  logits = jnp.array([[2.0, 0.5, -1.0], [0.0, 3.0, 1.0]])
  y = jnp.array([0, 0])
  log_p = jax.nn.log_softmax(logits)
  gap = log_p[:, 0] - jnp.max(log_p[:, 1:], axis=1)
  chex.assert_trees_all_close(blackbox.n_attack_loss(logits, y), jnp.clip(gap, 0.0, 1000.0))
  np.testing.assert_allclose(blackbox.n_attack_loss(logits, y), [1.5, 0.0])
