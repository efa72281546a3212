"""Seconds of one attack step on a full-width ResNet-18: XLA:CPU (ours) against PyTorch.

  python -m benchmarks.full_width_step --side=torch --batch=8
  XLA_FLAGS=--xla_cpu_use_xnnpack=true python -m benchmarks.full_width_step --side=jax --batch=8

One step is what APGD and PGD do per iteration (the input gradient of the summed cross-entropy,
then a signed step), five of them inside one compiled loop on our side; a forward pass is what
Square does per query. Random weights and images: the seconds do not depend on them. Prints one
JSON line with the side, the batch, XLA_FLAGS or torch's threads, and the seconds.
"""
import json
import os
import time

from absl import app
from absl import flags
import numpy as np

FLAGS = flags.FLAGS
flags.DEFINE_enum("side", "jax", ["jax", "torch"], "Our network under XLA, or RobustBench's "
                  "ResNet18 under PyTorch.")
flags.DEFINE_integer("batch", 32, "Images per step.")
flags.DEFINE_integer("steps", 5, "Steps timed (after one that compiles or warms up).")
flags.DEFINE_integer("torch_threads", 0, "torch.set_num_threads (0: torch's default).")
flags.DEFINE_enum("weights", "arguments", ["arguments", "constants"], "jax: the weights as "
                  "arguments of the compiled program (as our attacks pass them) or folded into "
                  "it as constants.")


def time_jax(x, y) -> dict:
  """Compile seconds, then seconds per gradient step (in a fori_loop) and per forward pass."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from cas_jax import models  # pylint: disable=g-import-not-at-top
  model = models.create("resnet18", cas_stages=())
  variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, *x.shape[1:])), train=False))(
      jax.random.key(0))
  logits = lambda v, images: model.apply(v, images, train=False)[0]
  if FLAGS.weights == "constants":
    logits = lambda v, images, bound=variables: model.apply(bound, images, train=False)[0]
  loss = lambda v, images: -jnp.sum(
      jax.nn.log_softmax(logits(v, images))[jnp.arange(len(y)), y])
  steps = jax.jit(lambda v, images: jax.lax.fori_loop(
      0, FLAGS.steps, lambda i, a: a + 1e-3 * jnp.sign(jax.grad(loss, 1)(v, a)), images))
  start = time.perf_counter()
  steps(variables, x).block_until_ready()
  compiled = time.perf_counter() - start
  start = time.perf_counter()
  steps(variables, x).block_until_ready()
  step = (time.perf_counter() - start) / FLAGS.steps
  forward = jax.jit(logits)
  forward(variables, x).block_until_ready()
  start = time.perf_counter()
  for _ in range(FLAGS.steps):
    forward(variables, x).block_until_ready()
  return {"xla_flags": os.environ.get("XLA_FLAGS", ""), "jax": jax.__version__,
          "weights": FLAGS.weights,
          "compile_seconds": round(compiled, 2), "gradient_step_seconds": round(step, 4),
          "forward_seconds": round((time.perf_counter() - start) / FLAGS.steps, 4)}


def time_torch(x, y) -> dict:
  """Seconds per gradient step and per forward pass of RobustBench's ResNet18."""
  import torch  # pylint: disable=g-import-not-at-top
  from tests.test_zoo import robustbench_architecture  # pylint: disable=g-import-not-at-top
  if FLAGS.torch_threads:
    torch.set_num_threads(FLAGS.torch_threads)
  net = robustbench_architecture("resnet").ResNet18().eval()
  images = torch.tensor(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  labels = torch.tensor(y)

  def step(a):
    a = a.clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(net(a), labels, reduction="sum")
    return (a + 1e-3 * torch.autograd.grad(loss, a)[0].sign()).detach()

  a = step(images)
  start = time.perf_counter()
  for _ in range(FLAGS.steps):
    a = step(a)
  gradient_step = (time.perf_counter() - start) / FLAGS.steps
  with torch.no_grad():
    net(images)
    start = time.perf_counter()
    for _ in range(FLAGS.steps):
      net(images)
  return {"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
          "gradient_step_seconds": round(gradient_step, 4),
          "forward_seconds": round((time.perf_counter() - start) / FLAGS.steps, 4)}


def main(_):
  """Time one side and print its JSON line."""
  x = np.random.default_rng(0).random((FLAGS.batch, 32, 32, 3), dtype=np.float32)
  y = np.arange(FLAGS.batch) % 10
  timed = time_jax(x, y) if FLAGS.side == "jax" else time_torch(x, y)
  print(json.dumps({"side": FLAGS.side, "batch": FLAGS.batch, "cpu_count": os.cpu_count(),
                    **timed}))


if __name__ == "__main__":
  app.run(main)
