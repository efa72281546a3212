"""models.conv: the CPU convolution with a loop-friendly input gradient computes what
lax.conv_general_dilated and its autodiff compute, at every stride, kernel and padding the
networks use (and odd sizes), in float32 and bfloat16, also inside a fori_loop."""
import json
import os
import subprocess
import sys

import chex
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from cas_jax import cli
from cas_jax import models
from cas_jax.models import conv

DN = conv.CHANNELS_LAST


def _both(lhs, rhs, strides, padding):
  ours = lambda a, b: conv.conv_general_dilated(a, b, strides, padding, dimension_numbers=DN)
  theirs = lambda a, b: lax.conv_general_dilated(a, b, strides, padding, dimension_numbers=DN)
  return ours, theirs


@pytest.mark.parametrize("size,kernel,stride,padding", [
    (8, 3, 1, ((1, 1), (1, 1))), (8, 3, 2, ((1, 1), (1, 1))), (9, 3, 2, ((1, 1), (1, 1))),
    (8, 1, 2, "VALID"), (7, 1, 1, "VALID"), (9, 3, 2, "SAME"), (8, 3, 1, ((0, 2), (2, 0))),
    (10, 5, 3, ((2, 1), (0, 0)))])
def test_values_and_both_gradients_equal_lax(size, kernel, stride, padding):
  k1, k2, k3 = jax.random.split(jax.random.key(size * 100 + kernel * 10 + stride), 3)
  lhs = jax.random.normal(k1, (2, size, size + 1, 3))
  rhs = jax.random.normal(k2, (kernel, kernel, 3, 4))
  ours, theirs = _both(lhs, rhs, (stride, stride), padding)
  out = theirs(lhs, rhs)
  weights = jax.random.normal(k3, out.shape)
  chex.assert_trees_all_close(ours(lhs, rhs), out, atol=1e-5)
  loss = lambda f: lambda a, b: jnp.sum(weights * jnp.tanh(f(a, b)))
  chex.assert_trees_all_close(jax.grad(loss(ours), (0, 1))(lhs, rhs),
                              jax.grad(loss(theirs), (0, 1))(lhs, rhs), atol=1e-4, rtol=1e-5)


def test_bfloat16_gradient_keeps_its_dtype_and_stays_close():
  lhs = jax.random.normal(jax.random.key(0), (2, 8, 8, 4)).astype(jnp.bfloat16)
  rhs = jax.random.normal(jax.random.key(1), (3, 3, 4, 4)).astype(jnp.bfloat16)
  ours, theirs = _both(lhs, rhs, (2, 2), ((1, 1), (1, 1)))
  loss = lambda f: lambda a: jnp.sum(f(a, rhs).astype(jnp.float32) ** 2)
  grad = jax.grad(loss(ours))(lhs)
  assert grad.dtype == jnp.bfloat16
  chex.assert_trees_all_close(grad.astype(jnp.float32),
                              jax.grad(loss(theirs))(lhs).astype(jnp.float32), rtol=0.05,
                              atol=0.5)


def test_other_layouts_and_grouped_convolutions_fall_back_to_lax():
  lhs = jax.random.normal(jax.random.key(0), (1, 4, 6, 6))  # NCHW
  rhs = jax.random.normal(jax.random.key(1), (4, 2, 3, 3))  # OIHW, 2 groups
  args = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"),
              feature_group_count=2)
  chex.assert_trees_all_close(conv.conv_general_dilated(lhs, rhs, **args),
                              lax.conv_general_dilated(lhs, rhs, **args), atol=1e-5)


def _attack_and_gradient(model, variables, x):
  """Three PGD-like steps in a fori_loop and one input gradient (fresh functions: no jit cache)."""
  loss = lambda z: jnp.sum(model.apply(variables, z, train=False)[0] ** 2)
  step = lambda i, z: jnp.clip(z + 1e-3 * jnp.sign(jax.grad(loss)(z)), 0, 1)
  return jax.jit(lambda z: lax.fori_loop(0, 3, step, z))(x), jax.grad(loss)(x)


def test_a_networks_input_gradient_in_a_fori_loop_equals_lax_autodiff(monkeypatch):
  model = models.create("resnet18", 10, width=4)
  x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3))
  variables = model.init(jax.random.key(1), x, train=False)
  ours = _attack_and_gradient(model, variables, x)
  calls = []
  monkeypatch.setattr(conv, "conv_general_dilated",
                      lambda *a, **k: calls.append(1) or lax.conv_general_dilated(*a, **k))
  theirs = _attack_and_gradient(model, variables, x)
  assert calls  # the network did convolve with lax's own this time
  chex.assert_trees_all_close(ours, theirs, atol=1e-5, rtol=1e-5)


CLI_SCRIPT = """
import json, os
from cas_jax import cli

def report(argv):
  import jax, jax.numpy as jnp
  conv = lambda a, b: jax.lax.conv_general_dilated(a, b, (1, 1), "SAME",
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  hlo = jax.jit(conv).lower(jnp.ones((2, 8, 8, 64)), jnp.ones((3, 3, 64, 64))).compile().as_text()
  flags = os.environ.get("XLA_FLAGS", "")
  os.environ.pop("XLA_FLAGS", None)  # as if never set: the backends have started all the same
  os.environ.pop(cli.CPU_CONVOLUTIONS_ENV, None)
  bits = jax.jit(lambda k: jax.random.bits(k, (4,)))
  threefry = bits.lower(jax.random.key(0)).compile().as_text()
  print(json.dumps({"flags": flags, "ynn": "__ynn_fusion" in hlo,
                    "again": cli.use_eigen_cpu_convolutions(),
                    "threefry_loop": " while(" in threefry}))

cli.run(report)
"""


@pytest.mark.parametrize("env,eigen", [
    ({}, True), ({"CAS_JAX_CPU_CONVOLUTIONS": "xla"}, False),
    ({"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=+LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"},
     False)])
def test_the_commands_convolve_with_eigen_on_the_cpu_unless_told_otherwise(env, eigen):
  """The commands' XLA:CPU choices: Eigen convolutions (unless told otherwise) and threefry
  compiled without its loop."""
  base = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", cli.CPU_CONVOLUTIONS_ENV)}
  done = subprocess.run([sys.executable, "-c", CLI_SCRIPT], env={**base, **env}, check=True,
                        capture_output=True, text=True, timeout=120)
  seen = json.loads(done.stdout.strip().splitlines()[-1])
  assert seen["ynn"] is not eigen  # YNNPACK fuses the convolution unless the command says Eigen
  assert (seen["flags"] != env.get("XLA_FLAGS", "")) is eigen  # the user's own choice stays
  assert seen["again"] is False  # once the backends started, XLA_FLAGS no longer matters
  assert seen["threefry_loop"] is False  # the commands compile threefry unrolled (compilation)
