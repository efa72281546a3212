"""The checkpoint manager keeps the latest and the best checkpoint, also across restarts, and
skips (and renames) a newest checkpoint that cannot be restored."""
import glob
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import struct

from cas_jax import checkpointing


@struct.dataclass
class State:
  step: jax.Array
  weights: jax.Array


def state_at(step, size=3):
  return State(jnp.int32(step), jnp.full((size,), float(step)))


def test_keeps_two_latest_and_best_across_managers(tmp_path):
  manager = checkpointing.create_manager(str(tmp_path), async_save=False)
  for step, acc in [(1, 0.3), (2, 0.5), (3, 0.4), (4, 0.2)]:
    checkpointing.save(manager, state_at(step), {"pgd_acc": acc, "natural_acc": 0.9})
  assert manager.all_steps() == [2, 3, 4] and checkpointing.best_step(manager) == 2
  # A new process (a rerun of the same command) sees the same metrics and keeps the best.
  again = checkpointing.create_manager(str(tmp_path), async_save=False)
  assert checkpointing.best_step(again) == 2
  checkpointing.save(again, state_at(5))  # e.g. saved on SIGTERM, without metrics
  checkpointing.save(again, state_at(6), {"pgd_acc": 0.1})
  assert again.all_steps() == [2, 5, 6]
  restored = checkpointing.restore_or_init(again, state_at(0))
  assert int(restored.step) == 6
  best = checkpointing.restore(again, state_at(0), step=checkpointing.best_step(again))
  np.testing.assert_array_equal(best.weights, np.full((3,), 2.0))


def test_restore_or_init_without_checkpoints_returns_the_state(tmp_path):
  manager = checkpointing.create_manager(str(tmp_path), async_save=False)
  state = state_at(0)
  assert checkpointing.restore_or_init(manager, state) is state
  assert checkpointing.best_step(manager) is None


def truncate_data_files(step_dir):
  files = [f for f in glob.glob(os.path.join(step_dir, "**", "d", "*"), recursive=True)
           if os.path.isfile(f) and os.path.getsize(f) > 0]
  assert files
  for path in files:
    os.truncate(path, os.path.getsize(path) // 2)


def remove_metadata(step_dir):
  os.remove(os.path.join(step_dir, "default", "_METADATA"))


@pytest.mark.parametrize("damage", [truncate_data_files, remove_metadata])
def test_unrestorable_newest_checkpoint_is_skipped_and_renamed(tmp_path, caplog, damage):
  manager = checkpointing.create_manager(str(tmp_path), async_save=False)
  for step in (1, 2, 3):
    checkpointing.save(manager, state_at(step))
  step_dir = os.path.join(tmp_path, "checkpoints", "3")
  damage(step_dir)
  files_before = sorted(os.path.relpath(f, step_dir) for f in glob.glob(f"{step_dir}/**",
                                                                         recursive=True))
  again = checkpointing.create_manager(str(tmp_path), async_save=False)
  with caplog.at_level(logging.WARNING):
    restored = checkpointing.restore_or_init(again, state_at(0))
  assert int(restored.step) == 2
  np.testing.assert_array_equal(restored.weights, np.full((3,), 2.0))
  kept = step_dir + checkpointing.UNRESTORABLE_SUFFIX
  assert not os.path.exists(step_dir) and os.path.isdir(kept)  # renamed, nothing deleted
  assert sorted(os.path.relpath(f, kept) for f in glob.glob(f"{kept}/**",
                                                            recursive=True)) == files_before
  reports = [r.getMessage() for r in caplog.records if "cannot be restored" in r.getMessage()]
  assert len(reports) == 1 and "\n" not in reports[0] and "step 3" in reports[0]
  assert again.all_steps() == [2]
  # Training goes on: the next save at step 3 does not collide with the renamed folder.
  checkpointing.save(again, state_at(3))
  assert checkpointing.create_manager(str(tmp_path)).all_steps() == [2, 3]


def test_no_restorable_checkpoint_is_an_error_and_renames_nothing(tmp_path):
  manager = checkpointing.create_manager(str(tmp_path), async_save=False)
  checkpointing.save(manager, state_at(1, size=3))
  with pytest.raises(ValueError, match="is whole but does not fit this config's train state"):
    checkpointing.restore_or_init(manager, state_at(0, size=5))  # e.g. another width
  assert manager.all_steps() == [1]
  assert os.listdir(os.path.join(tmp_path, "checkpoints")) == ["1"]


def test_restore_variables_reads_params_and_batch_stats_and_checks_shapes(tmp_path):
  params = {"dense": {"kernel": jnp.arange(6.0).reshape(2, 3), "bias": jnp.ones(3)}}
  saved = {"params": params, "batch_stats": {"bn": {"mean": jnp.full(3, 0.5)}},
           "opt_state": {"trace": params}, "step": jnp.int32(7)}
  manager = checkpointing.create_manager(str(tmp_path), async_save=False)
  manager.save(7, args=ocp.args.StandardSave(saved))
  manager.wait_until_finished()
  template = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                                    {"params": params, "batch_stats": saved["batch_stats"]})
  step, variables = checkpointing.restore_variables(str(tmp_path), template)
  assert step == 7 and set(variables) == {"params", "batch_stats"}
  np.testing.assert_array_equal(variables["params"]["dense"]["kernel"], np.arange(6).reshape(2, 3))
  np.testing.assert_array_equal(variables["batch_stats"]["bn"]["mean"], np.full(3, 0.5))
  wider = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape[:-1] + (4,), s.dtype),
                                 template)
  with pytest.raises(ValueError, match=r"params/dense/bias: saved \(3,\), the network has \(4,\)"):
    checkpointing.restore_variables(str(tmp_path), wider)
  fewer = {"params": {"dense": {"kernel": template["params"]["dense"]["kernel"]}},
           "batch_stats": template["batch_stats"]}
  with pytest.raises(ValueError, match="params/dense/bias: only in the checkpoint"):
    checkpointing.restore_variables(str(tmp_path), fewer)
  with pytest.raises(FileNotFoundError, match="no best checkpoint"):
    checkpointing.restore_variables(str(tmp_path), template, "best")
  with pytest.raises(FileNotFoundError, match="train first"):
    checkpointing.restore_variables(str(tmp_path / "none"), template)
  assert not os.path.exists(tmp_path / "none")


