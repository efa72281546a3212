"""Training objectives (natural, AT, TRADES, MART, each +-CAS) and the losses attacks ascend.

Everything here is a pure function of logits and integer labels. Per-example losses have
shape (N,); objectives return a scalar (the batch mean). CAS terms take `cas_logits`, a
tuple with one (N, C) array per CAS module; S = len(cas_logits), and an empty tuple (a plain
network) drops every CAS term.

    total = losses.at_loss(adv_logits, adv_cas_logits, labels, beta=2.0)
    per_example = losses.joint_ce(logits, cas_logits, labels, beta=2.0)   # what PGD ascends
"""
from typing import Sequence

import jax
import jax.numpy as jnp
import optax

Array = jax.Array
CasLogits = Sequence[Array]


def cross_entropy(logits: Array, labels: Array) -> Array:
  """Per-example softmax cross-entropy with integer labels."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def kl_divergence(p_logits: Array, q_logits: Array) -> Array:
  """Per-example KL(softmax(p_logits) || softmax(q_logits))."""
  p_log = jax.nn.log_softmax(p_logits)
  q_log = jax.nn.log_softmax(q_logits)
  return jnp.sum(jnp.exp(p_log) * (p_log - q_log), axis=-1)


def _other_class_max(values: Array, labels: Array) -> Array:
  """max_{k != y} values[:, k]."""
  is_label = jax.nn.one_hot(labels, values.shape[-1], dtype=bool)
  return jnp.max(jnp.where(is_label, -jnp.inf, values), axis=-1)


def _check_num_classes(logits: Array, minimum: int, loss_name: str) -> None:
  """Raises when there are too few classes: jnp clamps out-of-range indices silently."""
  if logits.shape[-1] < minimum:
    raise ValueError(f"{loss_name} needs logits with at least {minimum} classes, shape (N, C) with "
                     f"C >= {minimum}; got shape {logits.shape}. Use margin() for fewer classes.")


def _paired_heads(nat_cas_logits: CasLogits, adv_cas_logits: CasLogits):
  """zip of natural and adversarial CAS heads; raises if their counts differ."""
  if len(nat_cas_logits) != len(adv_cas_logits):
    raise ValueError(f"natural and adversarial outputs must have the same number of CAS heads; got "
                     f"{len(nat_cas_logits)} and {len(adv_cas_logits)}.")
  return zip(nat_cas_logits, adv_cas_logits)


def _label_value(values: Array, labels: Array) -> Array:
  return jnp.take_along_axis(values, labels[:, None], axis=-1)[:, 0]


def boosted_cross_entropy(logits: Array, labels: Array) -> Array:
  """MART's BCE: -log p_y - log(1 - max_{k != y} p_k), with the official code's offsets."""
  probs = jax.nn.softmax(logits)
  # 1.0001 and 1e-12 are the MART code's guards against log(0).
  return cross_entropy(logits, labels) - jnp.log(1.0001 - _other_class_max(probs, labels) + 1e-12)


def margin(logits: Array, labels: Array) -> Array:
  """CW margin max_{k != y} z_k - z_y (positive = misclassified); attacks ascend it."""
  return _other_class_max(logits, labels) - _label_value(logits, labels)


def dlr(logits: Array, labels: Array) -> Array:
  """Croce & Hein's DLR loss -(z_y - max_{k != y} z_k) / (z_pi1 - z_pi3 + 1e-12)."""
  _check_num_classes(logits, 3, "dlr")
  top = jnp.sort(logits, axis=-1)[:, ::-1]
  return margin(logits, labels) / (top[:, 0] - top[:, 2] + 1e-12)


def targeted_dlr(logits: Array, labels: Array, targets: Array) -> Array:
  """Targeted DLR -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)."""
  _check_num_classes(logits, 4, "targeted_dlr")
  top = jnp.sort(logits, axis=-1)[:, ::-1]
  scale = top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12
  return (_label_value(logits, targets) - _label_value(logits, labels)) / scale


def _mean_over_heads(per_head: Sequence[Array], like: Array) -> Array:
  """Mean over CAS heads of per-example values; zeros when there are no heads."""
  if not per_head:
    return jnp.zeros_like(like)
  return sum(per_head) / len(per_head)


# ---------------------------------------------------------------- losses attacks ascend


def joint_ce(logits: Array, cas_logits: CasLogits, labels: Array, beta: float) -> Array:
  """Per-example CE(main) + beta * mean_s CE(CAS_s): the adaptive attack loss."""
  main = cross_entropy(logits, labels)
  return main + beta * _mean_over_heads([cross_entropy(c, labels) for c in cas_logits], main)


def joint_kl(logits: Array, cas_logits: CasLogits, nat_logits: Array,
             nat_cas_logits: CasLogits, beta: float) -> Array:
  """Per-example KL(nat || adv) of the main head + beta * mean_s of the heads' KL (TRADES attack)."""
  main = kl_divergence(nat_logits, logits)
  heads = [kl_divergence(n, a) for n, a in _paired_heads(nat_cas_logits, cas_logits)]
  return main + beta * _mean_over_heads(heads, main)


