"""Damage is found by checksum, never guessed: the fault matrix of a newest checkpoint, of the
evaluation's resume state and of the experiments' evaluation cache."""
import glob
import json
import logging
import os
import shutil

import chex
import jax
import numpy as np
import pytest

from cas_jax import checkpointing
from cas_jax import integrity
from cas_jax.attacks import cascade
from cas_jax.training import train
from test_cascade import _toy_data, _toy_unit
from test_checkpointing import state_at, truncate_data_files
from test_fault_tolerance import SMALL, final_variables, read_rows, run_main_in_process
from test_fault_tolerance import small_config, train_rows


def _files(step_dir):
  return [f for f in glob.glob(os.path.join(step_dir, "**"), recursive=True)
          if os.path.isfile(f) and os.path.basename(f) != integrity.MANIFEST]


def _largest(step_dir):
  return max(_files(step_dir), key=os.path.getsize)


def truncate_largest(step_dir):
  path = _largest(step_dir)
  os.truncate(path, os.path.getsize(path) // 2)
  return os.path.relpath(path, step_dir)


def truncate_metadata(step_dir):
  path = os.path.join(step_dir, "default", "_METADATA")
  os.truncate(path, os.path.getsize(path) // 2)
  return os.path.relpath(path, step_dir)


def delete_largest(step_dir):
  path = _largest(step_dir)
  os.remove(path)
  return os.path.relpath(path, step_dir)


def empty_largest(step_dir):
  path = _largest(step_dir)
  os.truncate(path, 0)
  return os.path.relpath(path, step_dir)


def flip_bytes(step_dir):
  """64 bytes inverted in the middle of the largest file; its size unchanged."""
  path = _largest(step_dir)
  with open(path, "r+b") as f:
    data = bytearray(f.read())
    middle = max(0, len(data) // 2 - 32)
    data[middle:middle + 64] = bytes(255 - b for b in data[middle:middle + 64])
    f.seek(0)
    f.write(data)
  return os.path.relpath(path, step_dir)


def add_unknown_file(step_dir):
  path = os.path.join(step_dir, "default", "stray.bin")
  with open(path, "wb") as f:
    f.write(b"not saved with the checkpoint")
  return os.path.relpath(path, step_dir)


FAULTS = [truncate_largest, truncate_metadata, delete_largest, empty_largest, flip_bytes,
          add_unknown_file]


def _saved(tmp_path, steps=(1, 2, 3), async_save=False):
  manager = checkpointing.create_manager(str(tmp_path), async_save=async_save)
  for step in steps:
    checkpointing.save(manager, state_at(step))
  checkpointing.wait_until_finished(manager)
  return os.path.join(tmp_path, "checkpoints")


@pytest.mark.parametrize("async_save", [False, True])
def test_every_committed_save_has_a_manifest_that_verifies(tmp_path, async_save):
  directory = _saved(tmp_path, async_save=async_save)
  for step in ("2", "3"):
    assert integrity.check_manifest(os.path.join(directory, step)) == ("verified", None)
  manager = checkpointing.create_manager(str(tmp_path), async_save=False)
  checkpointing.add_metrics(manager, 3, {"pgd_acc": 0.5})  # rewritten with the metrics file
  assert integrity.check_manifest(os.path.join(directory, "3")).status == "verified"
  with open(os.path.join(directory, "3", integrity.MANIFEST)) as f:
    assert any(name.startswith("metrics") for name in json.load(f)["files"])


@pytest.mark.parametrize("fault", FAULTS, ids=lambda f: f.__name__)
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_previous_restores(
    tmp_path, caplog, fault):
  directory = _saved(tmp_path)
  damaged_file = fault(os.path.join(directory, "3"))
  manager = checkpointing.create_manager(str(tmp_path), async_save=False)
  with caplog.at_level(logging.WARNING):
    restored, verified = checkpointing.restore_newest(manager, state_at(0))
  assert int(restored.step) == 2 and verified
  np.testing.assert_array_equal(restored.weights, np.full((3,), 2.0))
  assert sorted(os.listdir(directory)) == ["2", "3" + checkpointing.UNRESTORABLE_SUFFIX]
  warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING
              and "cannot be restored" in r.getMessage()]
  assert len(warnings) == 1 and "\n" not in warnings[0]
  assert "step 3" in warnings[0] and damaged_file in warnings[0], warnings


def test_a_read_failure_after_verification_stops_in_one_line_and_renames_nothing(
    tmp_path, monkeypatch):
  directory = _saved(tmp_path)
  verified = []
  check = integrity.check_manifest
  monkeypatch.setattr(integrity, "check_manifest",
                      lambda folder: verified.append(folder) or check(folder))

  def unreadable(manager, state, step=None):
    raise OSError(5, "Input/output error")

  monkeypatch.setattr(checkpointing, "restore", unreadable)
  manager = checkpointing.create_manager(str(tmp_path), async_save=False)
  with pytest.raises(checkpointing.RestoreError, match=r"step 3 .* could not be read "
                     r"\(OSError: .*\); its files verify") as raised:
    checkpointing.restore_or_init(manager, state_at(0))
  assert verified and "\n" not in str(raised.value)
  assert sorted(os.listdir(directory)) == ["2", "3"]  # the two latest, as saved


def test_every_checkpoint_damaged_is_one_line_and_nothing_is_deleted(tmp_path):
  directory = _saved(tmp_path)
  before = sorted(os.listdir(directory))
  for step in before:
    flip_bytes(os.path.join(directory, step))
  with pytest.raises(checkpointing.errors.UserError, match="every checkpoint .* is damaged") as e:
    checkpointing.restore_or_init(checkpointing.create_manager(str(tmp_path)), state_at(0))
  assert "\n" not in str(e.value) and sorted(os.listdir(directory)) == before


def test_a_checkpoint_without_a_manifest_restores_unverified_and_says_so(tmp_path, caplog):
  directory = _saved(tmp_path)
  os.remove(os.path.join(directory, "3", integrity.MANIFEST))  # as saved before manifests
  with caplog.at_level(logging.WARNING):
    restored, verified = checkpointing.restore_newest(
        checkpointing.create_manager(str(tmp_path)), state_at(0))
  assert int(restored.step) == 3 and not verified
  assert sum("has no integrity manifest" in r.getMessage() for r in caplog.records) == 1
  truncate_data_files(os.path.join(directory, "3"))  # unverifiable damage: stop, rename nothing
  with pytest.raises(checkpointing.RestoreError, match="no integrity manifest"):
    checkpointing.restore_or_init(checkpointing.create_manager(str(tmp_path)), state_at(0))
  assert "3" in os.listdir(directory)


# --------------------------------------------------------------------- through training


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory):
  """A 3-epoch run, and a 2-epoch run (its newest checkpoint to damage) of the same config."""
  root = tmp_path_factory.mktemp("integrity")
  train.train_and_evaluate(small_config(), str(root / "reference"))
  train.train_and_evaluate(small_config(**{"schedule.num_epochs": 2}), str(root / "two"))
  return root


@pytest.mark.slow
@pytest.mark.parametrize("fault", [flip_bytes, truncate_largest, delete_largest],
                         ids=lambda f: f.__name__)
def test_training_resumes_before_a_damaged_checkpoint_and_ends_as_if_it_never_was(
    trained_runs, tmp_path, fault):
  workdir = tmp_path / "run"
  shutil.copytree(trained_runs / "two", workdir)
  directory = workdir / "checkpoints"
  newest = max(int(s) for s in os.listdir(directory) if s.isdigit())
  fault(str(directory / str(newest)))
  state = train.train_and_evaluate(small_config(), str(workdir))
  assert f"{newest}{checkpointing.UNRESTORABLE_SUFFIX}" in os.listdir(directory)
  assert int(state.step) == 12
  chex.assert_trees_all_equal(final_variables(workdir), final_variables(trained_runs / "reference"))
  ours, reference = train_rows(read_rows(workdir)), train_rows(read_rows(trained_runs / "reference"))
  assert ours == reference


@pytest.mark.slow
def test_main_reports_a_read_failure_of_a_verified_checkpoint_in_one_line(
    trained_runs, tmp_path, monkeypatch):
  workdir = tmp_path / "run"
  shutil.copytree(trained_runs / "two", workdir)
  before = sorted(os.listdir(workdir / "checkpoints"))

  def permission_denied(manager, state, step=None):
    raise PermissionError(13, "Permission denied")

  monkeypatch.setattr(checkpointing, "restore", permission_denied)
  with pytest.raises(SystemExit, match=r"^error: checkpoint step 8 .* could not be read "
                     r"\(PermissionError: .*Permission denied\); its files verify") as raised:
    run_main_in_process(monkeypatch, workdir, **SMALL)
  assert "\n" not in str(raised.value.code)
  assert sorted(os.listdir(workdir / "checkpoints")) == before


# ------------------------------------------------------- evaluation state and cache


def _interrupted_state(tmp_path):
  """A cascade state file saved after step a, with step b interrupted."""
  n = 16
  x, y, keys = _toy_data(n)
  path = str(tmp_path / "state.npz")
  every = {"m": np.ones(n, bool)}
  steps = lambda seen, fail: [cascade.Step(_toy_unit("a", [0, 3], seen["a"]), ("m",)),
                              cascade.Step(_toy_unit("b", [1], seen["b"], fail), ("m",))]
  with pytest.raises(RuntimeError, match="simulated"):
    cascade.run(steps({"a": [], "b": []}, 1), x, y, keys, eligible=every, batch_size=8,
                state_path=path, fingerprint={"run": 1}, save_every=0)
  return path, lambda seen: cascade.run(steps(seen, None), x, y, keys, eligible=every,
                                        batch_size=8, state_path=path, fingerprint={"run": 1})


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_evaluation_state_is_kept_aside_and_the_work_starts_afresh(
    tmp_path, caplog, damage):
  path, rerun = _interrupted_state(tmp_path)
  size = os.path.getsize(path)
  if damage == "truncate":
    os.truncate(path, size // 2)
  else:  # the last attacked mask's bytes, which the zip format does not check on its own
    with open(path, "r+b") as f:
      data = bytearray(f.read())
      data[size // 3] ^= 0xFF
      f.seek(0)
      f.write(data)
  seen = {"a": [], "b": []}
  with caplog.at_level(logging.WARNING):
    result = rerun(seen)
  assert len(np.concatenate(seen["a"])) == 16  # all attacked again, nothing used silently
  assert result.broken["m"].sum() == 3
  kept = [f for f in os.listdir(tmp_path) if f.startswith("state.npz.damaged-")]
  assert len(kept) == 1
  lines = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
  assert len(lines) == 1 and "evaluation state" in lines[0]


def test_an_intact_evaluation_state_still_resumes(tmp_path):
  _, rerun = _interrupted_state(tmp_path)
  seen = {"a": [], "b": []}
  rerun(seen)
  assert not seen["a"]


@pytest.mark.parametrize("damage", ["truncate", "edit"])
def test_a_damaged_evaluation_cache_is_kept_aside(tmp_path, caplog, damage):
  path = str(tmp_path / "cache.json")
  with open(path, "w") as f:
    json.dump(integrity.seal_json({"request": {"eps": 8}, "reports": {"last": {"acc": 0.5}}}), f)
  assert integrity.load_sealed_json(path)["reports"]["last"]["acc"] == 0.5
  if damage == "truncate":
    os.truncate(path, os.path.getsize(path) - 5)
  else:  # valid JSON, another figure: only the checksum can tell
    with open(path) as f:
      text = f.read()
    with open(path, "w") as f:
      f.write(text.replace('"acc": 0.5', '"acc": 0.9'))
  with pytest.raises(integrity.Damaged):
    integrity.load_sealed_json(path)
