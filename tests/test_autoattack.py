"""Tests for the JAX AutoAttack: APGD, FAB-T, Square and the staged ensemble.

Small models, 8 images and few steps or queries; the same model functions and shapes are
reused so that compilations are shared. The parity tests against torchattacks are in
test_autoattack_torchattacks.py.
"""
import fractions
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cas_jax import losses
from cas_jax.attacks import engine
from cas_jax.attacks.apgd import apgd, apgd_loss, apgd_run, checkpoints, should_halve
from cas_jax.attacks.autoattack import autoattack
from cas_jax.attacks.fab import fab, project_onto_hyperplane_linf
from cas_jax.attacks.square import square, square_fraction

N, SHAPE, CLASSES = 8, (4, 4, 3), 10
EPS = 0.05
TOL = 1e-6  # float32 rounding of x +- eps


def _weights(seed, *shape):
  return jax.random.normal(jax.random.key(seed), shape) / np.sqrt(shape[0])


W_HIDDEN, W_OUT, W_CAS = _weights(0, 48, 32), _weights(1, 32, CLASSES), _weights(2, 48, CLASSES)


def mlp(x):
  """A small ReLU network on flattened 4x4x3 images."""
  return jax.nn.relu(x.reshape(x.shape[0], -1) @ W_HIDDEN) @ W_OUT * 4.0


def cas_mlp(x):
  """mlp plus one CAS-like head that reads the input through other weights."""
  return mlp(x), (x.reshape(x.shape[0], -1) @ W_CAS * 4.0,)


def noisy_mlp(x, keys):
  """A randomized defense: Gaussian input noise drawn from each example's key."""
  return mlp(x + 0.02 * engine.per_example(lambda k, s: jax.random.normal(k, s), keys, x.shape))


def _images(seed=3):
  x = jax.random.uniform(jax.random.key(seed), (N,) + SHAPE)
  # Pixels on the box faces: an attack must not push them out of [0, 1].
  return x.at[:, 0].set(jnp.round(x[:, 0]))


X = _images()
Y = jnp.argmax(mlp(X), -1).at[0].set((jnp.argmax(mlp(X[:1]), -1)[0] + 1) % CLASSES)
KEY = jax.random.key(7)


def _assert_in_ball(x_adv, x, eps):
  chex.assert_shape(x_adv, x.shape)
  assert float(jnp.max(jnp.abs(x_adv - x))) <= eps + TOL
  assert float(jnp.min(x_adv)) >= 0.0 and float(jnp.max(x_adv)) <= 1.0


# ---------------------------------------------------------------- APGD


def _reference_checkpoints(torch, apgd_class, steps):
  """The iterations after which torchattacks' APGD checks its step size, read off its own run."""
  torch.manual_seed(0)
  net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
  attack = apgd_class(net, eps=0.1, steps=steps)
  seen, check = [], attack.check_oscillation
  attack.check_oscillation = lambda x, j, *rest, **kw: seen.append(j + 1) or check(x, j, *rest,
                                                                                 **kw)
  attack.attack_single_run(torch.rand(2, 3, 2, 2), torch.tensor([0, 1]))
  return tuple([0] + seen)


@pytest.mark.parametrize("steps", [1, 2, 5, 10, 20, 33, 50, 100, 150, 250])  # 1000: below
def test_checkpoints_are_the_reference_codes_at_every_budget(steps):
  torch = pytest.importorskip("torch")
  from torchattacks.attacks.apgd import APGD  # pylint: disable=g-import-not-at-top
  assert checkpoints(steps) == _reference_checkpoints(torch, APGD, steps)


@pytest.mark.parametrize("steps", [100, 200, 1000])
def test_checkpoints_follow_the_papers_formula_at_multiples_of_100(steps):
  # Croce & Hein (2020): p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06),
  # w_j = ceil(p_j * steps) while p_j <= 1, in exact rational arithmetic.
  p = [fractions.Fraction(0), fractions.Fraction(22, 100)]
  while p[-1] <= 1:
    p.append(p[-1] + max(p[-1] - p[-2] - fractions.Fraction(3, 100), fractions.Fraction(6, 100)))
  assert checkpoints(steps) == tuple(math.ceil(q * steps) for q in p[:-1])


