"""Nothing a user trained is lost: preemption, divergence, interrupted metrics, bad input.

In-process tests; the subprocess ones (exit codes, signals) are in test_fault_tolerance_processes.py.
"""
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest

from cas_jax import checkpointing
from cas_jax import errors
from cas_jax import input_pipeline
from cas_jax.training import metric_writers
from cas_jax import preemption
from cas_jax.training import train
from configs import smoke
from tests.test_input_pipeline import write_fake_cifar10

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# configs/smoke.py made smaller still: 8x8 images, width 4, 4 steps per epoch, 3 epochs.
SMALL = {"data.image_size": 8, "data.synthetic_num_train": 64, "data.synthetic_num_test": 16,
         "model.width": 4, "batch_size": 16, "eval_batch_size": 16, "attack.steps": 1,
         "eval.steps": 1, "eval.num_images": 16, "schedule.num_epochs": 3,
         "log_every_steps": 1, "ckpt.async_save": False}


def small_config(**overrides):
  config = smoke.get_config()
  for key, value in {**SMALL, **overrides}.items():
    *parents, name = key.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[name] = value
  return config


def small_flags(**overrides):
  return [f"--config.{k}={v}" for k, v in {**SMALL, **overrides}.items()]


def read_rows(workdir):
  """metrics.jsonl as strict JSON (a bare NaN or Infinity fails here)."""
  def refuse(constant):
    raise ValueError(f"non-JSON constant {constant} in metrics.jsonl")
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line, parse_constant=refuse) for line in f]


def train_rows(rows):
  """{step: row} of the training-metric rows; fails if a step appears twice."""
  steps = [r["step"] for r in rows if "train_loss" in r]
  assert len(steps) == len(set(steps)), f"a step logged twice: {sorted(steps)}"
  return {r["step"]: r for r in rows if "train_loss" in r}


def final_variables(workdir):
  """The latest checkpoint of a workdir as a raw tree (no train state needed)."""
  manager = checkpointing.create_manager(str(workdir), async_save=False)
  return manager.restore(manager.latest_step())


# ----------------------------------------------------------------------------- in process


def first_steps_by_hand(config, steps):
  """The train state after `steps` jitted train_steps on the first batches, outside the loop."""
  dataset = input_pipeline.create_dataset(config)
  model = train.create_model(config, dataset.num_classes)
  state = train.create_train_state(config.seed, model, config, dataset.steps_per_epoch,
                                   dataset.train_images.shape[1:])
  train_key = jax.random.split(jax.random.PRNGKey(config.seed))[0]
  step_fn = jax.jit(lambda s, b: train.train_step(s, b, train_key, config=config))
  for _, batch in zip(range(steps), dataset.train_batches(0)):
    state, _ = step_fn(state, batch)
  return jax.device_get(state)


@pytest.mark.slow
def test_sigint_finishes_the_step_in_flight_and_saves_it(tmp_path, monkeypatch):
  config = small_config(**{"loss.objective": "natural"})  # the loop is the same; compiles fast
  write = metric_writers.MetricWriter.write_scalars

  def write_then_interrupt(self, step, scalars):
    write(self, step, scalars)
    if step == 2 and "train_loss" in scalars:  # Ctrl-C while step 3 is on its way
      os.kill(os.getpid(), signal.SIGINT)

  handler_before = signal.getsignal(signal.SIGINT)
  monkeypatch.setattr(metric_writers.MetricWriter, "write_scalars", write_then_interrupt)
  with pytest.raises(preemption.Stopped) as stopped:
    train.train_and_evaluate(config, str(tmp_path))
  monkeypatch.undo()
  assert (stopped.value.step, stopped.value.signal_name) == (3, "SIGINT")
  assert stopped.value.exit_status == 130
  assert signal.getsignal(signal.SIGINT) is handler_before  # the handler is put back
  rows = read_rows(tmp_path)
  assert rows[-1]["step"] == 3 and rows[-1]["epoch"] == 0.75  # the partial epoch's row
  assert sorted(train_rows(rows)) == [1, 2, 3]
  manager = checkpointing.create_manager(str(tmp_path))
  assert manager.all_steps() == [3]
  saved = manager.restore(3)
  by_hand = first_steps_by_hand(config, 3)
  chex.assert_trees_all_equal(saved["params"], by_hand.params)
  chex.assert_trees_all_equal(saved["batch_stats"], by_hand.batch_stats)


def terminate_at(step_seen):
  """A MetricWriter.write_scalars that sends SIGTERM after the training row of `step_seen`."""
  write = metric_writers.MetricWriter.write_scalars

  def write_then_terminate(self, step, scalars):
    write(self, step, scalars)
    if step == step_seen and "train_loss" in scalars:  # the loop sees it after the next step
      os.kill(os.getpid(), signal.SIGTERM)
  return write_then_terminate


