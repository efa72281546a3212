"""Run by test_train.py under XLA_FLAGS=--xla_force_host_platform_device_count=N.

Trains data-parallel steps (global batch sharded over all devices, state replicated) and
saves parameters, BatchNorm statistics and losses to an .npz whose path it prints: three
natural-training steps, and one TRADES+CAS step with batch-statistics adversaries. (Only
one attacked step: PGD's sign() turns float rounding differences between device counts
into different pixels, so longer attacked runs drift apart legitimately.)
"""
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from cas_jax import input_pipeline
from cas_jax.training import train
from tests import fake_devices
from tests import test_train


def run(config, num_steps):
  """num_steps sharded train steps from the same initial state; flat results."""
  mesh = input_pipeline.data_mesh()
  replicated = NamedSharding(mesh, P())
  state = jax.device_put(test_train.init_state(config), replicated)
  step = jax.jit(lambda s, b, k: train.train_step(s, b, k, config=config), donate_argnums=(0,),
                 out_shardings=(replicated, replicated))
  metrics = []
  for i in range(num_steps):
    host_batch = jax.tree.map(np.asarray, test_train.random_batch(config, seed=i))
    batch = input_pipeline.to_global_array(host_batch, mesh)
    assert len(batch["image"].sharding.device_set) == jax.device_count()
    state, m = step(state, batch, jax.random.PRNGKey(7))
    metrics.append(m["train_loss"])
  state = jax.device_get(state)
  flat = {"/".join(str(k) for k in path): np.asarray(v) for path, v in
          jax.tree_util.tree_flatten_with_path({"params": state.params,
                                                "batch_stats": state.batch_stats})[0]}
  flat["loss"] = np.asarray(jax.device_get(metrics))
  return flat


def main():
  """Natural and TRADES+CAS (two training-mode passes, batch-stat attack) runs; write them."""
  flat = {"natural/" + k: v for k, v in run(test_train.tiny_config("natural"), 3).items()}
  config = test_train.tiny_config("trades")
  config.attack.batch_norm = "batch"
  flat.update({"trades/" + k: v for k, v in run(config, 1).items()})
  fake_devices.save_arrays(flat)


if __name__ == "__main__":
  main()