def joint_margin(logits: Array, cas_logits: CasLogits, labels: Array, beta: float) -> Array:
  """Per-example CW margin of the main head + beta * mean of the CAS heads' margins."""
  main = margin(logits, labels)
  return main + beta * _mean_over_heads([margin(c, labels) for c in cas_logits], main)


def joint_dlr(logits: Array, cas_logits: CasLogits, labels: Array, beta: float) -> Array:
  """Per-example DLR of the main head + beta * mean of the CAS heads' DLR."""
  main = dlr(logits, labels)
  return main + beta * _mean_over_heads([dlr(c, labels) for c in cas_logits], main)


def joint_targeted_dlr(logits: Array, cas_logits: CasLogits, labels: Array, targets: Array,
                       beta: float) -> Array:
  """Per-example targeted DLR of the main head + beta * mean of the CAS heads' targeted DLR."""
  main = targeted_dlr(logits, labels, targets)
  heads = [targeted_dlr(c, labels, targets) for c in cas_logits]
  return main + beta * _mean_over_heads(heads, main)


# ---------------------------------------------------------------- training objectives


def natural_loss(logits: Array, cas_logits: CasLogits, labels: Array, beta: float) -> Array:
  """Natural training: mean of CE(p(x), y) + beta/S * sum_s CE(p_s(x), y)."""
  return jnp.mean(joint_ce(logits, cas_logits, labels, beta))


def at_loss(adv_logits: Array, adv_cas_logits: CasLogits, labels: Array, beta: float) -> Array:
  """PGD-AT (+CAS): mean of CE(p(x'), y) + beta/S * sum_s CE(p_s(x'), y)."""
  return jnp.mean(joint_ce(adv_logits, adv_cas_logits, labels, beta))


def trades_loss(nat_logits: Array, nat_cas_logits: CasLogits, adv_logits: Array,
                adv_cas_logits: CasLogits, labels: Array, beta: float, lam: float) -> Array:
  """TRADES (+CAS): CE(p(x)) + lam KL(p(x)||p(x')) + beta/S sum_s [CE(p_s(x)) + lam KL_s]."""
  natural = joint_ce(nat_logits, nat_cas_logits, labels, beta)
  robust = joint_kl(adv_logits, adv_cas_logits, nat_logits, nat_cas_logits, beta)
  return jnp.mean(natural + lam * robust)


def mart_loss(nat_logits: Array, nat_cas_logits: CasLogits, adv_logits: Array,
              adv_cas_logits: CasLogits, labels: Array, beta: float, lam: float) -> Array:
  """MART (+CAS): BCE(p(x')) + lam KL(p(x)||p(x'))(1 - p_y(x)), and the same per CAS head.

  As in the official code, every KL term (the CAS heads' included) is weighted by
  1 - p_y(x) of the main head's natural prediction.
  """
  weight = 1.0 - _label_value(jax.nn.softmax(nat_logits), labels)
  main = boosted_cross_entropy(adv_logits, labels) + lam * weight * kl_divergence(
      nat_logits, adv_logits)
  heads = [
      boosted_cross_entropy(a, labels) + lam * weight * kl_divergence(n, a)
      for n, a in _paired_heads(nat_cas_logits, adv_cas_logits)
  ]
  return jnp.mean(main + beta * _mean_over_heads(heads, main))


# ---------------------------------------------------------------- PCL (paper Table 1 baseline)


def _distances(a: Array, b: Array) -> Array:
  """Euclidean distances (N, M) between the rows of a (N, D) and b (M, D); finite gradient at 0."""
  return jnp.sqrt(jnp.sum(jnp.square(a[:, None, :] - b[None, :, :]), axis=-1) + 1e-12)


def prototype_conformity(features: Array, prototypes: Array, labels: Array) -> Array:
  """Per-example PCL (Mustafa et al. 2019, eq. 3): pull f to its prototype, push from the rest.

  ||f - w_y|| - 1/(C-1) sum_{j != y} (||f - w_j|| + ||w_y - w_j||), Euclidean norms.
  """
  num_classes = prototypes.shape[0]
  _check_num_classes(prototypes.T, 2, "prototype_conformity")
  to_prototypes = _distances(features, prototypes)  # (N, C)
  between = _distances(prototypes, prototypes)[labels]  # (N, C): ||w_y - w_j||
  is_label = jax.nn.one_hot(labels, num_classes, dtype=bool)
  pull = _label_value(to_prototypes, labels)
  push = jnp.sum(jnp.where(is_label, 0.0, to_prototypes + between), axis=-1) / (num_classes - 1)
  return pull - push


def pcl_loss(logits: Array, cas_logits: CasLogits, branches, labels: Array, beta: float,
             weight: float) -> Array:
  """AT with PCL: mean of CE(+CAS) on the adversaries + weight * sum over branches of mean PCL.

  branches: (features, prototypes) pairs, as models.baselines.PrototypeBranch sows them.
  """
  pcl = sum(jnp.mean(prototype_conformity(f, w, labels)) for f, w in branches)
  return jnp.mean(joint_ce(logits, cas_logits, labels, beta)) + weight * pcl
