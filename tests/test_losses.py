"""Tests for cas_jax.losses against values worked out by hand.

Most inputs are logits = log(p) for probability rows p written out below, so softmax(logits) = p
and every expected value is a short formula in those probabilities (math.log on the numbers).
"""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cas_jax import losses

BETA = 2.0
LAM = 6.0
BCE_OFFSET = 1.0001  # MART's code takes log(1.0001 - max_{k != y} p_k + 1e-12).


def _logits(probs):
  """Logits whose softmax is exactly the given probability rows."""
  return jnp.log(jnp.asarray(probs, dtype=jnp.float32))


def _ce(p, y):
  return -math.log(p[y])


def _kl(p, q):
  """KL(p || q) for explicit probability rows."""
  return sum(pk * math.log(pk / qk) for pk, qk in zip(p, q))


def _bce(p, y):
  other_max = max(pk for k, pk in enumerate(p) if k != y)
  return -math.log(p[y]) - math.log(BCE_OFFSET - other_max + 1e-12)


def _assert_close(actual, expected, rtol=1e-5, atol=1e-6):
  chex.assert_trees_all_close(
      jnp.asarray(actual, jnp.float32), jnp.asarray(expected, jnp.float32), rtol=rtol, atol=atol)


def _assert_far(actual, wrong):
  """The hand value must be distinguishable from a plausible wrong formula."""
  assert abs(float(actual) - float(wrong)) > 1e-3, (actual, wrong)


# Two examples, three classes. Labels: example 0 is class 1, example 1 is class 0.
LABELS = jnp.array([1, 0], dtype=jnp.int32)
NAT = [[0.2, 0.7, 0.1], [0.8, 0.1, 0.1]]        # main head, natural input
ADV = [[0.3, 0.4, 0.3], [0.5, 0.3, 0.2]]        # main head, adversarial input (ex. 1: label is max)
NAT_CAS1 = [[0.25, 0.5, 0.25], [0.4, 0.35, 0.25]]
ADV_CAS1 = [[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]]
NAT_CAS2 = [[0.1, 0.8, 0.1], [0.3, 0.3, 0.4]]
ADV_CAS2 = [[0.2, 0.2, 0.6], [0.45, 0.45, 0.1]]


def _heads(rows):
  return tuple(_logits(r) for r in rows)


# ---------------------------------------------------------------- basic losses


def test_cross_entropy_hand_values():
  per_example = losses.cross_entropy(_logits(ADV), LABELS)
  chex.assert_shape(per_example, (2,))
  _assert_close(per_example, [-math.log(0.4), -math.log(0.5)])
  # Uniform logits over 4 classes: log 4 whatever the label, shifted logits give the same value.
  uniform = jnp.full((3, 4), 7.5)
  _assert_close(losses.cross_entropy(uniform, jnp.array([0, 2, 3])), [math.log(4)] * 3)


def test_kl_divergence_hand_value_and_direction():
  p, q = [0.7, 0.2, 0.1], [0.2, 0.5, 0.3]
  forward = 0.7 * math.log(0.7 / 0.2) + 0.2 * math.log(0.2 / 0.5) + 0.1 * math.log(0.1 / 0.3)
  value = losses.kl_divergence(_logits([p]), _logits([q]))
  _assert_close(value, [forward])
  _assert_far(value[0], _kl(q, p))  # the divergence is asymmetric: the first argument is p.


def test_kl_divergence_zero_for_equal_inputs_and_nonnegative():
  logits = jax.random.normal(jax.random.key(0), (64, 10)) * 3.0
  _assert_close(losses.kl_divergence(logits, logits), np.zeros(64))
  # Shifting logits by a per-row constant does not change the distribution.
  _assert_close(losses.kl_divergence(logits, logits + 5.0), np.zeros(64), atol=1e-5)
  other = jax.random.normal(jax.random.key(1), (64, 10)) * 3.0
  values = losses.kl_divergence(logits, other)
  chex.assert_shape(values, (64,))
  assert bool(jnp.all(values >= -1e-6))
  assert bool(jnp.all(values > 0.0))  # distinct random rows: strictly positive


def test_boosted_cross_entropy_uses_max_over_other_classes():
  values = losses.boosted_cross_entropy(_logits(ADV), LABELS)
  # Example 0 (y=1): other classes 0.3, 0.3. Example 1 (y=0 is the overall max 0.5): other max 0.3.
  expected = [-math.log(0.4) - math.log(BCE_OFFSET - 0.3 + 1e-12),
              -math.log(0.5) - math.log(BCE_OFFSET - 0.3 + 1e-12)]
  _assert_close(values, expected)
  # Taking the max over all classes (0.5 for example 1) would give a different value.
  _assert_far(values[1], -math.log(0.5) - math.log(BCE_OFFSET - 0.5))


