"""Resume of the survivor cascade and of the report: an interrupted run (an exception, SIGKILL,
SIGTERM, a new process) continues from its state without attacking anything again and ends
with the verdicts of an uninterrupted one."""
import json
import os
import signal
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cas_jax import errors
from cas_jax.evaluation import evaluate
from cas_jax.attacks import cascade
import fake_devices
from test_cascade import (BUDGET, KEY, ROWS, W, _report, _report_data, _toy_data, _toy_unit,
                          apply_cas_like, apply_counted_cas)


def test_an_interrupted_cascade_resumes_without_attacking_anything_again(tmp_path):
  n, batch = 40, 8
  x, y, keys = _toy_data(n)
  path = str(tmp_path / "state.npz")
  every = {"m": np.ones(n, bool)}
  first = {"a": [], "b": []}
  steps = lambda seen, fail: [cascade.Step(_toy_unit("a", np.arange(0, n, 3), seen["a"]), ("m",)),
                              cascade.Step(_toy_unit("b", [1, 2], seen["b"], fail), ("m",))]
  with pytest.raises(RuntimeError, match="simulated"):
    cascade.run(steps(first, 2), x, y, keys, eligible=every, batch_size=batch,
                state_path=path, fingerprint={"run": 1}, save_every=0)
  assert len(first["b"]) == 2
  again = {"a": [], "b": []}
  resumed = cascade.run(steps(again, None), x, y, keys, eligible=every, batch_size=batch,
                        state_path=path, fingerprint={"run": 1})
  assert not again["a"]  # step a had finished
  redone = set(np.concatenate(again["b"])) & set(np.concatenate(first["b"]))
  assert not redone
  fresh = cascade.run(steps({"a": [], "b": []}, None), x, y, keys, eligible=every,
                      batch_size=batch)
  np.testing.assert_array_equal(resumed.broken["m"], fresh.broken["m"])
  assert resumed.costs["b"]["images"] == fresh.costs["b"]["images"]
  # The state holds no adversarial images: a resume cannot return the first run's.
  with pytest.raises(errors.UserError, match="keep_adversarial=True cannot resume"):
    cascade.run(steps({"a": [], "b": []}, None), x, y, keys, eligible=every, batch_size=batch,
                state_path=path, fingerprint={"run": 1}, keep_adversarial=True)
  # Another fingerprint is never resumed into: the old state is set aside, all runs again.
  other = {"a": [], "b": []}
  cascade.run(steps(other, None), x, y, keys, eligible=every, batch_size=batch,
              state_path=path, fingerprint={"run": 2})
  assert len(np.concatenate(other["a"])) == n
  assert any(name.startswith("state.npz.stale-") for name in os.listdir(tmp_path))


def _keyed_unit(name, seen, fail_at=None):
  """A unit that fools an image when its key data is odd; it records (image, key data) pairs."""
  def run_batch(x, y, key_data, carry):
    del y, carry
    if fail_at is not None and len(seen) == fail_at:
      raise RuntimeError("out of memory (simulated)")
    images, data = np.asarray(x[:, 0, 0, 0]).astype(int), np.asarray(key_data)
    seen.append((images, data))
    return jnp.asarray(data[:, -1] % 2 == 1), x, None, 1, 0
  return cascade.Unit(name, run_batch)


def test_a_resumed_attack_on_survivors_gets_them_with_their_own_keys(tmp_path):
  """`second` attacks only what `first` left standing (after=...); killed in its second batch
  and resumed, it gets each survivor once, with that image's key, and ends as a run never
  stopped would."""
  n, batch = 40, 8
  x, y, keys = _toy_data(n)
  path = str(tmp_path / "state.npz")
  every = {"first": np.ones(n, bool), "second": np.ones(n, bool)}
  steps = lambda seen, fail: [
      cascade.Step(_toy_unit("a", np.arange(0, n, 4), []), ("first",)),
      cascade.Step(_keyed_unit("k", seen, fail), ("second",))]
  options = dict(eligible=every, after={"second": ["first"]}, batch_size=batch)
  fresh = cascade.run(steps([], None), x, y, keys, **options)
  killed, resumed = [], []
  with pytest.raises(RuntimeError, match="simulated"):
    cascade.run(steps(killed, 1), x, y, keys, state_path=path, save_every=0, **options)
  again = cascade.run(steps(resumed, None), x, y, keys, state_path=path, **options)
  given = [(int(i), d) for images, data in killed + resumed for i, d in zip(images, data)]
  survivors = np.flatnonzero(~fresh.broken["first"])
  assert sorted(i for i, _ in given) == survivors.tolist()  # each survivor once, nothing else
  for image, data in given:
    np.testing.assert_array_equal(data, keys[image])
  assert resumed and killed  # both runs did part of the work
  for name in ("first", "second"):
    np.testing.assert_array_equal(again.broken[name], fresh.broken[name])
  assert 0 < again.broken["second"].sum() < survivors.size


