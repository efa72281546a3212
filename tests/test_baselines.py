"""Tests for the Table 1 baselines (kWTA, SAP and EOT against it, PCL) and their smoke runs."""
import math
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cas_jax import losses
from cas_jax import models
from cas_jax.attacks import randomized
from cas_jax.models import baselines


def _init(model, x):
  # A jitted init with an "rbg" key compiles in seconds (as in test_models.py).
  return jax.jit(lambda k: model.init(k, x, train=False))(jax.random.key(0, impl="rbg"))


# ------------------------------------------------------------------------------------ kWTA


def test_kwta_keeps_exactly_k_entries_with_ties_lowest_index_first():
  # D = 10, ratio 0.3: k = 3. Tie rule: among equal values the lower flat index wins.
  x = jnp.array([[5.0, 1.0, 3.0, 3.0, 3.0, 0.0, 3.0, -1.0, 2.0, 3.0],  # ties at the k-th value
                 [1.0] * 10,  # all tied: the first three
                 [-4.0, -1.0, -2.0, -9.0, -1.0, -3.0, -5.0, -6.0, -7.0, -8.0]])  # negatives kept
  out = baselines.kwta(x.reshape(3, 1, 2, 5), ratio=0.3).reshape(3, 10)
  expected = np.zeros((3, 10), np.float32)
  expected[0, [0, 2, 3]] = [5.0, 3.0, 3.0]
  expected[1, [0, 1, 2]] = 1.0
  expected[2, [1, 4, 2]] = [-1.0, -1.0, -2.0]
  np.testing.assert_array_equal(np.asarray(out), expected)
  assert np.all(np.sum(np.asarray(out) != 0, axis=1) == 3)


def test_kwta_count_is_the_ceiling_of_ratio_times_size():
  x = jax.random.normal(jax.random.key(0), (2, 3, 3, 7))  # D = 63: ceil(0.2 * 63) = 13
  kept = np.sum(np.asarray(baselines.kwta(x, 0.2)) != 0, axis=(1, 2, 3))
  np.testing.assert_array_equal(kept, [math.ceil(0.2 * 63)] * 2)


def test_kwta_passes_gradients_only_through_the_winners():
  x = jax.random.normal(jax.random.key(1), (2, 4, 5))
  w = jax.random.normal(jax.random.key(2), x.shape)
  grad = jax.grad(lambda z: jnp.sum(w * baselines.kwta(z, 0.25)))(x)
  winners = np.asarray(baselines.kwta(x, 0.25)) != 0
  np.testing.assert_allclose(np.asarray(grad), np.where(winners, np.asarray(w), 0.0))


def test_kwta_replaces_every_relu_of_the_network():
  model = models.create("resnet18", num_classes=3, width=4, cas_stages=(), baseline="kwta",
                        kwta_ratio=0.2)
  x = jax.random.uniform(jax.random.key(0), (2, 8, 8, 3))
  variables = _init(model, x)
  _, state = jax.jit(lambda v: model.apply(v, x, train=False, capture_intermediates=True))(
      variables)
  flat = jax.tree_util.tree_flatten_with_path(state["intermediates"])[0]
  outputs = [leaf for path, leaf in flat if "Activation" in jax.tree_util.keystr(path)]
  assert len(outputs) == 1 + 2 * 8  # the stem and two per BasicBlock
  for out in outputs:
    size = out[0].size
    np.testing.assert_array_equal(np.sum(np.asarray(out) != 0, axis=(1, 2, 3)),
                                  [math.ceil(0.2 * size)] * 2)


# ------------------------------------------------------------------------------------- SAP


def test_sap_keep_probabilities_match_a_hand_computation():
  # |x| = (1, 3, 0, 4): p = (1, 3, 0, 4) / 8; ratio 0.5 of D = 4: r = 2 samples;
  # q = 1 - (1 - p)^2 = (15, 39, 0, 48) / 64.
  x = jnp.array([[1.0, -3.0, 0.0, 4.0]])
  np.testing.assert_allclose(np.asarray(baselines.sap_keep_probabilities(x, 0.5)),
                             [[15 / 64, 39 / 64, 0.0, 48 / 64]], rtol=1e-6)


