"""Multi-process (multi-host) runs for real: two processes, two fake CPU devices each.

Each process runs `main.py --distributed` (jax.distributed over a local coordinator port; the
CPU collectives are JAX's default, gloo). Training must end with the checkpoint of one process
with four devices, and `--mode=eval` must write the report one process computes.
"""
import json
import os
import shutil
import socket
import subprocess
import sys

import chex
import jax
import pytest

from cas_jax import checkpointing
from cas_jax.evaluation import evaluate
from cas_jax.training import train
from configs import smoke
from tests import fake_devices

# The smoke network, shrunk: 8x8 images, width 4, one step of a global batch of 16. One step:
# its adversary is crafted from bitwise-identical initial weights in both runs; a second
# step's PGD starts from weights that differ in the last bits (the all-reduce order, below),
# and one sign step of a gradient component near 0 then moves a pixel by a whole step size
# and the weights by ~5e-3, as much as the shard mistake the test is there to catch.
TRAIN = {"data.image_size": 8, "model.width": 4, "data.synthetic_num_train": 16,
         "data.synthetic_num_test": 16, "batch_size": 16, "eval_batch_size": 16,
         "eval.num_images": 16, "attack.steps": 2, "eval.steps": 2, "schedule.num_epochs": 1,
         "ckpt.async_save": False}
EVAL = {"eval.attacks": "pgd3,aa", "eval.report_images": 16, "eval.checkpoints": "last",
        "eval.apgd_steps": 3, "eval.fab_steps": 3, "eval.square_queries": 5,
        "eval.target_classes": 2}


def _config(overrides):
  config = smoke.get_config()
  for path, value in overrides.items():
    *parents, name = path.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[name] = value
  return config


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _main(workdir, overrides, *flags, devices, processes=1):
  """main.py on the smoke config in `processes` processes of `devices` fake CPU devices each."""
  command = [sys.executable, os.path.join(fake_devices.ROOT, "main.py"),
             "--config=configs/smoke.py", f"--workdir={workdir}", *flags]
  command += [f"--config.{path}={value}" for path, value in overrides.items()]
  if processes > 1:
    command += ["--distributed", f"--coordinator_address=127.0.0.1:{_free_port()}",
                f"--num_processes={processes}"]
  # Output to files, not pipes: a process blocked on a full pipe that is not being read yet
  # would stall the other one in a collective until gloo's timeout.
  logs = [(workdir.parent / f"{workdir.name}.{i}.out", workdir.parent / f"{workdir.name}.{i}.err")
          for i in range(processes)]
  runs = []
  for i, (out, err) in enumerate(logs):
    with open(out, "w") as stdout, open(err, "w") as stderr:
      runs.append(subprocess.Popen(command + ([f"--process_id={i}"] if processes > 1 else []),
                                   env=fake_devices.environment(devices), cwd=fake_devices.ROOT,
                                   stdout=stdout, stderr=stderr, text=True))
  for run in runs:
    run.wait(timeout=900)
  for run, (_, err) in zip(runs, logs):
    assert run.returncode == 0, err.read_text()[-3000:]
  return [out.read_text() for out, _ in logs]


def _restored(workdir):
  config = _config(TRAIN)
  model = train.create_model(config, 10)
  state = train.create_train_state(config.seed, model, config, 2, (8, 8, 3))
  manager = checkpointing.create_manager(str(workdir), async_save=False)
  return jax.device_get(checkpointing.restore(manager, state))


def _metrics(workdir):
  """metrics.jsonl rows without the timings."""
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  return [{k: v for k, v in row.items() if not k.endswith("_s")} for row in rows]


@pytest.mark.slow
def test_two_processes_train_and_evaluate_as_one_process_does(tmp_path):
  _main(tmp_path / "two", TRAIN, devices=2, processes=2)
  _main(tmp_path / "one", TRAIN, devices=4)
  two, one = _restored(tmp_path / "two"), _restored(tmp_path / "one")
  assert int(two.step) == int(one.step) == 1
  # Not bitwise: gloo's all-reduce adds the four devices' partial sums (gradients, BatchNorm
  # statistics) in another order than XLA's in-process CPU all-reduce, so float32 results
  # differ in the last bits: about 5e-6 in the gradients (the momentum), and the weights by
  # up to lr (0.1) x the momentum's tolerance below = 2e-6 (kept at 4e-6).
  # A process that trained on the wrong shard would be off by ~lr x gradient, ~1e-2.
  chex.assert_trees_all_close((two.params, two.batch_stats), (one.params, one.batch_stats),
                              rtol=1e-5, atol=4e-6)
  chex.assert_trees_all_close(two.opt_state, one.opt_state, rtol=2e-4, atol=2e-5)
  chex.assert_trees_all_close(_metrics(tmp_path / "two"), _metrics(tmp_path / "one"),
                              rtol=1e-5)

  # Evaluation: two processes on the two-process checkpoint; this process on a copy of it.
  shutil.copytree(tmp_path / "two" / "checkpoints", tmp_path / "copy" / "checkpoints")
  printed = _main(tmp_path / "two", {**TRAIN, **EVAL}, "--mode=eval", devices=2, processes=2)
  assert "Wrote" in printed[0] and "Wrote" not in printed[1]  # process 0 writes alone
  written = json.loads((tmp_path / "two" / "eval" / "last_report.json").read_text())
  expected = evaluate.evaluate_workdir(_config({**TRAIN, **EVAL}), str(tmp_path / "copy"))
  expected = json.loads(expected["last"].to_json())
  assert list(written["verdicts"]) == ["natural", "pgd3", "aa", "worst_case"]
  assert all(len(v) == 16 for v in written["verdicts"].values())
  assert written["verdicts"] == expected["verdicts"] and written["ran_on"] == expected["ran_on"]
