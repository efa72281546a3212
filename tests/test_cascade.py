"""The survivor cascade and the scheduled report: survivors gathered over the whole set into
full batches, bounded compilations, model rows counted exactly, resume without re-attacking."""
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
from cas_jax.evaluation.attack_registry import AttackBudget
from cas_jax.attacks import cascade
import fake_devices

KEY = jax.random.key(0)


def _toy_unit(name, breaks, seen, fail_at=None):
  """A unit that fools the images whose value is in `breaks`; it records every batch it gets."""
  def run_batch(x, y, key_data, carry):
    del y, key_data, carry
    if fail_at is not None and len(seen) == fail_at:
      raise RuntimeError("out of memory (simulated)")
    seen.append(np.asarray(x[:, 0, 0, 0]).astype(int))
    fooled = np.isin(np.asarray(x[:, 0, 0, 0]).astype(int), breaks)
    return jnp.asarray(fooled), x, None, 1, 2
  return cascade.Unit(name, run_batch)


def _toy_data(n):
  x = np.zeros((n, 1, 1, 1), np.float32) + np.arange(n, dtype=np.float32)[:, None, None, None]
  return x, np.zeros(n, np.int32), np.asarray(jax.random.key_data(
      jax.vmap(lambda i: jax.random.fold_in(KEY, i))(jnp.arange(n))))


def test_each_step_gets_the_survivors_of_the_whole_set_in_full_batches():
  n, batch = 50, 8
  x, y, keys = _toy_data(n)
  seen = {"a": [], "b": [], "c": []}
  eligible = np.arange(n) != 3
  steps = [cascade.Step(_toy_unit("a", np.arange(0, n, 2), seen["a"]), ("m",)),
           cascade.Step(_toy_unit("b", [1, 5, 7], seen["b"]), ("m",)),
           cascade.Step(_toy_unit("c", [], seen["c"]), ("m",))]
  result = cascade.run(steps, x, y, keys, eligible={"m": eligible}, batch_size=batch)
  first = np.concatenate(seen["a"])
  # Step a: every eligible image once; full batches of 8 then one batch of the 1 left (49 = 6*8+1).
  assert [len(b) for b in seen["a"]] == [8] * 6 + [1]
  assert sorted(first) == sorted(np.flatnonzero(eligible))
  # Step b: the 24 odd survivors (not 3) in 3 full batches; step c: the 21 left, 8 + 8 and
  # the rest of 5 in a batch of its own (padding 5 up to 8 would waste 3 rows).
  assert sorted(np.concatenate(seen["b"])) == [i for i in range(1, n, 2) if i != 3]
  assert [len(b) for b in seen["b"]] == [8, 8, 8]
  assert [len(b) for b in seen["c"]] == [8, 8, 5]
  real_c = sorted(set(np.concatenate(seen["c"])))
  assert real_c == [i for i in range(1, n, 2) if i not in (3, 1, 5, 7)]
  assert result.costs["c"]["images"] == 21 and result.costs["c"]["padding_rows"] == 0
  # Rows: (forward 1 + gradient 2) per batch row, padding included.
  assert result.costs["a"]["forward_rows"] == 49 and result.costs["a"]["gradient_rows"] == 98
  expected = eligible & (np.arange(n) % 2 == 0) | np.isin(np.arange(n), [1, 5, 7])
  np.testing.assert_array_equal(result.broken["m"], expected)


def test_the_units_of_one_attack_share_its_batch_sizes_and_another_attack_makes_its_own():
  x, y, keys = _toy_data(9)
  seen = {"t/1": [], "t/2": [], "t/3": [], "u": []}
  breaks = {"t/1": [0, 1, 2, 3], "t/2": [4], "t/3": [], "u": []}
  steps = [cascade.Step(_toy_unit(name, breaks[name], seen[name]), ("m",)) for name in seen]
  cascade.run(steps, x, y, keys, eligible={"m": np.ones(9, bool)}, batch_size=8)
  # t makes 8, 1 (t/1's rest) and 5 (t/2's): t/3's 4 images fill batches of 1 (3 sizes made);
  # u, another attack, makes a size of 4 of its own.
  assert [[len(b) for b in seen[name]] for name in seen] == [[8, 1], [5], [1, 1, 1, 1], [4]]


def _batches(shapes, rows):
  return [(len(take), len(padded)) for take, padded in shapes.batches(np.arange(rows))]