def test_sap_mean_over_many_keys_equals_its_input_within_hoeffding_bound():
  h = jnp.array([[0.5, 2.0, 0.0, 1.0, 0.25, 3.0]])
  ratio, n = 0.5, 20000  # r = 3 samples
  q = np.asarray(baselines.sap_keep_probabilities(h, ratio))[0]
  draws = np.asarray(jax.vmap(lambda k: baselines.sap(h, k, ratio)[0])(
      jax.random.split(jax.random.key(0), n)))
  nonzero = q > 0
  # Every draw is 0 or h / q (entry by entry), so each entry lies in an interval of width
  # |h| / q. Hoeffding with a union bound over the D entries: P(any |mean - h| > t) <= delta for
  # t = (|h| / q) sqrt(log(2 D / delta) / (2 n)).
  scaled = np.abs(np.asarray(h[0]))[nonzero] / q[nonzero]
  assert np.all(np.isclose(draws[:, nonzero], 0) | np.isclose(draws[:, nonzero], scaled))
  np.testing.assert_array_equal(draws[:, ~nonzero], 0.0)
  delta = 1e-6
  bound = scaled * math.sqrt(math.log(2 * h.size / delta) / (2 * n))
  deviation = np.abs(draws.mean(0) - np.asarray(h[0]))[nonzero]
  assert np.all(deviation <= bound), (deviation, bound)
  # The keep frequencies are the keep probabilities (same bound, interval width 1).
  frequency = np.mean(draws != 0, axis=0)
  assert np.all(np.abs(frequency - q) <= math.sqrt(math.log(2 * h.size / delta) / (2 * n)))


def test_sap_network_draws_fresh_noise_per_key_and_errors_without_one():
  model = models.create("resnet18", num_classes=3, width=4, cas_stages=(), baseline="sap")
  x = jax.random.uniform(jax.random.key(0), (3, 8, 8, 3))
  variables = _init(model, x)
  keys = jax.random.split(jax.random.key(1), 3)
  random_fn = jax.jit(baselines.bind_random(model, variables))
  first, again = random_fn(x, keys)[0], random_fn(x, keys)[0]
  other = random_fn(x, jax.random.split(jax.random.key(2), 3))[0]
  np.testing.assert_array_equal(np.asarray(first), np.asarray(again))
  assert not np.allclose(np.asarray(first), np.asarray(other))
  # Image i's draw depends on keys[i] alone, not on the rest of the batch.
  np.testing.assert_allclose(np.asarray(random_fn(x[1:], keys[1:])[0]), np.asarray(first[1:]),
                             atol=1e-5)
  with pytest.raises(ValueError, match="rngs"):
    model.apply(variables, x, train=False)
  expectation = baselines.expectation_model(model)
  plain = models.create("resnet18", num_classes=3, width=4, cas_stages=())
  apply = lambda m: jax.jit(lambda v: m.apply(v, x, train=False))(variables)
  chex.assert_trees_all_close(apply(expectation), apply(plain))


def test_eot_against_sap_is_stronger_than_pgd_on_a_single_draw():
  # Logits (0, w . sap(relu(z))) with label 0: the margin loss is w . s, linear in s, so its
  # expectation is w . z. One signed step of size eps from z (no random start) can raise the
  # expected margin by at most eps * sum|w| (all coordinates moved along sign(w)). A draw's
  # gradient is nonzero only on the entries SAP kept (r = 2 of D = 8), so PGD on a single
  # draw moves at most 2 coordinates; EOT over 64 draws keeps every entry in some draw
  # (probability 1 - about 0.77^64 per entry) and reaches the optimum.
  d, eps = 8, 0.05
  w = jnp.array([1.0, -2.0, 0.5, 3.0, -1.0, 1.5, -0.5, 2.0])
  z = jnp.linspace(0.3, 0.7, d).reshape(1, 1, 1, d).repeat(4, axis=0)
  y = jnp.zeros(4, jnp.int32)

  def random_model_fn(images, keys):
    s = jax.vmap(lambda h, k: baselines.sap(h[None], k, 0.25)[0])(
        jax.nn.relu(images.reshape(images.shape[0], -1)), keys)
    return jnp.stack([jnp.zeros(s.shape[0]), s @ w], axis=-1)

  def expected_margin(images):
    return np.asarray(images.reshape(images.shape[0], -1) @ w)

  attack = lambda draws: randomized.eot_pgd(
      random_model_fn, z, y, eps=eps, steps=1, step_size=eps, draws=draws, key=jax.random.key(0),
      loss="cw", start="none")
  optimum = expected_margin(z) + eps * float(jnp.sum(jnp.abs(w)))
  single, eot = expected_margin(attack(1)), expected_margin(attack(64))
  np.testing.assert_allclose(eot, optimum, rtol=1e-5)
  assert np.all(single <= expected_margin(z) + 2 * eps * 3.0 + 1e-6)  # at most two entries moved
  assert np.all(single < optimum - eps)


