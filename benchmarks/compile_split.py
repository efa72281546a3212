"""Where an attack program's compile seconds go: the network, or the attack's own logic.

  python -m benchmarks.compile_split --out=benchmarks/results/compile_split_cpu.json

Each attack program of the AutoAttack report (APGD, FAB-T, Square, the verdict) is compiled
for the full-width ResNet-18 and for a linear model with the same inputs and outputs: the
second compiles the attack's own logic (losses, steps, projections, bookkeeping) with almost
no network. Beside them: the network's input gradient and forward pass compiled alone. Every
program is compiled at --repeats batch sizes from --batch up (a new size compiles afresh; the
persistent cache is off), and the seconds of each are listed.

Then what a loop driven from the host would pay per call: --steps signed gradient steps as one
compiled loop against one compiled gradient called --steps times, and the per-call
preparation of the kernels that the compiled loop hoists (XLA's backward convolutions take
every kernel reversed and transposed: `prepare_seconds`, the same work as one program).
"""
import importlib
import os
import time

from absl import app
from absl import flags

from benchmarks import common

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch", 8, "The first batch size compiled (then +1, +2, ...).")
flags.DEFINE_integer("repeats", 3, "Batch sizes compiled per program.")
flags.DEFINE_integer("steps", 10, "Gradient steps of the host-loop comparison.")
flags.DEFINE_enum("threefry", "unrolled", ["unrolled", "rolled"], "JAX's threefry lowering on "
                  "the CPU: unrolled as the commands compile it "
                  "(compilation.use_unrolled_threefry_on_cpu), or jax's default loop.")
flags.DEFINE_string("out", "", "Write the results as JSON here.")


def attack_programs(pm, x, y, keys):
  """{name: lower()} of each attack program of the report, at this batch."""
  apgd = importlib.import_module("cas_jax.attacks.apgd")
  fab = importlib.import_module("cas_jax.attacks.fab")
  square = importlib.import_module("cas_jax.attacks.square")
  from cas_jax.attacks import verdicts  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  n = x.shape[0]
  return {
      "apgd_round": lambda: apgd.apgd_round.jitted.lower(
          pm, x, y, keys, 0.03, steps=10, loss=apgd.APGD_LOSSES, loss_index=2, rank=2),
      "fab_round": lambda: fab.fab_round.jitted.lower(pm, x, y, keys, 0.03, steps=10, rank=2),
      "_square_chunk": lambda: square._square_chunk.jitted.lower(  # pylint: disable=protected-access
          pm, x, y, keys, x, jnp.zeros(n), jnp.asarray(True), 0, 10, 0.03, total_queries=200,
          p_init=0.8, rescale_schedule=False, norm="linf"),
      "correct": lambda: verdicts.correct.lower(pm, x, y),
  }


def log_likelihood(y):
  """(model_fn, images) -> the summed log-likelihood of labels y: the loss both parts differentiate."""
  import jax  # pylint: disable=g-import-not-at-top
  from cas_jax.attacks import engine  # pylint: disable=g-import-not-at-top
  return lambda pm, z: jax.numpy.sum(jax.nn.log_softmax(engine.main_logits(pm, z))
                                     * jax.nn.one_hot(y, 10))


def network_programs(pm, x, y):
  """{name: lower()} of the network's input gradient and forward pass alone."""
  import jax  # pylint: disable=g-import-not-at-top
  from cas_jax.attacks import engine  # pylint: disable=g-import-not-at-top
  return {"network_gradient": lambda: jax.jit(jax.grad(log_likelihood(y), 1)).lower(pm, x),
          "network_forward": lambda: jax.jit(engine.main_logits).lower(pm, x)}


