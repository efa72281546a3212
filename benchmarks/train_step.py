"""Compile time and steady-state throughput of `train_step` for any config; prints and writes JSON.

  python -m benchmarks.train_step --config=configs/cifar10_at_cas.py --steps=20 --out=bench.json
  python -m benchmarks.train_step --config=configs/smoke.py --config.batch_size=64
"""
import time

from absl import app
from absl import flags
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import config_flags

from benchmarks import common
from cas_jax import input_pipeline
from cas_jax.training import train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "A config file from configs/.")
flags.DEFINE_integer("steps", 10, "Timed steps after the compile step.")
flags.DEFINE_string("out", "", "Write the results as JSON here.")
flags.mark_flags_as_required(["config"])


def main(_):
  """Time one compile and FLAGS.steps steady-state training steps on random images."""
  config = FLAGS.config
  train.validate_config(config)
  mesh = input_pipeline.data_mesh()
  data_sharding, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  size, batch = config.data.image_size, config.batch_size
  model = train.create_model(config, config.data.num_classes)
  state = train.create_train_state(0, model, config, 100, (size, size, 3))
  state = jax.device_put(state, replicated)
  rng = np.random.default_rng(0)
  batch_arrays = jax.device_put({
      "image": rng.random((batch, size, size, 3), dtype=np.float32),
      "label": rng.integers(0, config.data.num_classes, batch).astype(np.int32)}, data_sharding)
  step_fn = jax.jit(lambda s, b, k: train.train_step(s, b, k, config=config),
                    donate_argnums=(0,), out_shardings=(replicated, replicated))
  key = jax.random.PRNGKey(1)

  start = time.perf_counter()
  state, metrics = step_fn(state, batch_arrays, key)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - start

  start = time.perf_counter()
  for _ in range(FLAGS.steps):
    state, metrics = step_fn(state, batch_arrays, key)
  jax.block_until_ready((state, metrics))
  step_s = (time.perf_counter() - start) / FLAGS.steps

  result = {**common.setup(config, batch), "objective": config.loss.objective,
            "attack_steps": config.attack.steps if config.loss.objective != "natural" else 0,
            "compile_and_first_step_s": compile_s, "step_s": step_s,
            "images_per_s": batch / step_s}
  common.report(result, FLAGS.out)

if __name__ == "__main__":
  app.run(main)