def _counting_unit(name, seen, first, fail=False):
  """Chunk `first` of a count carried per image: +1 a chunk; fooled once the count reaches 3
  on odd images. It raises instead of running when `fail`."""
  def run_batch(x, y, key_data, carry):
    del y, key_data
    if fail:
      raise KeyboardInterrupt
    seen.append(len(x))
    count = (jnp.zeros(len(x)) if carry is None else carry[0]) + 1
    fooled = (count >= 3) & (np.asarray(x[:, 0, 0, 0]).astype(int) % 2 == 1)
    return fooled, x, (count,), 1, 0
  return cascade.Unit(f"{name}/{first}", run_batch, carry=name, reads_carry=first > 0)


def test_a_carried_state_survives_an_interruption_between_chunks(tmp_path):
  x, y, keys = _toy_data(12)
  path, every = str(tmp_path / "state.npz"), {"m": np.ones(12, bool)}
  chunks = lambda seen, fail_at: [cascade.Step(_counting_unit("count", seen, i, i == fail_at),
                                               ("m",)) for i in range(4)]
  with pytest.raises(KeyboardInterrupt):
    cascade.run(chunks([], 2), x, y, keys, eligible=every, batch_size=4, state_path=path)
  assert any(k.startswith("carry:count/") for k in np.load(path).files)  # kept while needed
  seen = []
  resumed = cascade.run(chunks(seen, None), x, y, keys, eligible=every, batch_size=4,
                        state_path=path)
  assert sum(seen) == 12 + 6  # chunks 2 and 3 only: 12 images, then the 6 even ones left
  np.testing.assert_array_equal(resumed.broken["m"], np.arange(12) % 2 == 1)
  # The group's last chunk has run: its carries leave the state, the masks stay.
  saved = np.load(path).files
  assert not [k for k in saved if k.startswith("carry:")] and "attacked:count/3" in saved


@pytest.mark.slow
def test_a_report_resumes_and_a_finished_one_attacks_nothing_again(tmp_path, caplog):
  first = _report("pgd3,aa", batch_size=16, state_dir=str(tmp_path))
  ROWS.clear()
  with caplog.at_level("INFO"):
    again = _report("pgd3,aa", batch_size=8, state_dir=str(tmp_path))
  jax.effects_barrier()
  assert sum(ROWS) == 40  # the natural pass only: every stage is replayed from the state
  for name in first.verdicts:
    chex.assert_trees_all_equal(first.verdicts[name], again.verdicts[name])
  assert again.costs["total"]["images"] == first.costs["total"]["images"]
  done = int(first.costs["total"]["images"])
  assert any(f"{done} image-stages already attacked" in r.getMessage() for r in caplog.records)
  caplog.clear()
  ROWS.clear()
  with caplog.at_level("WARNING"):
    other = _report("pgd3,cw3", batch_size=16, state_dir=str(tmp_path))
  jax.effects_barrier()
  (warning,) = [r.getMessage() for r in caplog.records if "Not resuming" in r.getMessage()]
  assert ": its after, attacks differ; starting afresh" in warning  # exactly those
  assert sum(ROWS) == other.costs["total"]["rows"]  # all of it attacked again
  assert any(".npz.stale-" in name for name in os.listdir(tmp_path))