def compile_seconds(models) -> dict:
  """{program model: [seconds per batch size]}."""
  import jax  # pylint: disable=g-import-not-at-top
  seconds = {}
  for n in range(FLAGS.batch, FLAGS.batch + FLAGS.repeats):
    x = jax.random.uniform(jax.random.key(1), (n, 32, 32, 3))
    y = jax.numpy.arange(n, dtype=jax.numpy.int32) % 10
    keys = jax.random.split(jax.random.key(0), n)
    for model_name, pm in models.items():
      programs = attack_programs(pm, x, y, keys)
      if model_name == "resnet18":
        programs.update(network_programs(pm, x, y))
      for name, lower in programs.items():
        lowered = lower()
        start = time.perf_counter()
        lowered.compile()
        seconds.setdefault(f"{name} {model_name}", []).append(
            round(time.perf_counter() - start, 3))
  return seconds


def host_loop(pm) -> dict:
  """Seconds of --steps gradient steps: one compiled loop, a compiled gradient called from the
  host, and the kernels' preparation alone (what the loop hoists out of its steps)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  n = FLAGS.batch
  x = jax.random.uniform(jax.random.key(1), (n, 32, 32, 3))
  y = jnp.arange(n, dtype=jnp.int32) % 10
  grad = jax.jit(jax.grad(log_likelihood(y), 1))
  step = jax.jit(lambda z, g: jnp.clip(jnp.clip(z + 0.003 * jnp.sign(g), x - 0.03, x + 0.03),
                                       0, 1))
  looped = jax.jit(lambda pm, z: jax.lax.fori_loop(
      0, FLAGS.steps, lambda i, a: step(a, grad(pm, a)), z))

  def from_host(pm, z):
    for _ in range(FLAGS.steps):
      z = step(z, grad(pm, z))
    return z
  kernels = [leaf for leaf in jax.tree.leaves(pm) if getattr(leaf, "ndim", 0) == 4]
  prepare = jax.jit(lambda ks: [jnp.flip(k, (0, 1)).swapaxes(2, 3) for k in ks])
  timed = {"compiled_loop": lambda: looped(pm, x), "host_loop": lambda: from_host(pm, x),
           "prepare": lambda: prepare(kernels)}
  best = {}
  for _ in range(5):
    for name, run in timed.items():
      jax.block_until_ready(run())  # the first round compiles and warms up
      start = time.perf_counter()
      jax.block_until_ready(run())
      best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
  return {"batch": n, "steps": FLAGS.steps, "kernel_weights": sum(k.size for k in kernels),
          "compiled_loop_seconds": round(best["compiled_loop"], 4),
          "host_loop_seconds": round(best["host_loop"], 4),
          "prepare_seconds": round(best["prepare"], 4)}


def main(_):
  """Compile every program for both models, time the loops, print (and write) the JSON."""
  from cas_jax import cli  # pylint: disable=g-import-not-at-top
  cli.use_eigen_cpu_convolutions()  # as the commands run XLA:CPU's convolutions
  import jax  # pylint: disable=g-import-not-at-top
  from jax.tree_util import Partial  # pylint: disable=g-import-not-at-top
  from cas_jax import models  # pylint: disable=g-import-not-at-top
  from cas_jax.attacks import engine  # pylint: disable=g-import-not-at-top
  from cas_jax.evaluation import evaluate  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_enable_compilation_cache", False)
  if FLAGS.threefry == "unrolled":
    from cas_jax import compilation  # pylint: disable=g-import-not-at-top
    compilation.use_unrolled_threefry_on_cpu()
  network = models.create("resnet18", cas_stages=())
  variables = jax.jit(lambda: network.init(jax.random.key(0), jax.numpy.zeros((1, 32, 32, 3)),
                                           train=False))()
  linear = lambda w, z: (z.reshape(z.shape[0], -1) @ w, ())
  pms = {"resnet18": engine.as_partial(evaluate.bind_model(network, variables)),
         "linear": engine.as_partial(Partial(linear, jax.numpy.zeros((32 * 32 * 3, 10))))}
  seconds = compile_seconds(pms)
  result = {"jax": jax.__version__, "cpu_count": os.cpu_count(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "threefry": FLAGS.threefry,
            "compile_seconds": seconds,
            "median_seconds": {k: sorted(v)[len(v) // 2] for k, v in seconds.items()},
            "host_loop": host_loop(pms["resnet18"])}
  common.report(result, FLAGS.out)


if __name__ == "__main__":
  app.run(main)