def test_a_rest_runs_in_one_batch_of_its_size_until_an_attack_has_made_three_sizes():
  shapes = cascade.BatchShapes(32, 1)
  assert _batches(shapes, 69) == [(32, 32), (32, 32), (5, 5)]  # the rest: a size of its own
  assert _batches(shapes, 5) == [(5, 5)]
  assert _batches(shapes, 31) == [(31, 32)]  # within 1/16 of a size made: padded to it
  assert _batches(shapes, 10) == [(5, 5), (5, 5)]  # two of a size made: no new size
  assert shapes.sizes == [32, 5]
  assert _batches(shapes, 3) == [(3, 3)]  # the third and last size
  assert shapes.sizes == [32, 5, 3]
  # Every size made: the largest that the rest fills, the last piece padded.
  assert _batches(shapes, 4) == [(3, 3), (1, 3)]
  assert _batches(shapes, 12) == [(5, 5), (5, 5), (2, 3)]
  assert _batches(shapes, 40) == [(32, 32), (5, 5), (3, 3)]
  assert shapes.sizes == [32, 5, 3]
  assert cascade.program("apgd-t/3") == cascade.program("apgd-t/10") == "apgd-t"


def test_batch_shapes_are_multiples_of_the_device_count():
  assert cascade.BatchShapes(100, 8).sizes == [104]
  shapes = cascade.BatchShapes(8, 4)
  assert _batches(shapes, 3) == [(3, 4)]  # one row per device at least
  assert _batches(shapes, 13) == [(8, 8), (5, 8)]  # 5 -> 8 is no new size: it would be 8 too
  assert _batches(shapes, 6) == [(6, 8)]
  assert shapes.sizes == [8, 4]


def test_a_shared_step_runs_once_on_the_images_standing_for_every_member():
  x, y, keys = _toy_data(10)
  seen = {"p": [], "q": [], "s": []}
  steps = [cascade.Step(_toy_unit("p", [0, 1], seen["p"]), ("main",)),
           cascade.Step(_toy_unit("q", [2], seen["q"]), ("joint",)),
           cascade.Step(_toy_unit("s", [5], seen["s"]), ("main", "joint"))]
  every = np.ones(10, bool)
  result = cascade.run(steps, x, y, keys, eligible={"main": every, "joint": every},
                       batch_size=16)
  assert sorted(np.concatenate(seen["s"])) == [3, 4, 5, 6, 7, 8, 9]
  # Image 2 fell to joint's own step: main's verdict there is cut short (an upper bound).
  np.testing.assert_array_equal(np.flatnonzero(result.cut["main"]), [2])
  np.testing.assert_array_equal(np.flatnonzero(result.cut["joint"]), [0, 1])
  np.testing.assert_array_equal(np.flatnonzero(result.broken["main"]), [0, 1, 5])


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


# ----------------------------------------------------------------------------- the report

W = jax.random.normal(jax.random.key(1), (48, 10)) / 7
ROWS = []


def _count_rows(rows):
  ROWS.append(int(rows))


def cas_like(x):
  """A CAS-like linear model: main logits and one CAS head's."""
  return apply_cas_like(W, x)


def counted_cas(x):
  """cas_like, counting the rows of every evaluation (a host callback: programs that call
  it are compiled in every process, the persistent cache cannot keep them)."""
  return apply_counted_cas(W, x)


def _report_data(n=40):
  rng = np.random.default_rng(0)
  x = rng.uniform(0.3, 0.7, (n, 4, 4, 3)).astype(np.float32)
  y = np.array(jnp.argmax(x.reshape(n, -1) @ W, -1), np.int32)
  y[:4] = (y[:4] + 1) % 10
  return x, y


BUDGET = AttackBudget(apgd_steps=4, fab_steps=3, square_queries=300, target_classes=2,
                      n_attack_population=8, n_attack_iters=5)


def _report(attacks, batch_size, model=counted_cas, **options):
  x, y = _report_data()
  return evaluate.robustness_report(model, x, y, key=KEY, eps=0.03, attacks=attacks,
                                    batch_size=batch_size, budget=BUDGET, **options)