@pytest.mark.slow
def test_a_stop_on_an_epochs_last_step_is_evaluated_and_ranked_after_the_resume(
    tmp_path, monkeypatch):
  config = small_config(**{"loss.objective": "natural", "schedule.num_epochs": 2})
  monkeypatch.setattr(metric_writers.MetricWriter, "write_scalars", terminate_at(3))
  with pytest.raises(preemption.Stopped) as stopped:
    train.train_and_evaluate(config, str(tmp_path))
  monkeypatch.undo()
  assert stopped.value.step == 4  # the last step of epoch 1, saved before its evaluation
  assert not any("pgd_acc" in row for row in read_rows(tmp_path))
  train.train_and_evaluate(config, str(tmp_path))
  evaluated = {row["epoch"]: row for row in read_rows(tmp_path) if "pgd_acc" in row}
  assert sorted(evaluated) == [1, 2] and evaluated[1]["step"] == 4
  manager = checkpointing.create_manager(str(tmp_path), async_save=False)
  assert manager.all_steps() == [4, 8]
  for epoch, step in ((1, 4), (2, 8)):  # each checkpoint ranked by its own evaluation
    assert manager.metrics(step)["pgd_acc"] == pytest.approx(evaluated[epoch]["pgd_acc"])
  best = max((4, 8), key=lambda s: (manager.metrics(s)["pgd_acc"], s == 4))
  assert checkpointing.best_step(manager) == best


def test_an_unknown_model_is_refused_before_the_dataset_is_loaded(tmp_path, monkeypatch):
  monkeypatch.setattr(input_pipeline, "create_dataset", lambda config: pytest.fail("loaded"))
  with pytest.raises(errors.UserError, match="unknown model 'resnet101'; valid: resnet18"):
    train.train_and_evaluate(small_config(**{"model.name": "resnet101"}), str(tmp_path))
  for mode in ("eval", "analyze"):  # main.py checks it for every mode
    with pytest.raises(SystemExit, match="^error: unknown model 'resnet101'; valid: resnet18"):
      run_main_in_process(monkeypatch, tmp_path, mode, **{"model.name": "resnet101"})


def test_divergence_stops_without_a_non_finite_checkpoint(tmp_path):
  config = small_config(**{"optim.lr": 1e6, "log_every_steps": 4, "ckpt.every_steps": 1,
                           "loss.objective": "natural"})
  with pytest.raises(train.Diverged, match=r"non-finite loss or parameters at step (\d+)") as e:
    train.train_and_evaluate(config, str(tmp_path))
  message = str(e.value)
  diverged_at = int(message.split("at step ")[1].split(" ")[0])
  manager = checkpointing.create_manager(str(tmp_path), async_save=False)
  assert manager.all_steps() and max(manager.all_steps()) < diverged_at
  assert f"newest verified checkpoint is step {manager.latest_step()}" in message
  assert "\n" not in message and "--config.optim.lr" in message
  for step in manager.all_steps():
    restored = manager.restore(step)
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(restored)), step
  rows = read_rows(tmp_path)  # strict JSON: the non-finite loss is a null
  assert rows[-1]["step"] == diverged_at and rows[-1]["train_loss"] is None


@pytest.mark.parametrize("key,value,message", [
    ("optim.lr", 0.0, "optim.lr=0.0; use a learning rate > 0"),
    ("optim.lr", -0.1, "optim.lr=-0.1; use a learning rate > 0"),
    ("schedule.num_epochs", 0, "schedule.num_epochs=0; use an integer >= 1"),
    ("batch_size", 0, "batch_size=0; use an integer >= 1"),
    ("eval_batch_size", -4, "eval_batch_size=-4; use an integer >= 1"),
    ("eval.every_epochs", 0, "eval.every_epochs=0; use an integer >= 1"),
    ("ckpt.every_epochs", 0, "ckpt.every_epochs=0; use an integer >= 1"),
    ("ckpt.every_steps", -1, "ckpt.every_steps=-1; use an integer >= 0 (0 = off)"),
    ("log_every_steps", 0, "log_every_steps=0; use an integer >= 1"),
    ("optim.momentum", 1.0, "optim.momentum=1.0; use [0, 1)"),
])
def test_bad_hyperparameters_are_refused(key, value, message):
  train.validate_config(small_config())  # the base is fine
  with pytest.raises(ValueError, match="^" + re.escape(message)):
    train.validate_config(small_config(**{key: value}))


def test_workdir_that_cannot_be_created_is_refused(tmp_path):
  (tmp_path / "a_file").write_text("")
  with pytest.raises(ValueError, match="cannot write to --workdir=.*a_file/run"):
    metric_writers.check_workdir(str(tmp_path / "a_file" / "run"))
  metric_writers.check_workdir(str(tmp_path / "new" / "run"))  # created
  assert os.listdir(tmp_path / "new" / "run") == []  # and left empty


