"""AutoAttack plus: untargeted FAB under L-inf, L2 and L1, and the version's stages, restarts,
streams and costs (the comparison with the authors' plus is in test_autoattack_official.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cas_jax.attacks.autoattack import autoattack
from cas_jax.attacks.fab import fab
from cas_jax.evaluation import evaluate
from cas_jax.evaluation.attack_registry import AttackBudget
from test_norms_fab_square import EPS, KEY, W1, W2, X, Y, _check_attack, _distance, mlp

@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_untargeted_fab_stays_in_the_ball_and_breaks_images(norm):
  """Every point within eps (x (1 + 1e-5)) and [0, 1], every changed one misclassified, and
  an image's result its own (a batch of 8 of them gives the same points)."""
  eps = EPS[norm] / 2
  x_adv = fab(mlp, X, Y, eps=eps, key=KEY, steps=20, target_ranks=None, restarts=2, norm=norm)
  broken = _check_attack(x_adv, eps, norm)
  assert 4 <= broken.sum() < len(Y), broken.sum()
  part = fab(mlp, X[8:16], Y[8:16], eps=eps, key=KEY, steps=20, target_ranks=None, restarts=2,
             norm=norm)
  np.testing.assert_allclose(np.asarray(part), np.asarray(x_adv[8:16]), atol=1e-5)


W = np.asarray(jax.random.normal(jax.random.key(4), (48, 10)), np.float32) / 7
B = np.asarray(jax.random.normal(jax.random.key(5), (10,)), np.float32) / 4


def linear(x):
  return x.reshape(x.shape[0], -1) @ W + B


@pytest.mark.parametrize("norm,eps", [("linf", 0.015), ("l2", 0.25), ("l1", 1.0)])
def test_untargeted_fab_finds_the_official_fabs_smallest_perturbations(norm, eps):
  """A torch twin of mlp under pyautoattack's FABAttack_PT (untargeted, one restart: it starts
  at x, no seed matters), 20 steps: the same images broken, with the same smallest
  perturbations (median relative difference <= 1e-4; float32 rounding may let a path drift)."""
  torch = pytest.importorskip("torch")
  fab_pt = pytest.importorskip("pyautoattack.fab_pt")
  w1, w2 = (torch.tensor(np.asarray(w)) for w in (W1, W2))
  net = lambda z: torch.relu(z.permute(0, 2, 3, 1).reshape(z.shape[0], -1) @ w1) @ w2 * 4.0
  attack = fab_pt.FABAttack_PT(net, norm={"linf": "Linf", "l2": "L2", "l1": "L1"}[norm],
                               n_restarts=1, n_iter=20, eps=eps, targeted=False, device="cpu")
  x = np.asarray(X)
  theirs = np.transpose(attack.perturb(torch.tensor(np.transpose(x, (0, 3, 1, 2))),
                                       torch.tensor(np.asarray(Y))).numpy(), (0, 2, 3, 1))
  ours = np.asarray(fab(mlp, X, Y, eps=eps, key=KEY, steps=20, target_ranks=None, norm=norm))
  broken = _check_attack(ours, eps, norm)
  np.testing.assert_array_equal(broken, np.asarray(mlp(jnp.asarray(theirs))).argmax(-1) != Y)
  assert 4 <= broken.sum() < len(Y)
  sizes = [_distance(a[broken] - x[broken], norm) for a in (ours, theirs)]
  np.testing.assert_allclose(sizes[0], sizes[1], rtol=2e-2)
  assert np.median(np.abs(sizes[0] / sizes[1] - 1)) <= 1e-4


def _two_boundaries():
  """A linear model whose every image (x near 0.5) is class 0, with the runner-up class 1 by
  logit (z_1 - z_0 = -0.2 + small) behind a far boundary (weights of norm 0.5) and class 2
  (z_2 - z_0 = -1 + ...) behind a closer one (norm 10), on disjoint pixels, other classes
  out of reach; (model, x, the L-inf / L2 / L1 distances to each of the two boundaries)."""
  rng = np.random.default_rng(0)
  u = rng.normal(size=48).astype(np.float32)
  w = np.zeros((48, 10), np.float32)
  w[:24, 1], w[24:, 2] = 0.5 * u[:24] / np.linalg.norm(u[:24]), 10 * u[24:] / np.linalg.norm(u[24:])
  c = np.array([0.0, -0.2, -1.0] + [-5.0] * 7, np.float32)
  model = lambda z: (z.reshape(z.shape[0], -1) - 0.5) @ w + c
  x = rng.uniform(0.47, 0.53, (32, 4, 4, 3)).astype(np.float32)
  gaps = -np.asarray(model(jnp.asarray(x)))[:, 1:3]  # z_0 - z_k, z_0 = 0
  dual = {"linf": 1, "l2": 2, "l1": np.inf}
  return model, x, {n: gaps / np.linalg.norm(w[:, 1:3].T, ord=d, axis=-1)
                    for n, d in dual.items()}


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_untargeted_fab_reaches_the_closest_boundary_where_fab_t_does_not(norm):
  """The smallest adversarial perturbation of a linear model is the distance to its closest
  boundary, |z_k - z_y| / ||w_k - w_y||_dual (the box aside): one round of 10 steps of
  untargeted FAB finds it (to 1%, never below); one round of FAB-T at the same budget goes
  to the runner-up's boundary, at least 2x farther here: at an eps between the two,
  untargeted FAB breaks every image and FAB-T none."""
  model, x, boundaries = _two_boundaries()
  y = np.zeros(len(x), np.int32)
  far, closest = boundaries[norm][:, 0], boundaries[norm][:, 1]
  assert np.all(far > 2 * closest) and closest.max() < 0.4  # steps fit in the box (room 0.47)
  sizes = {}
  for name, ranks in (("fab", None), ("fab-t", 2)):
    x_adv = fab(model, x, y, eps={"linf": 1.0, "l2": 6.0, "l1": 48.0}[norm], key=KEY, steps=10,
                target_ranks=ranks, norm=norm)
    assert np.all(np.asarray(model(x_adv)).argmax(-1) != y)  # every image crossed
    sizes[name] = _distance(np.asarray(x_adv) - x, norm)
  assert np.all(sizes["fab"] >= closest * (1 - 1e-5))
  np.testing.assert_allclose(sizes["fab"], closest, rtol=1e-2)
  assert np.all(sizes["fab-t"] >= 0.99 * far)
  eps = np.sqrt(closest.max() * far.min())
  assert np.all(sizes["fab"] <= eps) and np.all(sizes["fab-t"] > eps)