# ---------------------------------------------------------------- training objectives


def test_natural_loss_without_and_with_cas():
  plain = losses.natural_loss(_logits(NAT), (), LABELS, beta=BETA)
  ce = [-math.log(0.7), -math.log(0.8)]
  _assert_close(plain, (ce[0] + ce[1]) / 2)
  with_cas = losses.natural_loss(_logits(NAT), _heads([NAT_CAS1]), LABELS, beta=BETA)
  cas_ce = [-math.log(0.5), -math.log(0.4)]
  _assert_close(with_cas, (ce[0] + BETA * cas_ce[0] + ce[1] + BETA * cas_ce[1]) / 2)


def test_at_loss_one_cas_head():
  value = losses.at_loss(_logits(ADV), _heads([ADV_CAS1]), LABELS, beta=BETA)
  # CE(p(x'), y) + beta/1 * CE(p_1(x'), y), averaged over the two examples.
  ex0 = -math.log(0.4) + BETA * -math.log(0.3)
  ex1 = -math.log(0.5) + BETA * -math.log(0.2)
  _assert_close(value, (ex0 + ex1) / 2)


def test_at_loss_two_cas_heads_is_beta_over_s_times_sum():
  value = losses.at_loss(_logits(ADV), _heads([ADV_CAS1, ADV_CAS2]), LABELS, beta=BETA)
  # beta/S * sum_s with S = 2: each CAS head's CE is weighted by beta / 2 = 1.
  ex0 = -math.log(0.4) + BETA / 2 * (-math.log(0.3) - math.log(0.2))
  ex1 = -math.log(0.5) + BETA / 2 * (-math.log(0.2) - math.log(0.45))
  _assert_close(value, (ex0 + ex1) / 2)
  # beta * sum (no 1/S) would be a different number.
  wrong_ex0 = -math.log(0.4) + BETA * (-math.log(0.3) - math.log(0.2))
  wrong_ex1 = -math.log(0.5) + BETA * (-math.log(0.2) - math.log(0.45))
  _assert_far(value, (wrong_ex0 + wrong_ex1) / 2)


def test_trades_loss_hand_value():
  value = losses.trades_loss(_logits(NAT), _heads([NAT_CAS1, NAT_CAS2]), _logits(ADV),
                             _heads([ADV_CAS1, ADV_CAS2]), LABELS, beta=BETA, lam=LAM)
  expected = []
  for i, y in enumerate([1, 0]):
    main = _ce(NAT[i], y) + LAM * _kl(NAT[i], ADV[i])
    cas = sum(_ce(n[i], y) for n in (NAT_CAS1, NAT_CAS2))
    cas_kl = sum(_kl(n[i], a[i]) for n, a in ((NAT_CAS1, ADV_CAS1), (NAT_CAS2, ADV_CAS2)))
    # CE(p(x)) + lam KL(p(x)||p(x')) + beta/S sum_s CE(p_s(x)) + beta*lam/S sum_s KL_s.
    expected.append(main + BETA / 2 * cas + BETA * LAM / 2 * cas_kl)
  _assert_close(value, sum(expected) / 2)
  # The KL must be KL(natural || adversarial): the reversed direction gives another value.
  reversed_terms = []
  for i, y in enumerate([1, 0]):
    main = _ce(NAT[i], y) + LAM * _kl(ADV[i], NAT[i])
    cas = sum(_ce(n[i], y) for n in (NAT_CAS1, NAT_CAS2))
    cas_kl = sum(_kl(a[i], n[i]) for n, a in ((NAT_CAS1, ADV_CAS1), (NAT_CAS2, ADV_CAS2)))
    reversed_terms.append(main + BETA / 2 * cas + BETA * LAM / 2 * cas_kl)
  _assert_far(value, sum(reversed_terms) / 2)