def test_step_size_halves_at_every_checkpoint_when_the_loss_is_flat():
  flat = lambda x: jnp.zeros((x.shape[0], CLASSES)) + 0.0 * jnp.sum(x)
  out = apgd_run(flat, X, Y, Y, engine.example_keys(KEY, N), X, EPS, steps=10, loss="ce",
                 beta=2.0)
  marks = np.array(checkpoints(10)[1:])
  # Iteration i runs with 2 eps halved once per checkpoint w_j <= i (w_j: after w_j steps).
  expected = 2 * EPS * 0.5 ** np.array([np.sum(marks <= i) for i in range(10)])
  chex.assert_trees_all_close(out["step_sizes"], np.repeat(expected[:, None], N, 1), rtol=1e-6)
  chex.assert_trees_all_close(expected[-1], 2 * EPS / 2**8)  # halved after 2, 3, ..., 9


def _torch_mlp(torch, dtype):
  """mlp in PyTorch (NCHW input, flattened in NHWC order), the same weights, in `dtype`."""
  hidden, out = (torch.tensor(np.asarray(w), dtype=dtype) for w in (W_HIDDEN, W_OUT))
  return lambda z: torch.relu(z.permute(0, 2, 3, 1).reshape(z.shape[0], -1) @ hidden) @ out * 4


def _reference_and_ours(monkeypatch, loss, steps, precise):
  """APGD's single run by torchattacks and by apgd_run from one start point; (theirs, ours).

  With `precise` both run in float64: APGD's sign steps turn a last-bit difference of a
  gradient component near 0 into a full step of another sign, so float32 iterates of two
  builds (or CPUs) part after some steps whatever the algorithm; in float64 those ties are
  1e-9 times rarer and the trajectories can be compared.
  """
  torch = pytest.importorskip("torch")
  from torchattacks.attacks.apgd import APGD  # pylint: disable=g-import-not-at-top
  from torchattacks.attacks.apgdt import APGDT  # pylint: disable=g-import-not-at-top
  np_dtype, torch_dtype = (np.float64, torch.float64) if precise else (np.float32, torch.float32)
  # The same start point on both sides: torchattacks starts at x + eps * t / max|t| with
  # t = 2 * torch.rand - 1, so a t with max|t| = 1 fixes it.
  t = np.array(jax.random.uniform(jax.random.key(11), X.shape, minval=-1.0, maxval=1.0))
  t[:, 0, 0, 0] = 1.0
  t = t.astype(np_dtype)
  to_nchw = lambda a: torch.tensor(np.transpose(np.asarray(a, np_dtype), (0, 3, 1, 2)))
  x = jnp.asarray(np.asarray(X, np_dtype))
  x_start = jnp.clip(x + EPS * t, 0.0, 1.0)
  logits = mlp(x)
  y = jnp.argmax(logits, -1)
  rank = 3
  model = _torch_mlp(torch, torch_dtype)
  if loss == "ce":
    reference, targets = APGD(model, eps=EPS, steps=steps, loss="ce"), y
  else:
    reference = APGDT(model, eps=EPS, steps=steps, n_classes=CLASSES)
    reference.target_class = rank
    targets = jnp.argsort(logits, -1)[:, -rank]
  monkeypatch.setattr(torch, "rand", lambda *shape, **kw: (to_nchw(t) + 1) / 2)
  default_dtype = torch.get_default_dtype()
  torch.set_default_dtype(torch_dtype)  # the tensors the reference makes itself (step sizes)
  try:
    x_best, acc, loss_best, _ = reference.attack_single_run(
        to_nchw(x), torch.tensor(np.asarray(y, np.int64)))
  finally:
    torch.set_default_dtype(default_dtype)
  ours = apgd_run(mlp, x, y, targets, engine.example_keys(KEY, N), x_start, EPS, steps=steps,
                  loss=loss, beta=2.0)
  theirs = {"x_best": np.transpose(x_best.numpy(), (0, 2, 3, 1)),
            "loss_best": loss_best.numpy(), "fooled": ~acc.numpy()}
  return theirs, jax.tree.map(np.asarray, ours)