BUDGET = AttackBudget(apgd_steps=6, fab_steps=5, square_queries=20, target_classes=2)
SEEN = []  # the rows `counted` evaluates, each call's


def counted(z):
  """linear, counting the rows of every call (compiled once for every test below)."""
  jax.debug.callback(lambda rows: SEEN.append(int(rows)), z.shape[0])
  return linear(z)


def _data(n):
  x = np.random.default_rng(1).uniform(0.3, 0.7, (n, 4, 4, 3)).astype(np.float32)
  return x, np.asarray(linear(jnp.asarray(x))).argmax(-1).astype(np.int32)


def _plus_report(x, y, eps, norm):
  """The report's aa-plus and the rows the model counted in it."""
  del SEEN[:]
  report = evaluate.robustness_report(counted, x, y, key=KEY, eps=eps, norm=norm,
                                      attacks="aa-plus", budget=BUDGET, batch_size=len(y))
  jax.effects_barrier()
  return report, sum(SEEN)


def _expected_stages(norm):
  """The units of plus but Square's: 5 restarts of APGD-CE, APGD-DLR and FAB, then APGD-T and
  FAB-T per target; APGD under L1 named apart from the standard's (no large eps)."""
  apgd = "plus:" if norm == "l1" else ""
  return ([f"{apgd}apgd-{loss}/r{i}" for loss in ("ce", "dlr") for i in range(5)]
          + [f"fab/r{i}" for i in range(5)] + [f"{apgd}apgd-t/{r}" for r in (2, 3)]
          + ["fab-t/2", "fab-t/3"])


@pytest.mark.slow
def test_plus_runs_the_official_stages_with_the_reports_verdicts():
  """Public autoattack(version="plus") runs the official order and keeps its points in the
  ball; the report's aa-plus gives its verdicts, with the units of `_expected_stages`, and
  rows that are the model's own count."""
  x, y = _data(16)
  eps = 0.06
  x_adv, robust = autoattack(counted, x, y, eps=eps, key=KEY, version="plus",
                             return_per_attack=True, apgd_steps=BUDGET.apgd_steps,
                             fab_steps=BUDGET.fab_steps, square_queries=BUDGET.square_queries,
                             target_classes=BUDGET.target_classes)
  assert list(robust) == ["clean", "apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"]
  flags = np.stack(list(robust.values()))
  assert np.all(flags[1:] <= flags[:-1]) and 0 < flags[-1].sum() < flags[0].sum()
  assert np.abs(np.asarray(x_adv) - x).max() <= eps * (1 + 1e-5)
  report, rows = _plus_report(x, y, eps, "linf")
  np.testing.assert_array_equal(report.verdicts["aa-plus"], robust["fab-t"])
  assert report.costs["total"]["rows"] == rows
  stages = report.costs["stages"]
  assert [s for s in stages if not s.startswith("square")] == _expected_stages("linf")


@pytest.mark.slow
def test_plus_under_l1_runs_apgd_without_large_eps():
  """As the official plus (its _set_version sets use_largereps for standard only): under L1
  each APGD round costs steps + 1 gradient passes (large eps: steps + 3), APGD-T runs every
  target (standard: 5 at most), and the units are named apart from standard's."""
  x, y = _data(8)
  report, rows = _plus_report(x, y, 0.9, "l1")
  stages = report.costs["stages"]
  assert [s for s in stages if not s.startswith("square")] == _expected_stages("l1")
  for name in ("plus:apgd-ce/r0", "plus:apgd-dlr/r0", "plus:apgd-t/2"):
    per_image = stages[name]["gradient_rows"] / stages[name]["images"]
    assert per_image == BUDGET.apgd_steps + 1, (name, per_image)
  assert report.costs["total"]["rows"] == rows
  assert 0 < (report.verdicts["natural"] & ~report.verdicts["aa-plus"]).sum()


def test_plus_and_fab_names_and_errors():
  from cas_jax.evaluation.attack_registry import parse_attack  # pylint: disable=g-import-not-at-top
  spec = parse_attack("aa-plus-joint-l2", eps=8 / 255, has_cas=True)
  assert (spec.method, spec.joint, spec.norm, spec.eps) == ("aa-plus", True, "l2", 0.5)
  spec = parse_attack("fab-l1@6", eps=8 / 255, has_cas=True)
  assert (spec.method, spec.joint, spec.norm, spec.eps) == ("fab", False, "l1", 6.0)
  x, y = _data(4)
  with pytest.raises(ValueError, match="gradient attacks with EOT"):
    autoattack(linear, x, y, key=KEY, version="rand", attacks=("fab",))
