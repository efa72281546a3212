"""The losses attacks ascend, by name (ce, cw, dlr, their joint versions with the CAS heads,
cas_ce) against their formulas in numpy, and the joint losses' gradient reaching the CAS heads.
The tiny models are tests/test_attacks.py's."""
import functools
import importlib

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from cas_jax import losses
from cas_jax.attacks import engine
from cas_jax.attacks import white_box
from test_attacks import DIM, _images, _linear_model, _normal, pgd


def _np_ce(z, y):
  return np.log(np.sum(np.exp(z))) - z[y]


def _np_margin(z, y):
  return np.max(np.delete(z, y)) - z[y]


def _np_dlr(z, y):
  top = np.sort(z)[::-1]
  return _np_margin(z, y) / (top[0] - top[2])


def test_attack_losses_by_name_equal_their_formulas():
  logits = np.array([[2.0, 0.5, -1.0, 1.0], [0.0, 3.0, 1.0, -2.0]], np.float32)
  cas = (np.array([[1.0, 2.0, 0.0, -1.0], [0.5, 0.0, 2.5, 1.0]], np.float32),
         np.array([[0.0, -1.0, 3.0, 1.0], [2.0, 1.0, 0.0, 0.5]], np.float32))
  y, beta = np.array([0, 2]), 3.0
  formulas = {"ce": _np_ce, "cw": _np_margin, "dlr": _np_dlr}
  for name, formula in formulas.items():
    main = [formula(logits[i], y[i]) for i in range(2)]
    heads = [np.mean([formula(c[i], y[i]) for c in cas]) for i in range(2)]
    joint = "joint_cw" if name == "cw" else f"joint_{name}"
    outputs = (jnp.asarray(logits), tuple(jnp.asarray(c) for c in cas))
    np.testing.assert_allclose(white_box.attack_loss(name)(outputs, jnp.asarray(y)), main,
                               rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(white_box.attack_loss(joint, beta=beta)(outputs, jnp.asarray(y)),
                               np.add(main, beta * np.asarray(heads)), rtol=1e-5, err_msg=joint)
    # A plain model's outputs (logits only): the joint loss is the main-head loss.
    np.testing.assert_allclose(white_box.attack_loss(joint)(jnp.asarray(logits), jnp.asarray(y)),
                               main, rtol=1e-5, err_msg=joint)
  cas_ce = [np.mean([_np_ce(c[i], y[i]) for c in cas]) for i in range(2)]
  np.testing.assert_allclose(white_box.attack_loss("cas_ce")(outputs, jnp.asarray(y)), cas_ce,
                             rtol=1e-5)
  custom = lambda outputs, y: -losses.margin(outputs[0], y)
  assert white_box.attack_loss(custom) is custom


@functools.lru_cache(maxsize=None)
def _cas_only_model():
  """Main logits constant in x; a CAS head that is linear in x: only the CAS term has gradient."""
  w = _normal(3, (DIM, 3))
  return lambda x: (jnp.zeros((x.shape[0], 3)) + jnp.array([1.0, 0.0, -1.0]),
                    (x.reshape(x.shape[0], -1) @ w,))


def test_joint_loss_reaches_cas_heads():
  model_fn = _cas_only_model()
  x, y = _images(4, 3), jnp.array([0, 1, 2])

  main_only, joint = ("ce", "cw", "dlr"), ("joint_ce", "joint_cw", "cas_ce")

  @jax.jit
  def input_grads(x):
    return {n: jax.grad(lambda z: jnp.sum(white_box.attack_loss(n)(model_fn(z), y)))(x)
            for n in main_only + joint}

  grads = input_grads(x)
  for name in main_only:
    assert float(jnp.max(jnp.abs(grads[name]))) == 0.0, name
  for name in joint:
    assert float(jnp.min(jnp.sum(jnp.abs(grads[name]), axis=(1, 2, 3)))) > 0.0, name
  # So PGD from x itself does not move on CE but does on the joint loss.
  key = jax.random.key(0)
  np.testing.assert_array_equal(pgd(model_fn, x, y, eps=0.1, steps=3, key=key, start="none"), x)
  moved = pgd(model_fn, x, y, eps=0.1, steps=3, key=key, start="none", loss="joint_ce")
  assert float(jnp.min(jnp.max(jnp.abs(moved - x), axis=(1, 2, 3)))) > 0.03 - 1e-6  # 3 x eps/10


def test_cas_loss_on_plain_model_raises():
  with pytest.raises(ValueError, match="no CAS logits"):
    pgd(_linear_model(0, 3), _images(0, 2), jnp.zeros(2, jnp.int32), eps=0.1, steps=2,
        key=jax.random.key(0), loss="cas_ce")


def _cas_mlp():
  """A model whose main and CAS heads both depend on x (so every loss of a family differs)."""
  w, v = _normal(5, (DIM, 4)), _normal(6, (DIM, 4))
  return lambda x: (x.reshape(x.shape[0], -1) @ w, (x.reshape(x.shape[0], -1) @ v,))


def test_a_loss_family_runs_each_member_as_its_own_program_would():
  """APGD's and PGD's loss families (one compiled program; the loss picked by a traced index,
  rank 0 for no target) give each member's own result, bit for bit."""
  apgd_module = importlib.import_module("cas_jax.attacks.apgd")
  model_fn, x, y = _cas_mlp(), _images(7, 6), jnp.array([0, 1, 2, 0, 1, 2])
  keys, family = engine.example_keys(jax.random.key(3), 6), apgd_module.APGD_LOSSES
  results = set()
  for index, name in enumerate(family):
    rank = 2 if name in apgd_module.TARGETED_LOSSES else None
    alone = apgd_module.apgd_round(model_fn, x, y, keys, 0.1, steps=4, loss=name, rank=rank)
    shared = apgd_module.apgd_round(model_fn, x, y, keys, 0.1, steps=4, loss=family,
                                    loss_index=index, rank=rank or 0)
    for a, b in zip(alone, shared):
      np.testing.assert_array_equal(a, b, err_msg=name)
    results.add(np.asarray(alone[0]).tobytes())
  assert len(results) == len(family)  # the members are different attacks
  pgd_family = ("ce", "cw", "joint_ce", "joint_cw")
  for index, name in enumerate(pgd_family):
    np.testing.assert_array_equal(
        pgd(model_fn, x, y, eps=0.1, steps=3, key=keys[0], loss=name),
        pgd(model_fn, x, y, eps=0.1, steps=3, key=keys[0], loss=pgd_family, loss_index=index),
        err_msg=name)


def test_a_loss_family_differentiates_as_its_picked_member():
  """The family's gradient, taken inside the picked branch (a custom VJP), equals the member's
  own for any per-example cotangent, through the model and its CAS heads, and for every index;
  and JAX does not differentiate the family's switch."""
  apgd_module = importlib.import_module("cas_jax.attacks.apgd")
  model_fn, x, y = _cas_mlp(), _images(7, 6), jnp.array([0, 1, 2, 0, 1, 2])
  targets, weights = jnp.array([1, 2, 0, 2, 0, 1]), jnp.array([1.0, -2.0, 0.5, 3.0, 0.0, 1.5])
  family = apgd_module.APGD_LOSSES
  weighted = lambda loss: lambda z: jnp.sum(weights * loss(model_fn(z), y, targets))
  for index, name in enumerate(family):
    own = jax.grad(weighted(apgd_module.apgd_loss(name)))(x)
    picked = jax.grad(weighted(apgd_module.apgd_loss(family, index=jnp.asarray(index))))(x)
    np.testing.assert_allclose(picked, own, rtol=1e-5, atol=1e-6, err_msg=name)
    assert float(jnp.abs(own).max()) > 0, name
  # The switch is not differentiated (JAX traces that slowly): its gradient has the forward
  # switch only, where differentiating it adds its transpose, a second one.
  gradient = jax.make_jaxpr(jax.grad(
      lambda z, index: weighted(apgd_module.apgd_loss(family, index=index))(z)))(x, 1)
  assert _count_primitive(gradient.jaxpr, "cond") == 1


def _count_primitive(jaxpr, name):
  """How many equations of primitive `name` a jaxpr holds, its sub-jaxprs included."""
  subs = lambda eqn: jax.extend.core.jaxprs_in_params(eqn.params)
  return sum(int(eqn.primitive.name == name) + sum(_count_primitive(sub, name) for sub in subs(eqn))
             for eqn in jaxpr.eqns)