# ------------------------------------------------------------------- randomized evaluation

_W = jax.random.normal(jax.random.key(0), (48, 10)) / 7
_X = np.random.default_rng(0).uniform(0.3, 0.7, (8, 4, 4, 3)).astype(np.float32)
_Y = np.asarray(jnp.argmax(_X.reshape(8, -1) @ _W, -1), np.int32)


def _linear(x):
  return x.reshape(x.shape[0], -1) @ _W


def _flipping(x, keys):
  """The linear model whose logits are negated (so wrong) in a draw with probability 0.4."""
  flip = jax.vmap(lambda k: jax.random.uniform(k) < 0.4)(keys)
  return jnp.where(flip[:, None], -1.0, 1.0) * _linear(x)


def _report(attacks, random_apply_fn):
  from cas_jax.evaluation import evaluate  # pylint: disable=g-import-not-at-top
  from cas_jax.evaluation.attack_registry import AttackBudget  # pylint: disable=g-import-not-at-top
  return evaluate.robustness_report(_linear, _X, _Y, key=jax.random.key(0), eps=0.05,
                                    attacks=attacks,
                                    budget=AttackBudget(eot_draws=5, verdict_draws=5, aa_rand_draws=5,
                                                        apgd_steps=3),
                                    random_apply_fn=random_apply_fn)


def test_randomized_report_judges_by_draws_and_flags_missing_eot():
  same_draws = _report("pgd3,eot3,aa-rand", lambda x, keys: _linear(x))
  deterministic = _report("pgd3,eot3,aa-rand", None)
  # Draws that all agree give the deterministic verdicts, and a mean equal to the accuracy.
  for name in ("natural", "pgd3", "eot3", "aa-rand"):
    np.testing.assert_array_equal(same_draws.verdicts[name], deterministic.verdicts[name])
  assert same_draws.natural_mean == pytest.approx(deterministic.accuracy("natural"))
  assert same_draws.draws == 5 and deterministic.draws == 0
  assert same_draws.attacks["eot3"]["gradient_draws"] == 5
  assert same_draws.attacks["pgd3"]["gradient_draws"] == 0
  flipping = _report("pgd3", _flipping)
  # Natural: the mean over 5 draws (multiples of 1/40), shown as such; every image is
  # correct unless flipped, so the mean is near 0.6 and most images win their majority.
  assert flipping.natural_mean * 40 == pytest.approx(round(flipping.natural_mean * 40))
  assert 0.3 < flipping.natural_mean < 0.9
  assert "natural (mean over 5 draws)" in flipping.markdown()
  assert any("no attack averaged its gradients over draws" in w for w in flipping.sanity)
  assert not any("averaged its gradients" in w for w in _report("pgd3,eot3", _flipping).sanity)


# ------------------------------------------------------------------------------------- PCL


