"""Nothing a user trained is lost, seen from outside: exit codes, one-line errors and signals
of `main.py` run as a subprocess (the in-process cases: tests/test_fault_tolerance.py)."""
import os
import signal
import subprocess
import sys
import time

import chex
import numpy as np
import pytest

from cas_jax import checkpointing
from cas_jax.training import metric_writers
from test_fault_tolerance import ROOT, final_variables, read_rows, small_flags, train_rows
from tests.test_input_pipeline import write_fake_cifar10


def run_main(workdir, *flags, env=None, timeout=300):
  return subprocess.run(
      [sys.executable, os.path.join(ROOT, "main.py"), f"--workdir={workdir}", *flags],
      cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False, env=env)


@pytest.mark.parametrize("case,flags,message", [
    ("config", ["--config=configs/no_such.py"], "config file configs/no_such.py does not exist"),
    ("key", ["--config=configs/smoke.py", "--config.foo=1"], "no config field 'foo'"),
    ("batch", ["--config=configs/smoke.py", "--config.batch_size=0"], "batch_size=0; use"),
    ("epochs", ["--config=configs/smoke.py", "--config.schedule.num_epochs=0"],
     "schedule.num_epochs=0; use"),
    ("lr", ["--config=configs/smoke.py", "--config.optim.lr=-1"], "optim.lr=-1.0; use"),
    ("workdir", ["--config=configs/smoke.py"], "cannot write to --workdir="),
    ("cifar", ["--config=configs/smoke.py", "--config.data.source=cifar_dir"],
     "data_batch_1 is damaged or not a CIFAR python pickle"),
])
def test_bad_input_ends_in_one_line_and_status_1(tmp_path, case, flags, message):
  workdir = tmp_path / "run"
  if case == "workdir":
    (tmp_path / "a_file").write_text("")
    workdir = tmp_path / "a_file" / "run"
  if case == "cifar":
    write_fake_cifar10(tmp_path / "cifar")
    os.truncate(tmp_path / "cifar" / "data_batch_1", 100)
    flags = flags + [f"--config.data.cifar_dir={tmp_path / 'cifar'}"]
  result = run_main(workdir, *flags)
  assert result.returncode == 1, result.stderr[-2000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and message in last, result.stderr[-2000:]
  assert "Traceback" not in result.stderr


def last_logged_step(workdir):
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      steps = [metric_writers.row_step(line) for line in f]
  except FileNotFoundError:
    return 0
  return max([s for s in steps if s is not None], default=0)


def run_until(workdir, flags, env, step, signum):
  """Start training, send `signum` once a row of `step` (or later) is logged; the result."""
  step = max(step, last_logged_step(workdir) + 1)  # not on a row an earlier run left
  process = subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "main.py"), f"--workdir={workdir}", *flags],
      cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while process.poll() is None and last_logged_step(workdir) < step:
    assert time.time() < deadline, "training made no progress"
    time.sleep(0.02)
  if process.poll() is None:
    process.send_signal(signum)
  _, stderr = process.communicate(timeout=300)
  return process.returncode, stderr


@pytest.mark.slow
def test_killed_and_preempted_runs_end_bitwise_equal_to_an_uninterrupted_one(tmp_path):
  # Every run keeps its programs in the suite's compilation cache (main.py follows
  # CAS_JAX_COMPILATION_CACHE, which conftest sets): each restart costs its start-up only.
  env = dict(os.environ)
  flags = ["--config=configs/smoke.py", *small_flags(**{"ckpt.every_steps": 2})]
  reference = run_main(tmp_path / "reference", *flags, env=env)
  assert reference.returncode == 0, reference.stderr[-3000:]
  total = 3 * 4  # 3 epochs of 4 steps
  seed = int(time.time())
  # Kill points: steps 1..6 in increasing order, so each run gets further than the last and
  # a SIGTERM lands well before the end (5 more steps and two evaluations to go).
  targets = sorted(np.random.default_rng(seed).choice(np.arange(1, 7), 4, replace=False))
  workdir = tmp_path / "interrupted"
  for target, signum in zip(targets, [signal.SIGKILL, signal.SIGTERM] * 2):
    if last_logged_step(workdir) >= total - 3:  # earlier kills overshot: leave it some steps
      break
    status, stderr = run_until(workdir, flags, env, target, signum)
    where = f"(seed {seed}, {signal.Signals(signum).name} at step >= {target})"
    if signum == signal.SIGKILL:
      assert status == -signal.SIGKILL, where + stderr[-3000:]
      continue
    assert status == 128 + signal.SIGTERM, where + stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert "Traceback" not in stderr, where + stderr[-3000:]
    stopped_at = int(last.split("stopped by SIGTERM after step ")[1].split(" ")[0])
    assert stopped_at >= target and last.endswith(" ".join(flags)), where + last
    assert checkpointing.create_manager(str(workdir)).latest_step() == stopped_at, where
  final = run_main(workdir, *flags, env=env)
  assert final.returncode == 0, final.stderr[-3000:]
  ours, theirs = final_variables(workdir), final_variables(tmp_path / "reference")
  assert int(ours["step"]) == total
  chex.assert_trees_all_equal(ours, theirs)
  # metrics.jsonl: every step logged once, with the uninterrupted run's values.
  assert train_rows(read_rows(workdir)) == train_rows(read_rows(tmp_path / "reference"))


def test_sigint_before_the_training_loop_ends_at_once_in_one_line(tmp_path):
  process = subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "main.py"), f"--workdir={tmp_path}",
       "--config=configs/smoke.py"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
  first_line = process.stderr.readline()  # logged once JAX is up, before data and model
  process.send_signal(signal.SIGINT)
  start = time.time()
  rest = process.communicate(timeout=60)[1]
  assert time.time() - start < 10 and process.returncode == 130, first_line + rest
  assert rest.strip().splitlines()[-1].startswith("SIGINT outside the training loop")
  assert "Traceback" not in rest and not os.path.exists(tmp_path / "checkpoints")