def test_truncated_cifar_file_is_named(tmp_path):
  write_fake_cifar10(tmp_path / "cifar")
  path = tmp_path / "cifar" / "data_batch_1"
  os.truncate(path, os.path.getsize(path) // 2)
  with pytest.raises(ValueError, match=f"{path} is damaged .* download and extract https://"):
    input_pipeline.load_cifar_dir(str(tmp_path / "cifar"))


def test_tfds_without_network_fails_in_seconds(tmp_path, monkeypatch):
  for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
    monkeypatch.setenv(name, "http://127.0.0.1:9")  # nothing listens: every request fails
  for name in ("NO_PROXY", "no_proxy"):
    monkeypatch.delenv(name, raising=False)
  start = time.time()
  with pytest.raises(input_pipeline.DatasetNotFoundError, match="--config.data.cifar_dir="):
    input_pipeline.load_tfds("cifar10", str(tmp_path), download=True)
  assert time.time() - start < 20  # ten retries with backoff took 222 s


def test_metrics_file_drops_rows_after_the_resume_step_and_stays_json(tmp_path):
  writer = metric_writers.MetricWriter(str(tmp_path))
  for step in (1, 2, 3, 4):
    writer.write_scalars(step, {"loss": float(step)})
  writer.write_scalars(4, {"loss": math.nan, "acc": math.inf})
  writer.close()
  assert read_rows(tmp_path)[-1] == {"step": 4, "loss": None, "acc": None}
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 5, "lo')  # cut short by a kill
  writer = metric_writers.MetricWriter(str(tmp_path), resume_step=2)
  writer.write_scalars(3, {"loss": 30.0})
  writer.close()
  assert read_rows(tmp_path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0},
                                 {"step": 3, "loss": 30.0}]


_WRITE_SCALARS = """
import sys
from cas_jax.training import metric_writers
writer = metric_writers.MetricWriter(sys.argv[1])
writer.write_scalars(7, {"loss": 0.25})
writer.close()
print("torch" in sys.modules)
"""


def _event_scalars(folder):
  """{(step, tag): value} of the scalars in the TensorBoard event files under `folder`, read
  record by record (8-byte length, 4-byte CRC, the Event proto, 4-byte CRC)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  scalars = {}
  for name in os.listdir(folder):
    with open(os.path.join(folder, name), "rb") as f:
      data = f.read()
    while data:
      length = int.from_bytes(data[:8], "little")
      event = event_pb2.Event.FromString(data[12:12 + length])
      scalars.update({(event.step, v.tag): v.simple_value for v in event.summary.value})
      data = data[16 + length:]
  return scalars


def test_the_metric_writer_does_not_import_torch_and_writes_tensorboard_events(tmp_path):
  # tensorboardX would import torch (1.4 s of every start) only to accept torch tensors.
  pytest.importorskip("torch", reason="without torch there is nothing to keep out")
  done = subprocess.run([sys.executable, "-c", _WRITE_SCALARS, str(tmp_path)], cwd=ROOT,
                        capture_output=True, text=True, timeout=120, check=True)
  assert done.stdout.split()[-1] == "False", done.stderr[-2000:]
  assert _event_scalars(tmp_path / "tensorboard") == {(7, "loss"): 0.25}
  import torch  # pylint: disable=g-import-not-at-top  (already imported: left as it is)
  writer = metric_writers.MetricWriter(str(tmp_path / "again"))
  writer.write_scalars(3, {"acc": 0.5})
  writer.close()
  assert _event_scalars(tmp_path / "again" / "tensorboard") == {(3, "acc"): 0.5}
  assert sys.modules["torch"] is torch


def run_main_in_process(monkeypatch, workdir, mode="train", **overrides):
  """main.py's main() in this process, its flags set as the command line would set them."""
  from cas_jax import main as main_module  # pylint: disable=g-import-not-at-top  (its flags)
  flags = main_module.FLAGS
  flags(["main.py", "--config=configs/smoke.py", f"--workdir={workdir}", f"--mode={mode}"])
  for key, value in overrides.items():  # on the config this parse just loaded
    *parents, name = key.split(".")
    node = flags.config
    for parent in parents:
      node = node[parent]
    monkeypatch.setitem(node, name, value)
  return main_module.main(["main.py"])


def test_only_the_users_mistakes_end_in_one_line_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
  def shape_bug(config, workdir):  # JAX's own shape check: a ValueError, but not the user's
    jax.numpy.broadcast_to(jax.numpy.ones(3), (2,))

  monkeypatch.setattr(train, "train_and_evaluate", shape_bug)
  with pytest.raises(ValueError, match="Incompatible types for broadcasting"):
    run_main_in_process(monkeypatch, tmp_path)
  monkeypatch.setattr(train, "train_and_evaluate", lambda config, workdir: train.validate_config(
      small_config(**{"batch_size": 0})))
  with pytest.raises(SystemExit, match="^error: batch_size=0; use an integer >= 1$"):
    run_main_in_process(monkeypatch, tmp_path)
  with pytest.raises(KeyError):
    with errors.exit_on_user_error():
      raise KeyError("a bug")