def test_prototype_conformity_loss_by_hand():
  # Prototypes w0 = (0, 0), w1 = (3, 0), w2 = (0, 4); C = 3.
  # f = (0, 0), y = 0: pull 0; push ((3 + 3) + (4 + 4)) / 2 = 7 -> -7.
  # f = (3, 4), y = 1: pull 4; push ((5 + 3) + (3 + 5)) / 2 = 8 -> -4.
  prototypes = jnp.array([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
  features = jnp.array([[0.0, 0.0], [3.0, 4.0]])
  labels = jnp.array([0, 1])
  np.testing.assert_allclose(np.asarray(losses.prototype_conformity(features, prototypes,
                                                                    labels)), [-7.0, -4.0],
                             atol=1e-5)
  logits = jnp.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
  ce = float(jnp.mean(losses.cross_entropy(logits, labels)))
  total = losses.pcl_loss(logits, (), [(features, prototypes)] * 2, labels, beta=2.0, weight=0.5)
  np.testing.assert_allclose(float(total), ce + 0.5 * 2 * (-5.5), rtol=1e-5)


def test_pcl_network_sows_both_branches_and_train_step_adds_the_term_after_warm_up():
  from cas_jax.training import train  # pylint: disable=g-import-not-at-top
  from configs import smoke  # pylint: disable=g-import-not-at-top
  config = smoke.get_config()
  config.baseline, config.loss.objective, config.model.width = "pcl", "natural", 4
  config.model.cas_stages, config.model.pcl_dim, config.loss.pcl_weight = "none", 6, 0.5
  model = train.create_model(config, 3)
  x = jax.random.uniform(jax.random.key(0), (4, 8, 8, 3))
  y = jnp.array([0, 1, 2, 0])
  state = train.create_train_state(0, model, config, 1, x.shape[1:])
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  _, updates = model.apply(variables, x, labels=y, train=True, mutable=["batch_stats", "pcl"])
  branches = [updates["pcl"][n]["branch"][-1] for n in ("pcl3", "pcl4")]
  assert [f.shape for f, _ in branches] == [(4, 6), (4, 32)]
  assert [w.shape for _, w in branches] == [(3, 6), (3, 32)]
  batch = {"image": x, "label": y}
  step = jax.jit(lambda s, start: train.train_step(s, batch, jax.random.key(0), config=config,
                                                   pcl_start=start)[1]["train_loss"])
  warm_up, with_pcl = float(step(state, 1)), float(step(state, 0))  # one compilation
  pcl = sum(float(jnp.mean(losses.prototype_conformity(f, w, y))) for f, w in branches)
  np.testing.assert_allclose(with_pcl - warm_up, 0.5 * pcl, rtol=1e-4, atol=1e-5)


def test_baseline_options_are_validated():
  with pytest.raises(ValueError, match="baseline='dropout'"):
    models.create("resnet18", baseline="dropout")
  with pytest.raises(ValueError, match="for the ResNets only"):
    models.create("vgg16", baseline="kwta")
  with pytest.raises(ValueError, match="kwta_ratio"):
    models.create("resnet18", baseline="kwta", kwta_ratio=1.5)


# ------------------------------------------------------------------------ end to end (smoke)


@pytest.mark.slow
@pytest.mark.parametrize("baseline", ["kwta", "sap", "pcl"])
def test_smoke_trains_then_evaluates_each_baseline(baseline, tmp_path):
  from cas_jax.evaluation import evaluate  # pylint: disable=g-import-not-at-top
  from cas_jax.training import train  # pylint: disable=g-import-not-at-top
  from configs import smoke  # pylint: disable=g-import-not-at-top
  config = smoke.get_config()
  config.baseline = baseline
  config.model.width, config.model.cas_stages = 4, "none"
  config.data.synthetic_num_train, config.data.synthetic_num_test = 64, 32
  config.data.image_size = 8  # the code a 32x32 run takes, in a fraction of its time
  config.attack.steps, config.schedule.num_epochs, config.schedule.milestones = 1, 1, (1,)
  config.loss.pcl_warmup_epochs = 0
  config.eval.num_images, config.eval.steps = 32, 1
  config.eval.report_images, config.eval.checkpoints = 16, "last"
  # aa-rand is checked on a cheap model above; here the network's own randomized function.
  config.eval.attacks = "pgd2,eot2" if baseline == "sap" else "pgd2"
  config.eval.apgd_steps, config.eval.eot_draws, config.eval.verdict_draws = 2, 2, 2
  train.train_and_evaluate(config, str(tmp_path))
  report = evaluate.evaluate_workdir(config, str(tmp_path))["last"]
  assert os.path.isfile(tmp_path / "eval" / "last_report.json")
  if baseline == "sap":
    assert report.draws == 2 and report.natural_mean is not None
    assert report.attacks["eot2"]["gradient_draws"] == 2
    assert report.attacks["pgd2"]["gradient_draws"] == 0
    assert "mean over 2 draws" in report.markdown()
  else:
    assert report.draws == 0