def test_trades_loss_one_head_spelled_out():
  # One example, y = 0. Natural main [0.5, 0.25, 0.25], adversarial main uniform.
  nat, adv = [[0.5, 0.25, 0.25]], [[1 / 3, 1 / 3, 1 / 3]]
  nat_cas, adv_cas = [[0.25, 0.5, 0.25]], [[0.5, 0.25, 0.25]]
  value = losses.trades_loss(_logits(nat), (_logits(nat_cas),), _logits(adv), (_logits(adv_cas),),
                             jnp.array([0]), beta=1.5, lam=4.0)
  kl_main = 0.5 * math.log(1.5) + 2 * 0.25 * math.log(0.75)
  kl_cas = 0.25 * math.log(0.5) + 0.5 * math.log(2.0) + 0.25 * math.log(1.0)
  expected = math.log(2) + 4.0 * kl_main + 1.5 * math.log(4) + 1.5 * 4.0 * kl_cas
  _assert_close(value, expected)


def test_mart_loss_hand_value_uses_main_head_weight():
  heads_nat, heads_adv = (NAT_CAS1, NAT_CAS2), (ADV_CAS1, ADV_CAS2)
  value = losses.mart_loss(_logits(NAT), _heads(heads_nat), _logits(ADV), _heads(heads_adv),
                           LABELS, beta=BETA, lam=LAM)

  def expected_loss(cas_weight_from_own_head):
    total = 0.0
    for i, y in enumerate([1, 0]):
      weight = 1.0 - NAT[i][y]  # main head's natural p_y: 0.3 and 0.2.
      main = _bce(ADV[i], y) + LAM * weight * _kl(NAT[i], ADV[i])
      cas = 0.0
      for n, a in zip(heads_nat, heads_adv):
        cas_weight = 1.0 - n[i][y] if cas_weight_from_own_head else weight
        cas += _bce(a[i], y) + LAM * cas_weight * _kl(n[i], a[i])
      total += main + BETA / 2 * cas
    return total / 2

  _assert_close(value, expected_loss(cas_weight_from_own_head=False))
  # The CAS heads' natural p_y (ex. 0: 0.5, 0.8; ex. 1: 0.4, 0.3) differ from the main head's
  # (0.7; 0.8): weighting their KL by their own 1 - p_y would give another number.
  _assert_far(value, expected_loss(cas_weight_from_own_head=True))


def test_mart_loss_max_over_other_classes_matters():
  # One example whose label (class 0) is the adversarial overall max: max_{k != y} p_k = 0.3.
  nat, adv = [[0.6, 0.3, 0.1]], [[0.5, 0.3, 0.2]]
  value = losses.mart_loss(_logits(nat), (), _logits(adv), (), jnp.array([0]), beta=BETA, lam=LAM)
  kl = 0.6 * math.log(0.6 / 0.5) + 0.3 * math.log(1.0) + 0.1 * math.log(0.1 / 0.2)
  expected = -math.log(0.5) - math.log(BCE_OFFSET - 0.3 + 1e-12) + LAM * 0.4 * kl
  _assert_close(value, expected)
  _assert_far(value, -math.log(0.5) - math.log(BCE_OFFSET - 0.5) + LAM * 0.4 * kl)


@pytest.mark.parametrize("objective", ["natural", "at", "trades", "mart"])
def test_plain_network_drops_cas_terms(objective):
  labels, ys = LABELS, [1, 0]
  nat, adv = _logits(NAT), _logits(ADV)
  if objective == "natural":
    value = losses.natural_loss(nat, (), labels, beta=BETA)
    per_example = [_ce(NAT[i], y) for i, y in enumerate(ys)]
  elif objective == "at":
    value = losses.at_loss(adv, (), labels, beta=BETA)
    per_example = [_ce(ADV[i], y) for i, y in enumerate(ys)]
  elif objective == "trades":
    value = losses.trades_loss(nat, (), adv, (), labels, beta=BETA, lam=LAM)
    per_example = [_ce(NAT[i], y) + LAM * _kl(NAT[i], ADV[i]) for i, y in enumerate(ys)]
  else:
    value = losses.mart_loss(nat, (), adv, (), labels, beta=BETA, lam=LAM)
    per_example = [_bce(ADV[i], y) + LAM * (1 - NAT[i][y]) * _kl(NAT[i], ADV[i])
                   for i, y in enumerate(ys)]
  chex.assert_shape(value, ())
  _assert_close(value, sum(per_example) / 2)


def test_trades_and_mart_without_perturbation_reduce_to_their_natural_parts():
  # x' = x: every KL term vanishes, so TRADES is the natural loss and MART the mean BCE.
  nat, cas = _logits(NAT), _heads([NAT_CAS1, NAT_CAS2])
  _assert_close(losses.trades_loss(nat, cas, nat, cas, LABELS, beta=BETA, lam=LAM),
                losses.natural_loss(nat, cas, LABELS, beta=BETA))
  bce = [_bce(NAT[i], y) + BETA / 2 * sum(_bce(c[i], y) for c in (NAT_CAS1, NAT_CAS2))
         for i, y in enumerate([1, 0])]
  _assert_close(losses.mart_loss(nat, cas, nat, cas, LABELS, beta=BETA, lam=LAM), sum(bce) / 2)