# Schedules with halvings at every iteration from the 2nd (10, 13) or 3rd (15) on. In float64
# the 8 trajectories agree to 1e-9 for every budget up to 13 (CE) and 15 (DLR-T) steps; from 14
# and 16 steps on, one image of 8 parts by ~5e-6 (not traced further); the float32 test below
# covers the longer runs by their properties and verdicts.
@pytest.mark.parametrize("loss, steps", [("ce", 10), ("ce", 13), ("targeted_dlr", 15)])
def test_apgd_run_follows_the_reference_trajectory_in_float64(monkeypatch, loss, steps):
  # Every step size, halving and restart from the best point must match: the best points and
  # losses agree to float64 rounding (1e-9 leaves room for a few hundred roundings of 1e-16
  # amplified by the network's Lipschitz constant, and no room for a different step).
  with jax.enable_x64(True):
    theirs, ours = _reference_and_ours(monkeypatch, loss, steps, precise=True)
  assert ours["x_best"].dtype == np.float64
  np.testing.assert_allclose(ours["loss_best"], theirs["loss_best"], rtol=1e-9, atol=1e-9)
  np.testing.assert_allclose(ours["x_best"], theirs["x_best"], rtol=0, atol=1e-9)
  np.testing.assert_array_equal(ours["fooled"], theirs["fooled"])


@pytest.mark.parametrize("loss, steps", [("ce", 30), ("targeted_dlr", 20)])
def test_apgd_run_in_float32_keeps_its_properties_and_the_reference_verdicts(
    monkeypatch, loss, steps):
  # In float32 the iterates may part from the reference's after a sign tie (see above), so
  # what is compared is what does not depend on the last bit: every best point in the ball and
  # the box, a best loss at least the start's, and the same images fooled.
  theirs, ours = _reference_and_ours(monkeypatch, loss, steps, precise=False)
  x = np.asarray(X)
  assert np.all(np.abs(ours["x_best"] - x) <= EPS + TOL)
  assert np.all((ours["x_best"] >= 0) & (ours["x_best"] <= 1))
  y = jnp.argmax(mlp(X), -1)
  targets = y if loss == "ce" else jnp.argsort(mlp(X), -1)[:, -3]
  best_again = apgd_loss(loss, 2.0)(mlp(jnp.asarray(ours["x_best"])), y, targets)
  np.testing.assert_allclose(best_again, ours["loss_best"], rtol=1e-5, atol=1e-5)  # it is x_best's
  steps_taken = ours["step_sizes"]
  assert np.all(np.diff(steps_taken, axis=0) <= 0)  # the step size only ever halves
  np.testing.assert_array_equal(ours["fooled"], theirs["fooled"])


def test_should_halve_follows_both_conditions():
  interval, best = 22, jnp.array([1.0, 1.0, 1.0, 1.0])
  # 16 <= 0.75 * 22 = 16.5 rises: halve; 17: not, unless the best loss stalled (>= last
  # checkpoint's) and the step was not halved at the last checkpoint.
  increases = jnp.array([16, 17, 17, 17])
  at_last = jnp.array([2.0, 0.5, 1.0, 1.0])
  reduced_last = jnp.array([False, False, False, True])
  np.testing.assert_array_equal(
      should_halve(increases, interval, best, at_last, reduced_last),
      [True, False, True, False])


def test_apgd_finds_the_closed_form_worst_case_of_a_linear_model():
  w = _weights(4, 48, 2)
  # A Partial's arrays reach the compiled attack as traced inputs (how models are passed).
  linear = jax.tree_util.Partial(lambda weights, x: x.reshape(x.shape[0], -1) @ weights, w)
  y = jnp.argmax(linear(X), -1)
  # CE of two classes grows with z_other - z_y, linear in x: its maximum over the ball and
  # the box moves every pixel by eps along sign(w_other - w_y), then clips to [0, 1].
  direction = jnp.where(y == 0, 1.0, -1.0)[:, None] * (w[:, 1] - w[:, 0])[None]
  worst = jnp.clip(X + EPS * jnp.sign(direction).reshape(X.shape), 0.0, 1.0)
  x_best = apgd(linear, X, y, eps=EPS, key=KEY, steps=10, best_loss=True)
  chex.assert_trees_all_close(x_best, worst, atol=TOL)
  # The worst case is misclassified exactly where APGD's adversarial example is.
  x_adv = apgd(linear, X, y, eps=EPS, key=KEY, steps=10)
  np.testing.assert_array_equal(jnp.argmax(linear(x_adv), -1) == y,
                                jnp.argmax(linear(worst), -1) == y)


