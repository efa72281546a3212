"""FAB-T and Square under L2 and L1 (and their L-inf defaults beside them).

The hyperplane projections against scipy's solvers and the authors' own code (pyautoattack),
Square's window pattern and L1 ball projection against the authors' code, and both attacks on
a ReLU network of 10x10x3 images: their points lie in the ball and the box, a changed point is
misclassified, an image's result does not depend on its batch, and (on a torch twin) they break
about as many images as the official FABAttack_PT and SquareAttack.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cas_jax.attacks.fab import fab
from cas_jax.attacks.fab_projections import (project_onto_hyperplane_l1,
                                             project_onto_hyperplane_l2,
                                             project_onto_hyperplane_linf)
from cas_jax.attacks.square import _into_l1_ball, _window_pattern, square, square_chunk

N, SIDE, CLASSES = 32, 10, 10
DIM = SIDE * SIDE * 3
W1 = np.asarray(jax.random.normal(jax.random.key(0), (DIM, 32)) / np.sqrt(DIM), np.float32)
W2 = np.asarray(jax.random.normal(jax.random.key(1), (32, CLASSES)) / np.sqrt(32), np.float32)
X = jax.random.uniform(jax.random.key(3), (N, SIDE, SIDE, 3))
X = X.at[:, 0].set(jnp.round(X[:, 0]))  # pixels on the box faces
KEY = jax.random.key(7)
EPS = {"linf": 0.03, "l2": 0.5, "l1": 5.0}
PROJECTIONS = {"linf": project_onto_hyperplane_linf, "l2": project_onto_hyperplane_l2,
               "l1": project_onto_hyperplane_l1}


def mlp(x):
  """A ReLU network on flattened 10x10x3 images."""
  return jax.nn.relu(x.reshape(x.shape[0], -1) @ W1) @ W2 * 4.0


def masked(x):
  """mlp without a gradient: only a query-based attack can move."""
  return jax.lax.stop_gradient(mlp(x))


Y = jnp.argmax(mlp(X), -1)


def _distance(delta, norm):
  flat = np.asarray(delta, np.float64).reshape(delta.shape[0], -1)
  return {"linf": np.abs(flat).max(-1), "l2": np.sqrt((flat ** 2).sum(-1)),
          "l1": np.abs(flat).sum(-1)}[norm]


def _check_attack(x_adv, eps, norm):
  """In the box and the ball; every changed image misclassified; returns the broken ones."""
  x_adv = np.asarray(x_adv)
  assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
  assert _distance(x_adv - np.asarray(X), norm).max() <= eps * (1 + 1e-5)
  changed = np.any((x_adv != np.asarray(X)).reshape(N, -1), -1)
  broken = np.asarray(jnp.argmax(mlp(jnp.asarray(x_adv)), -1) != Y)
  np.testing.assert_array_equal(changed, broken)
  return broken


def _plane_problems(seed, rows, dim):
  """Random (points, w, b): some planes the box reaches, some not, some w_i = 0."""
  rng = np.random.default_rng(seed)
  points = rng.uniform(size=(rows, dim)).astype(np.float32)
  points[:, 0] = np.round(points[:, 0])
  w = rng.normal(size=(rows, dim)).astype(np.float32) * (rng.uniform(size=(rows, dim)) > 0.2)
  b = (np.sum(w * points, -1) + rng.normal(size=rows) * np.sqrt(dim) * 0.4).astype(np.float32)
  return points, w, b


# ---------------------------------------------------------------- projections


def test_l1_and_l2_projections_solve_their_programmes_as_scipy_does():
  """Tiny problems in float64 by scipy: the L1 linear programme (linprog) and the L2
  quadratic one (minimize); unreachable planes end at the box corner nearest the plane."""
  optimize = pytest.importorskip("scipy.optimize")
  points, w, b = _plane_problems(0, 24, 5)
  d1 = np.asarray(project_onto_hyperplane_l1(*map(jnp.asarray, (points, w, b))), np.float64)
  d2 = np.asarray(project_onto_hyperplane_l2(*map(jnp.asarray, (points, w, b))), np.float64)
  solved = 0
  for i in range(len(b)):
    p, wi, bi = points[i].astype(np.float64), w[i].astype(np.float64), float(b[i])
    lower, upper = -p, 1.0 - p
    corner = np.where(wi * (wi @ p - bi) > 0, lower, upper) * (wi != 0)
    if not np.minimum(wi, 0).sum() <= bi <= np.maximum(wi, 0).sum():
      np.testing.assert_allclose(d1[i], corner, atol=1e-6)  # the plane is out of reach
      np.testing.assert_allclose(d2[i], corner, atol=1e-6)
      continue
    solved += 1
    lp = optimize.linprog(np.ones(10), A_eq=np.concatenate([wi, -wi])[None], b_eq=[bi - wi @ p],
                          bounds=[(0, u) for u in upper] + [(0, -l) for l in lower])
    assert lp.status == 0
    np.testing.assert_allclose(np.abs(d1[i]).sum(), lp.fun, rtol=1e-5, atol=1e-6)
    qp = optimize.minimize(lambda d: d @ d, np.zeros(5), jac=lambda d: 2 * d, method="SLSQP",
                           bounds=list(zip(lower, upper)), options={"ftol": 1e-14},
                           constraints=[{"type": "eq", "fun": lambda d: wi @ (p + d) - bi}])
    assert qp.success
    np.testing.assert_allclose(d2[i], qp.x, atol=1e-4)
    for d in (d1[i], d2[i]):  # on the plane, in the box
      assert abs(wi @ (p + d) - bi) <= 1e-5 * (1 + np.abs(wi) @ np.abs(p))
      assert np.all(p + d >= -1e-7) and np.all(p + d <= 1 + 1e-7)
  assert 10 <= solved < len(b)  # both kinds of problem were met


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_projections_equal_the_authors(norm):
  """pyautoattack's projection_{linf,l2,l1} on 64 rows of 300 coordinates; each row alone
  (a batch of one) gives the same step up to rounding."""
  torch = pytest.importorskip("torch")
  official = pytest.importorskip("pyautoattack.fab_projections")
  points, w, b = _plane_problems(1, 64, 300)
  theirs = getattr(official, f"projection_{norm}")(*map(torch.tensor, (points, w, b))).numpy()
  ours = np.asarray(PROJECTIONS[norm](*map(jnp.asarray, (points, w, b))))
  np.testing.assert_allclose(_distance(ours, norm), _distance(theirs, norm), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(ours, theirs, atol=2e-4)
  alone = np.asarray(PROJECTIONS[norm](*map(jnp.asarray, (points[5:6], w[5:6], b[5:6]))))
  np.testing.assert_allclose(alone[0], ours[5], rtol=1e-5, atol=1e-7)  # XLA's sums: not bitwise


# ---------------------------------------------------------------- Square's pieces


@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_window_pattern_equals_the_authors_eta(norm):
  torch = pytest.importorskip("torch")
  official = pytest.importorskip("pyautoattack.square")
  attack = official.SquareAttack(None, norm=norm.upper(), eps=1.0, device="cpu")
  for side in (1, 2, 3, 4, 5, 8, 9):
    r, c = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    ours = np.asarray(_window_pattern(jnp.asarray(r), jnp.asarray(c), side, norm, 12))
    torch.manual_seed(0)
    theirs = [attack.eta(side).numpy() for _ in range(8)]  # some transposed at random
    assert any(np.allclose(t, ours, atol=1e-6) for t in theirs), side
    assert any(np.allclose(t, ours.T, atol=1e-6) for t in theirs), side


def test_l1_ball_projection_equals_the_authors():
  torch = pytest.importorskip("torch")
  official = pytest.importorskip("pyautoattack.autopgd_base")
  rng = np.random.default_rng(2)
  x = rng.uniform(size=(16, 4, 4, 3)).astype(np.float32)
  delta = (rng.normal(size=x.shape) * rng.uniform(0.05, 0.6, (16, 1, 1, 1))).astype(np.float32)
  eps = 3.0
  theirs = x + delta + official.L1_projection(torch.tensor(x), torch.tensor(delta), eps).numpy()
  ours = np.asarray(_into_l1_ball(jnp.asarray(x), jnp.asarray(delta), eps))
  np.testing.assert_allclose(ours, theirs, atol=1e-5)
  assert _distance(ours - x, "l1").max() <= eps * (1 + 1e-6)
  assert (_distance(x + delta - x, "l1") > eps).sum() >= 4  # some needed the ball


# ---------------------------------------------------------------- the attacks


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_fab_stays_in_the_ball_and_breaks_images(norm):
  eps = EPS[norm] / 2
  x_adv = fab(mlp, X, Y, eps=eps, key=KEY, steps=20, target_ranks=range(2, 5), restarts=2,
              norm=norm)
  broken = _check_attack(x_adv, eps, norm)
  assert 4 <= broken.sum() < N, broken.sum()
  # Each image's result is its own: a batch of 8 of them gives the same points (up to
  # rounding: XLA's sums over a row are not bitwise the same at every batch size).
  part = fab(mlp, X[8:16], Y[8:16], eps=eps, key=KEY, steps=20, target_ranks=range(2, 5),
             restarts=2, norm=norm)
  np.testing.assert_allclose(np.asarray(part), np.asarray(x_adv[8:16]), atol=1e-5)


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_square_breaks_a_model_without_gradients(norm):
  eps = EPS[norm] / 2
  started = _check_attack(square(masked, X, Y, eps=eps, key=KEY, queries=1, norm=norm), eps,
                          norm)
  broken = _check_attack(square(masked, X, Y, eps=eps, key=KEY, queries=300, norm=norm), eps,
                         norm)
  assert broken.sum() >= started.sum() + 5, (broken.sum(), started.sum())
  assert not np.any(started & ~broken)


@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_square_chunks_equal_one_run_and_batches_do_not_matter(norm):
  eps = EPS[norm] / 2
  keys = jax.random.split(KEY, N)
  whole, fooled, _, made = square_chunk(masked, X, Y, keys, None, 0, 60, eps, total_queries=60,
                                        norm=norm)
  carry, made_in_chunks = None, 0
  for first, end in ((0, 25), (25, 60)):
    x_best, fooled_chunks, carry, chunk_made = square_chunk(
        masked, X, Y, keys, carry, first, end, eps, total_queries=60, norm=norm)
    made_in_chunks += int(chunk_made)
  np.testing.assert_array_equal(np.asarray(x_best), np.asarray(whole))
  np.testing.assert_array_equal(np.asarray(fooled_chunks), np.asarray(fooled))
  assert made_in_chunks == int(made) and np.asarray(fooled).any()
  part, _, _, _ = square_chunk(masked, X[:8], Y[:8], keys[:8], None, 0, 60, eps,
                               total_queries=60, norm=norm)
  np.testing.assert_allclose(np.asarray(part), np.asarray(whole[:8]), atol=1e-5)


# ---------------------------------------------------------------- the authors' attacks


@pytest.mark.slow
@pytest.mark.parametrize("norm,eps", [("l2", 0.25), ("l1", 1.0)])
def test_fab_and_square_break_as_many_images_as_the_official_code(norm, eps):
  """A torch twin of mlp under pyautoattack's FABAttack_PT (targeted, 3 target classes, one
  restart: it starts at x, so no seed matters) and SquareAttack (300 queries), 3 seeds each:
  FAB-T breaks the same images (but 1) with the same smallest perturbations, Square as many
  on average (but 2.5)."""
  torch = pytest.importorskip("torch")
  fab_pt = pytest.importorskip("pyautoattack.fab_pt")
  official_square = pytest.importorskip("pyautoattack.square")
  w1, w2 = torch.tensor(W1), torch.tensor(W2)
  net = lambda x: torch.relu(x.permute(0, 2, 3, 1).reshape(x.shape[0], -1) @ w1) @ w2 * 4.0
  x = torch.tensor(np.ascontiguousarray(np.transpose(np.asarray(X), (0, 3, 1, 2))))
  y = torch.tensor(np.asarray(Y))
  official_broken = lambda adv: (net(adv).argmax(1) != y).numpy()
  theirs_fab, theirs_square, ours_fab, ours_square, sizes = [], [], [], [], []
  for seed in range(3):
    attack = fab_pt.FABAttack_PT(net, norm=norm.upper(), n_restarts=1, n_iter=20, eps=eps,
                                 targeted=True, n_target_classes=3, seed=seed, device="cpu")
    theirs_adv = np.transpose(attack.perturb(x, y).numpy(), (0, 2, 3, 1))
    theirs_fab.append(official_broken(torch.tensor(np.transpose(theirs_adv, (0, 3, 1, 2)))))
    attack = official_square.SquareAttack(net, norm=norm.upper(), n_queries=300, eps=eps,
                                          seed=seed, resc_schedule=False, device="cpu")
    theirs_square.append(official_broken(attack.perturb(x, y)))
    key = jax.random.key(seed)
    ours_adv = fab(mlp, X, Y, eps=eps, key=key, steps=20, target_ranks=range(2, 5), norm=norm)
    ours_fab.append(_check_attack(ours_adv, eps, norm))
    both = ours_fab[-1] & theirs_fab[-1]
    sizes.append(np.stack([_distance(np.asarray(ours_adv) - np.asarray(X), norm)[both],
                           _distance(theirs_adv - np.asarray(X), norm)[both]]))
    ours_square.append(_check_attack(square(masked, X, Y, eps=eps, key=key, queries=300,
                                            norm=norm), eps, norm))
  theirs_fab, theirs_square = np.array(theirs_fab), np.array(theirs_square)
  ours_fab, ours_square = np.array(ours_fab), np.array(ours_square)
  print(f"\n{norm} eps={eps}: FAB-T ours {ours_fab.sum(1)} official {theirs_fab.sum(1)}; "
        f"Square ours {ours_square.sum(1)} official {theirs_square.sum(1)}")
  assert 0 < theirs_fab.sum(1).min() and theirs_fab.sum(1).max() < N  # eps matters
  assert 0 < theirs_square.sum(1).min() and theirs_square.sum(1).max() < N
  assert (ours_fab != theirs_fab).sum(1).max() <= 1
  sizes = np.concatenate(sizes, 1)
  # The same minimal perturbations (float32 rounding lets an odd path drift by < 1%).
  np.testing.assert_allclose(sizes[0], sizes[1], rtol=2e-2)
  assert np.median(np.abs(sizes[0] / sizes[1] - 1)) <= 1e-4
  assert abs(ours_square.sum(1).mean() - theirs_square.sum(1).mean()) <= 2.5


def test_an_unknown_norm_or_a_bad_eps_is_refused_and_l1_takes_eps_above_one():
  errors = pytest.importorskip("cas_jax.errors")
  for attack in (fab, square):
    with pytest.raises(errors.UserError, match="norm"):
      attack(mlp, X, Y, eps=0.5, key=KEY, norm="l0")
    with pytest.raises(errors.UserError, match="eps"):
      attack(mlp, X, Y, eps=2.0, key=KEY)  # L-inf: eps beyond the [0, 1] images
    with pytest.raises(errors.UserError, match="eps"):
      attack(mlp, X, Y, eps=0.0, key=KEY, norm="l2")
  x_adv = square(masked, X, Y, eps=12.0, key=KEY, queries=2, norm="l1")
  assert _distance(np.asarray(x_adv) - np.asarray(X), "l1").max() <= 12.0 * (1 + 1e-5)


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_fab_restarts_start_on_the_half_eps_sphere(norm):
  """As the reference: x + eps/2 * a direction of unit norm (uniform under L-inf, Gaussian
  under L2 and L1), then clipped to [0, 1]."""
  fab_module = pytest.importorskip("cas_jax.attacks.fab")
  x = jnp.full((N, SIDE, SIDE, 3), 0.5)  # far from the box faces: nothing is clipped
  start = fab_module._random_start(jax.random.split(KEY, N), x, 0.2, norm)
  np.testing.assert_allclose(_distance(np.asarray(start - x), norm), 0.2, rtol=1e-5)
  assert len(np.unique(np.asarray(start[:, 0, 0, 0]))) == N  # a direction per image