def test_mismatched_head_counts_raise():
  with pytest.raises(ValueError, match="same number of CAS heads"):
    losses.trades_loss(_logits(NAT), _heads([NAT_CAS1]), _logits(ADV),
                       _heads([ADV_CAS1, ADV_CAS2]), LABELS, beta=BETA, lam=LAM)
  with pytest.raises(ValueError, match="same number of CAS heads"):
    losses.mart_loss(_logits(NAT), (), _logits(ADV), _heads([ADV_CAS1]), LABELS,
                     beta=BETA, lam=LAM)


def test_at_loss_gradient_wrt_cas_logits_scales_with_beta():
  adv, cas = _logits(ADV), _heads([ADV_CAS1, ADV_CAS2])

  def cas_grad(beta):
    return jax.grad(lambda c: losses.at_loss(adv, c, LABELS, beta=beta))(cas)

  one_hot = np.eye(3)[[1, 0]]
  for beta in (0.5, 2.0):
    grads = cas_grad(beta)
    for head_grad, rows in zip(grads, (ADV_CAS1, ADV_CAS2)):
      # d/dz of beta/S * mean_n CE(z_n, y_n) is beta / (S * N) * (softmax(z) - one_hot(y)).
      _assert_close(head_grad, beta / (2 * 2) * (np.asarray(rows) - one_hot))
      assert float(jnp.max(jnp.abs(head_grad))) > 0.0
  low, high = cas_grad(0.5), cas_grad(2.0)
  for g_low, g_high in zip(low, high):
    _assert_close(g_high, 4.0 * g_low)
  # The main head's gradient does not depend on beta.
  main_grad = [jax.grad(lambda z, b=b: losses.at_loss(z, cas, LABELS, beta=b))(adv)
               for b in (0.5, 2.0)]
  _assert_close(main_grad[0], main_grad[1])
  _assert_close(main_grad[0], 0.5 * (np.asarray(ADV) - one_hot))


# ---------------------------------------------------------------- losses attacks ascend

# Raw logits, four classes. Sorted values: row 0 -> 3, 2, 1, 0; row 1 -> 4, 2, 1, -1.
RAW = jnp.array([[3.0, 1.0, 2.0, 0.0],
                 [-1.0, 4.0, 1.0, 2.0]])


def test_margin_hand_values():
  # Row 0, y=0 (correct): max other 2 - 3 = -1. Row 1, y=3: max other 4 - 2 = 2.
  _assert_close(losses.margin(RAW, jnp.array([0, 3])), [-1.0, 2.0])
  # Row 1, y=1 is the max: the margin uses the runner-up 2, not the max itself.
  _assert_close(losses.margin(RAW, jnp.array([0, 1])), [-1.0, -2.0])


def test_dlr_hand_values():
  # -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3).
  values = losses.dlr(RAW, jnp.array([0, 3]))
  _assert_close(values, [-(3.0 - 2.0) / (3.0 - 1.0), -(2.0 - 4.0) / (4.0 - 1.0)])
  values = losses.dlr(RAW, jnp.array([1, 1]))
  _assert_close(values, [-(1.0 - 3.0) / (3.0 - 1.0), -(4.0 - 2.0) / (4.0 - 1.0)])
  # Invariant to shifting and positive scaling of the logits.
  _assert_close(losses.dlr(3.0 * RAW + 7.0, jnp.array([1, 1])), values)


def test_targeted_dlr_hand_values():
  # -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2).
  values = losses.targeted_dlr(RAW, jnp.array([0, 1]), jnp.array([2, 0]))
  expected = [-(3.0 - 2.0) / (3.0 - (1.0 + 0.0) / 2), -(4.0 - -1.0) / (4.0 - (1.0 + -1.0) / 2)]
  _assert_close(values, expected)


def test_dlr_needs_enough_classes():
  with pytest.raises(ValueError, match="at least 3 classes"):
    losses.dlr(jnp.zeros((2, 2)), jnp.array([0, 1]))
  with pytest.raises(ValueError, match="at least 4 classes"):
    losses.targeted_dlr(jnp.zeros((2, 3)), jnp.array([0, 1]), jnp.array([1, 2]))