def test_metrics_added_after_the_save_rank_the_checkpoint_across_managers(tmp_path):
  manager = checkpointing.create_manager(str(tmp_path), async_save=False)
  checkpointing.save(manager, state_at(1), {"pgd_acc": 0.3})
  checkpointing.save(manager, state_at(2))  # saved on a stop, before its evaluation
  assert checkpointing.best_step(manager) == 1
  checkpointing.add_metrics(manager, 2, {"pgd_acc": 0.5, "natural_acc": 0.8})
  assert checkpointing.best_step(manager) == 2
  again = checkpointing.create_manager(str(tmp_path), async_save=False)
  assert again.metrics(2) == {"pgd_acc": 0.5, "natural_acc": 0.8}
  assert checkpointing.best_step(again) == 2
  np.testing.assert_array_equal(checkpointing.restore(again, state_at(0), 2).weights,
                                np.full((3,), 2.0))  # the arrays are untouched


class TransientError(OSError):
  pass


@pytest.mark.parametrize("failure", [
    MemoryError("out of memory while restoring"),
    ValueError("RESOURCE_EXHAUSTED: Out of memory allocating 4 GiB"),
    ValueError("UNAVAILABLE: Error reading local file: Input/output error"),
    TransientError(5, "Input/output error"),
])
def test_a_restore_failing_without_damage_stops_with_its_cause_and_renames_nothing(
    tmp_path, monkeypatch, failure):
  manager = checkpointing.create_manager(str(tmp_path), async_save=False)
  for step in (1, 2):
    checkpointing.save(manager, state_at(step))
  restore = checkpointing.restore

  def fail_on_the_newest(manager, state, step=None):
    if step == 2:
      raise failure
    return restore(manager, state, step)

  monkeypatch.setattr(checkpointing, "restore", fail_on_the_newest)
  with pytest.raises(checkpointing.RestoreError, match="step 2 .* could not be read") as raised:
    checkpointing.restore_or_init(checkpointing.create_manager(str(tmp_path)), state_at(0))
  assert raised.value.__cause__ is failure
  assert sorted(os.listdir(os.path.join(tmp_path, "checkpoints"))) == ["1", "2"]


def test_hosts_that_disagree_on_damage_stop_and_rename_nothing(tmp_path, monkeypatch):
  manager = checkpointing.create_manager(str(tmp_path), async_save=False)
  for step in (1, 2):
    checkpointing.save(manager, state_at(step))
  remove_metadata(os.path.join(tmp_path, "checkpoints", "2"))  # damaged on this host only
  # The hosts see the same steps (a list) but not the same verdict on step 2 (a bool).
  monkeypatch.setattr(checkpointing, "_hosts_agree", lambda value: isinstance(value, list))
  with pytest.raises(checkpointing.RestoreError, match="the hosts disagree on whether it is"):
    checkpointing.restore_or_init(checkpointing.create_manager(str(tmp_path)), state_at(0))
  assert sorted(os.listdir(os.path.join(tmp_path, "checkpoints"))) == ["1", "2"]
  monkeypatch.setattr(checkpointing, "_hosts_agree", lambda value: False)
  with pytest.raises(checkpointing.RestoreError, match="the hosts see different checkpoints"):
    checkpointing.restore_or_init(checkpointing.create_manager(str(tmp_path)), state_at(0))
  assert sorted(os.listdir(os.path.join(tmp_path, "checkpoints"))) == ["1", "2"]


def test_restore_variables_tells_an_io_failure_from_a_network_that_does_not_fit(
    tmp_path, monkeypatch):
  manager = checkpointing.create_manager(str(tmp_path), async_save=False)
  manager.save(7, args=ocp.args.StandardSave({"params": {"w": jnp.ones(3)},
                                              "batch_stats": {"m": jnp.ones(3)}}))
  manager.wait_until_finished()
  template = {"params": {"w": jax.ShapeDtypeStruct((3,), jnp.float32)},
              "batch_stats": {"m": jax.ShapeDtypeStruct((3,), jnp.float32)}}

  def unavailable(self, step, args=None):
    raise ValueError("UNAVAILABLE: Error reading local file: Input/output error")

  monkeypatch.setattr(ocp.CheckpointManager, "restore", unavailable)
  with pytest.raises(checkpointing.RestoreError, match="step 7 .* could not be read"):
    checkpointing.restore_variables(str(tmp_path), template)