@pytest.mark.parametrize("loss", ["ce", "targeted_dlr"])
def test_apgd_stays_in_the_ball_and_box(loss):
  x_adv = apgd(mlp, X, Y, eps=EPS, key=KEY, steps=10, loss=loss, target_ranks=(2, 3))
  _assert_in_ball(x_adv, X, EPS)
  fooled = jnp.argmax(mlp(x_adv), -1) != Y
  changed = jnp.any(x_adv != X, axis=(1, 2, 3))
  np.testing.assert_array_equal(changed, fooled.at[0].set(False))  # image 0 starts wrong


# ---------------------------------------------------------------- FAB and Square


def test_fab_projection_agrees_with_torchattacks_and_meets_the_plane():
  torch = pytest.importorskip("torch")
  fab_reference = pytest.importorskip("torchattacks.attacks.fab")
  keys = jax.random.split(jax.random.key(5), 3)
  points = jax.random.uniform(keys[0], (16, 48)).at[0].set(0.0)
  w = jax.random.normal(keys[1], (16, 48)) * (jax.random.uniform(keys[2], (16, 48)) > 0.2)
  b = jnp.sum(w * points, -1) + jnp.linspace(-6.0, 6.0, 16)
  d = project_onto_hyperplane_linf(points, w, b)
  expected = fab_reference.projection_linf(*[torch.tensor(np.asarray(a)) for a in (points, w, b)])
  chex.assert_trees_all_close(d, expected.numpy(), atol=1e-6)
  assert float(jnp.min(points + d)) >= -TOL and float(jnp.max(points + d)) <= 1 + TOL


def test_fab_projection_of_a_row_does_not_depend_on_its_batch():
  # Row A converges in two steps below the 1e-7 stop (1.5e-8, then 0.5e-8 after crossing a
  # coordinate's room); row B takes one large step. Alone, A stops after its first small step;
  # in a batch, a loop that runs while any row moves would take A's second step too.
  with jax.enable_x64(True):
    w = jnp.ones((2, 3), jnp.float64)
    points = jnp.array([[0.1 - 3e-8, 0.1 + 1e-8, 0.9], [0.01, 0.02, 0.9]], jnp.float64)
    b = jnp.sum(points, -1) - 0.3
    batch = project_onto_hyperplane_linf(points, w, b)
    alone = [project_onto_hyperplane_linf(points[i:i + 1], w[i:i + 1], b[i:i + 1])[0]
             for i in range(2)]
  chex.assert_trees_all_close(batch, jnp.stack(alone), atol=1e-13, rtol=0)
  assert float(batch[0, 2]) == pytest.approx(-(0.1 + 1.5e-8), abs=1e-13)


def test_fab_returns_x_or_a_misclassified_point_within_eps():
  x_adv = fab(mlp, X, Y, eps=EPS, key=KEY, steps=10, target_ranks=(2, 3))
  _assert_in_ball(x_adv, X, EPS)
  changed = jnp.any(x_adv != X, axis=(1, 2, 3))
  assert bool(jnp.all(jnp.argmax(mlp(x_adv), -1)[changed] != Y[changed]))


def test_square_fraction_follows_the_schedule():
  # p_init halves after iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000.
  for it, halvings in [(0, 0), (10, 0), (11, 1), (50, 1), (51, 2), (4000, 6), (4001, 7), (8001, 9)]:
    assert float(square_fraction(it, 10000)) == pytest.approx(0.8 / 2**halvings)
  # Rescaled to 10000 queries: iteration 6 of 5000 counts as 12.
  assert float(square_fraction(6, 5000, rescale_schedule=True)) == pytest.approx(0.4)