# Two CAS heads for the joint attack losses, on the same four classes.
CAS_RAW = (jnp.array([[0.0, 2.0, 1.0, -1.0], [1.0, 0.0, 3.0, 0.5]]),
           jnp.array([[1.0, 1.0, 0.0, 4.0], [0.0, 2.0, -2.0, 1.0]]))


def _np_ce(z, y):
  z = np.asarray(z, np.float64)
  return math.log(np.sum(np.exp(z))) - z[y]


def test_joint_ce_hand_values():
  labels = [0, 3]
  values = losses.joint_ce(RAW, CAS_RAW, jnp.array(labels), beta=BETA)
  chex.assert_shape(values, (2,))
  expected = [_np_ce(RAW[i], y) + BETA / 2 * sum(_np_ce(c[i], y) for c in CAS_RAW)
              for i, y in enumerate(labels)]
  _assert_close(values, expected)
  # Row 0 spelled out: log(e^3 + e + e^2 + 1) - 3.
  _assert_close(losses.joint_ce(RAW, (), jnp.array(labels), beta=BETA)[0],
                math.log(math.exp(3) + math.e + math.exp(2) + 1) - 3)


def test_joint_kl_hand_value_and_direction():
  nat, adv = _logits(NAT), _logits(ADV)
  values = losses.joint_kl(adv, _heads([ADV_CAS1, ADV_CAS2]), nat, _heads([NAT_CAS1, NAT_CAS2]),
                           beta=BETA)
  pairs = ((NAT_CAS1, ADV_CAS1), (NAT_CAS2, ADV_CAS2))
  expected = [_kl(NAT[i], ADV[i]) + BETA / 2 * sum(_kl(n[i], a[i]) for n, a in pairs)
              for i in range(2)]
  _assert_close(values, expected)
  main_only = losses.joint_kl(adv, (), nat, (), beta=BETA)
  _assert_close(main_only, [_kl(NAT[i], ADV[i]) for i in range(2)])
  _assert_far(values[0], _kl(ADV[0], NAT[0]) + BETA / 2 * sum(_kl(a[0], n[0]) for n, a in pairs))


def test_joint_margin_hand_values():
  values = losses.joint_margin(RAW, CAS_RAW, jnp.array([0, 3]), beta=BETA)
  # Row 0, y=0: main 2-3=-1; head 1: 2-0=2; head 2: 4-1=3. Row 1, y=3: main 4-2=2;
  # head 1: 3-0.5=2.5; head 2: 2-1=1.
  _assert_close(values, [-1.0 + BETA / 2 * (2.0 + 3.0), 2.0 + BETA / 2 * (2.5 + 1.0)])


def test_joint_dlr_hand_values():
  values = losses.joint_dlr(RAW, CAS_RAW, jnp.array([0, 3]), beta=BETA)
  # Head 1 sorted: row 0 -> 2, 1, 0, -1; row 1 -> 3, 1, 0.5, 0. Head 2: row 0 -> 4, 1, 1, 0;
  # row 1 -> 2, 1, 0, -2.
  main = [-(3.0 - 2.0) / (3.0 - 1.0), -(2.0 - 4.0) / (4.0 - 1.0)]
  head1 = [-(0.0 - 2.0) / (2.0 - 0.0), -(0.5 - 3.0) / (3.0 - 0.5)]
  head2 = [-(1.0 - 4.0) / (4.0 - 1.0), -(1.0 - 2.0) / (2.0 - 0.0)]
  _assert_close(values, [main[i] + BETA / 2 * (head1[i] + head2[i]) for i in range(2)])
  _assert_close(losses.joint_dlr(RAW, (), jnp.array([0, 3]), beta=BETA), main)


def test_joint_targeted_dlr_hand_values():
  labels, targets = jnp.array([0, 3]), jnp.array([2, 1])
  values = losses.joint_targeted_dlr(RAW, CAS_RAW, labels, targets, beta=BETA)
  main = [-(3.0 - 2.0) / (3.0 - (1.0 + 0.0) / 2), -(2.0 - 4.0) / (4.0 - (1.0 - 1.0) / 2)]
  head1 = [-(0.0 - 1.0) / (2.0 - (0.0 - 1.0) / 2), -(0.5 - 0.0) / (3.0 - (0.5 + 0.0) / 2)]
  head2 = [-(1.0 - 0.0) / (4.0 - (1.0 + 0.0) / 2), -(1.0 - 2.0) / (2.0 - (0.0 - 2.0) / 2)]
  _assert_close(values, [main[i] + BETA / 2 * (head1[i] + head2[i]) for i in range(2)])