def resume_report(state_dir=None, n=60, apply_fn=apply_counted_cas):
  """The report eval_resume_check.py runs: AutoAttack on a CAS-like model given as README
  shows (a Partial of a module-level function and its weights), small batches."""
  x, y = _report_data(n)
  model = jax.tree_util.Partial(apply_fn, W)
  return evaluate.robustness_report(model, x, y, key=KEY, eps=0.03, attacks="pgd3,aa,aa-joint",
                                    batch_size=4, budget=BUDGET, state_dir=state_dir,
                                    save_every=0.0)


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_report_started_again_ends_as_an_uninterrupted_one(tmp_path, stop):
  script = os.path.join(os.path.dirname(__file__), "eval_resume_check.py")
  env = fake_devices.environment(1)
  state, out = str(tmp_path / "state"), str(tmp_path / "out.npz")
  run = lambda: subprocess.Popen([sys.executable, script, state, out], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  process = run()
  deadline = time.monotonic() + 300
  path = os.path.join(state, "report_state.p0.npz")
  while time.monotonic() < deadline and process.poll() is None:
    if os.path.exists(path) and "apgd-t" in str(np.load(path).files):
      break  # in AutoAttack's second stage
    time.sleep(0.2)
  assert process.poll() is None, process.communicate()[1][-2000:]
  process.send_signal(stop)
  _, stderr = process.communicate(timeout=120)
  if stop == signal.SIGTERM:  # the batch in flight finishes, is saved, the run says so
    assert process.returncode != 0 and "evaluation stopped by SIGTERM" in stderr
  assert not os.path.exists(out)
  resumed = run()
  _, stderr = resumed.communicate(timeout=300)
  assert resumed.returncode == 0, stderr[-2000:]
  # The new process recognises the model (a Partial: its function by name, not by address).
  assert "Resuming the evaluation" in stderr and "Not resuming" not in stderr, stderr[-2000:]
  assert not [f for f in os.listdir(state) if ".stale-" in f]
  again = np.load(out)
  # From scratch, uncounted (cached programs); its cost table counts the rows the host callback
  # would (test_the_report_counts_every_model_row_it_evaluates_and_not_the_batch).
  reference = resume_report(apply_fn=apply_cas_like)
  for name, verdict in reference.verdicts.items():
    np.testing.assert_array_equal(again[name], verdict)
  # Every image-stage attacked once over both runs: nothing recorded was attacked again, and
  # the second process evaluated strictly fewer model rows than a run from scratch.
  assert int(again["images"]) == reference.costs["total"]["images"]
  scratch = reference.costs["total"]["rows"]
  assert 0 < int(again["rows"]) < scratch, (int(again["rows"]), scratch)


@pytest.mark.slow
def test_main_eval_stopped_in_autoattack_resumes_in_a_new_process(tmp_path):
  # `main.py --mode=eval` on a trained workdir, stopped by SIGTERM once AutoAttack's first
  # stage has finished, then the same command again: the new process says it resumed (the
  # model recognised from its weights and config, not a memory address) and ends with the
  # verdicts of an uninterrupted run in a copy of the workdir.
  import shutil  # pylint: disable=g-import-not-at-top
  from cas_jax.training import train  # pylint: disable=g-import-not-at-top
  from test_fault_tolerance import small_config, small_flags  # pylint: disable=g-import-not-at-top
  evaluation = {"eval.attacks": "pgd3,aa", "eval.report_images": 16, "eval.checkpoints": "last",
                "eval.apgd_steps": 8, "eval.fab_steps": 8, "eval.square_queries": 60,
                "eval.target_classes": 3, "eval.progress": False}
  workdir = tmp_path / "run"
  train.train_and_evaluate(small_config(**{"schedule.num_epochs": 1}), str(workdir))
  shutil.copytree(workdir, tmp_path / "copy")
  command = [sys.executable, os.path.join(fake_devices.ROOT, "main.py"),
             "--config=configs/smoke.py", "--mode=eval",
             *small_flags(**{"schedule.num_epochs": 1}, **evaluation)]
  env = fake_devices.environment(1)
  first = subprocess.Popen(command + [f"--workdir={workdir}"], env=env, cwd=fake_devices.ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  seen = []
  for line in first.stderr:
    seen.append(line)
    if " apgd-ce: " in line:  # AutoAttack's first stage is done and saved
      first.send_signal(signal.SIGTERM)
      break
  _, rest = first.communicate(timeout=300)
  log = "".join(seen) + rest
  assert first.returncode == 128 + signal.SIGTERM, log[-3000:]
  assert "evaluation stopped by SIGTERM" in log
  second = subprocess.run(command + [f"--workdir={workdir}"], env=env, cwd=fake_devices.ROOT,
                          capture_output=True, text=True, timeout=600, check=False)
  assert second.returncode == 0, second.stderr[-3000:]
  assert "Resuming the evaluation" in second.stderr and "Not resuming" not in second.stderr
  assert " apgd-ce: " not in second.stderr  # the finished stage is not attacked again
  reference = subprocess.run(command + [f"--workdir={tmp_path / 'copy'}"], env=env,
                             cwd=fake_devices.ROOT, capture_output=True, text=True,
                             timeout=600, check=False)
  assert reference.returncode == 0, reference.stderr[-3000:]
  resumed, whole = (json.load(open(w / "eval" / "last_report.json"))
                    for w in (workdir, tmp_path / "copy"))
  assert resumed["verdicts"] == whole["verdicts"]
  assert resumed["costs"]["total"]["images"] == whole["costs"]["total"]["images"]