def test_square_stays_in_the_ball_and_attacks_only_active_images():
  x_adv = square(mlp, X, Y, eps=EPS, key=KEY, queries=50)
  _assert_in_ball(x_adv, X, EPS)
  changed = jnp.any(x_adv != X, axis=(1, 2, 3))
  assert bool(jnp.all(jnp.argmax(mlp(x_adv), -1)[changed] != Y[changed]))
  active = np.zeros(N, bool)
  active[2:5] = True
  x_some = square(mlp, X, Y, eps=EPS, key=KEY, queries=50, active=active)
  chex.assert_trees_all_equal(x_some[~active], X[~active])
  chex.assert_trees_all_equal(x_some[active], x_adv[active])


def test_fab_and_square_ignore_the_cas_heads():
  for attack, options in [(fab, dict(steps=10)), (square, dict(queries=50))]:
    with_heads = attack(cas_mlp, X, Y, eps=EPS, key=KEY, **options)
    chex.assert_trees_all_equal(with_heads, attack(mlp, X, Y, eps=EPS, key=KEY, **options))


# ---------------------------------------------------------------- the ensemble


def test_autoattack_reports_monotone_flags_and_stays_in_the_ball():
  x_adv, robust = autoattack(mlp, X, Y, eps=EPS, key=KEY, return_per_attack=True,
                             apgd_steps=10, fab_steps=10, square_queries=50, target_classes=2)
  _assert_in_ball(x_adv, X, EPS)
  assert list(robust) == ["clean", "apgd-ce", "apgd-t", "fab-t", "square"]
  flags = np.stack(list(robust.values()))
  assert not flags[0, 0] and np.all(flags[1:] <= flags[:-1])  # image 0 starts misclassified
  np.testing.assert_array_equal(jnp.argmax(mlp(x_adv), -1) == Y, flags[-1])


def test_autoattack_result_does_not_depend_on_the_batch():
  keys = engine.example_keys(KEY, N)
  options = dict(eps=EPS, return_per_attack=True, apgd_steps=10, fab_steps=10,
                 square_queries=50, target_classes=2)
  x_all, robust_all = autoattack(mlp, X, Y, key=keys, **options)
  part = np.array([2, 5, 6])
  x_part, robust_part = autoattack(mlp, X[part], Y[part], key=keys[part], **options)
  chex.assert_trees_all_close(x_part, x_all[part], atol=1e-6)
  for name in robust_all:
    np.testing.assert_array_equal(robust_part[name], robust_all[name][part])


def test_joint_loss_reaches_the_cas_heads():
  beta = 2.0
  grad = lambda name: jax.grad(
      lambda z: jnp.sum(apgd_loss(name, beta)(cas_mlp(z), Y, Y)))(X)
  cas_grad = jax.grad(lambda z: jnp.sum(losses.cross_entropy(cas_mlp(z)[1][0], Y)))(X)
  assert float(jnp.max(jnp.abs(grad("joint_ce") - grad("ce")))) > 1e-3
  chex.assert_trees_all_close(grad("joint_ce"), grad("ce") + beta * cas_grad, atol=1e-5)
  options = dict(eps=EPS, key=KEY, attacks=("apgd-ce",), apgd_steps=10)
  x_joint = autoattack(cas_mlp, X, Y, loss="joint", **options)
  x_main = autoattack(cas_mlp, X, Y, loss="main", **options)
  assert float(jnp.max(jnp.abs(x_joint - x_main))) > 0.0


def test_rand_version_runs_apgd_with_eot():
  x_adv, robust = autoattack(noisy_mlp, X, Y, eps=EPS, key=KEY, version="rand",
                             return_per_attack=True, apgd_steps=5, eot_draws=2)
  _assert_in_ball(x_adv, X, EPS)
  assert np.all(robust["apgd-dlr"] <= robust["apgd-ce"])
  assert list(robust) == ["clean", "apgd-ce", "apgd-dlr"]


@pytest.mark.parametrize("options, message", [
    (dict(version="plus-plus"), "valid: standard, plus, rand"),
    (dict(loss="cas"), "valid: 'main'"),
    (dict(attacks=("pgd",)), "valid: apgd-ce"),
    (dict(version="rand", attacks=("square",)), "gradient attacks with EOT"),
    (dict(eps=8.0), "outside"),
])
def test_bad_options_raise_clear_errors(options, message):
  with pytest.raises(ValueError, match=message):
    autoattack(mlp, X, Y, key=KEY, **options)