@pytest.mark.slow
def test_the_report_counts_every_model_row_it_evaluates_and_not_the_batch():
  ROWS.clear()
  report = _report("pgd3,cw3,aa,aa-joint,md4", batch_size=16)
  jax.effects_barrier()
  total = report.costs["total"]
  assert sum(ROWS) == total["forward_rows"] + total["gradient_rows"]
  # FAB-T and Square serve both AutoAttack variants: one run each.
  stages = report.costs["stages"]
  assert stages["fab-t/2"]["attacks"] == ["aa", "aa-joint"]
  assert [n for n in stages if n.startswith("square")] == [
      "square/q0", "square/q10", "square/q30", "square/q70", "square/q150"]
  # Each chunk of queries runs on the images the chunks before left standing.
  assert stages["square/q10"]["images"] == stages["square/q0"]["images"] - stages[
      "square/q0"]["fooled"]
  # The same verdicts at another batch size (the model without its counter: cached programs).
  larger = _report("pgd3,cw3,aa,aa-joint,md4", batch_size=32, model=cas_like)
  for name in report.verdicts:
    chex.assert_trees_all_equal(report.verdicts[name], larger.verdicts[name])
  assert "| **total**" in report.markdown() and '"costs"' in report.to_json()


def test_a_transfer_attack_counts_its_source_rows_apart_from_the_models():
  SOURCE_ROWS.clear()
  ROWS.clear()
  report = _report("transfer-pgd3", batch_size=16, source_fn=counted_source)
  jax.effects_barrier()
  total, stage = report.costs["total"], report.costs["stages"]["transfer-pgd3"]
  assert sum(ROWS) == total["rows"] == total["forward_rows"] + total["gradient_rows"]
  assert sum(SOURCE_ROWS) == total["source_rows"] == stage["source_rows"] > 0
  assert total["gradient_rows"] == 0  # the evaluated model only judges: forward rows
  assert "| source rows |" in report.markdown()


SOURCE_ROWS = []


def counted_source(x):
  """A transfer source that counts its rows apart (host callback)."""
  jax.debug.callback(lambda rows: SOURCE_ROWS.append(int(rows)), x.shape[0])
  return x.reshape(x.shape[0], -1) @ (W + 0.01)


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


@pytest.mark.slow
def test_two_devices_evaluate_the_rows_of_one_with_the_same_verdicts():
  """The same verdicts; the rows the report counts are those the model saw (a debug callback
  in it, each device's shard), and 2 devices do the rows of 1 plus their padding."""
  two = fake_devices.run_script("eval_devices_check.py", 2)
  one = fake_devices.run_script("eval_devices_check.py", 1)
  for name in ("natural", "aa", "aa-joint", "worst_case"):
    np.testing.assert_array_equal(one[name], two[name])
  for run in (one, two):
    assert int(run["rows"]) == int(run["seen"])
  assert int(one["padding"]) == 0 < int(two["padding"])
  assert int(two["rows"]) - int(two["padding"]) == int(one["rows"])


def _apply_linear(weights, x):
  return x.reshape(x.shape[0], -1) @ weights


def test_a_public_attack_compiles_once_for_a_partial_model_whatever_its_weights():
  from cas_jax.attacks.white_box import pgd  # pylint: disable=g-import-not-at-top
  x, y = _report_data(8)
  before = pgd.jitted._cache_size()
  for seed in (1, 2, 3):
    weights = jax.random.normal(jax.random.key(seed), (48, 10))
    pgd(jax.tree_util.Partial(_apply_linear, weights), x, y, eps=0.03, steps=3, key=KEY)
  assert pgd.jitted._cache_size() == before + 1


@pytest.mark.slow
def test_compilations_do_not_grow_with_the_number_of_images():
  from cas_jax.evaluation import attack_plan  # pylint: disable=g-import-not-at-top
  model = jax.tree_util.Partial(_apply_linear, W)
  for n in (40, 90, 200):
    jax.clear_caches()
    x, y = _report_data(n)
    evaluate.robustness_report(model, x, y, key=KEY, eps=0.03, attacks="pgd2", batch_size=8,
                               budget=BUDGET)
    # At most one compilation per batch size of the report (three at most), whatever the
    # images and batches: 200 images with 65 left for PGD are 9 batches, not 65.
    assert attack_plan._single_attack._cache_size() <= 3  # pylint: disable=protected-access


def apply_counted_cas(w, x):
  """apply_cas_like, counting its rows as counted_cas does."""
  jax.debug.callback(_count_rows, x.shape[0])
  return apply_cas_like(w, x)


def apply_cas_like(w, x):
  """cas_like with its weights as an argument (a module-level function for a Partial)."""
  z = x.reshape(x.shape[0], -1) @ w
  return z, (0.5 * z,)


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
