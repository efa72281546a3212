"""The checkpoint manager keeps the latest and the best checkpoint, also across restarts."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from cas_jax import checkpointing


@struct.dataclass
class State:
  step: jax.Array
  weights: jax.Array


def state_at(step):
  return State(jnp.int32(step), jnp.full((3,), float(step)))


def test_keeps_latest_and_best_across_managers(tmp_path):
  manager = checkpointing.create_manager(str(tmp_path), async_save=False)
  for step, acc in [(1, 0.3), (2, 0.5), (3, 0.4), (4, 0.2)]:
    checkpointing.save(manager, state_at(step), {"pgd_acc": acc, "natural_acc": 0.9})
  assert manager.all_steps() == [2, 4] and checkpointing.best_step(manager) == 2
  # A new process (a rerun of the same command) sees the same metrics and keeps the best.
  again = checkpointing.create_manager(str(tmp_path), async_save=False)
  assert checkpointing.best_step(again) == 2
  checkpointing.save(again, state_at(5))  # e.g. saved on Ctrl-C, without metrics
  checkpointing.save(again, state_at(6), {"pgd_acc": 0.1})
  assert again.all_steps() == [2, 6]
  restored = checkpointing.restore_or_init(again, state_at(0))
  assert int(restored.step) == 6
  best = checkpointing.restore(again, state_at(0), step=checkpointing.best_step(again))
  np.testing.assert_array_equal(best.weights, np.full((3,), 2.0))


def test_restore_or_init_without_checkpoints_returns_the_state(tmp_path):
  manager = checkpointing.create_manager(str(tmp_path), async_save=False)
  state = state_at(0)
  assert checkpointing.restore_or_init(manager, state) is state
  assert checkpointing.best_step(manager) is None
