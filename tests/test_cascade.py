"""The survivor cascade and the scheduled report: survivors gathered over the whole set into
full batches, bounded compilations, model rows counted exactly (resume: test_cascade_resume)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
  unit = lambda name, program=None: cascade.Unit(name, None, program=program)
  assert cascade.program(unit("fab-t/3")) == cascade.program(unit("fab-t/10")) == "fab-t"
  assert cascade.program(unit("apgd-t/3", "apgd")) == "apgd"


def test_stages_sharing_a_program_share_its_sizes_and_make_two_more_each():
  """APGD's stages run one program: a size one made serves the others, and each may still
  make 2 of its own, so that none pads its rests into another's (twice the rows at worst)."""
  shapes = cascade.BatchShapes(32, 1)
  batches = lambda rows, owner: [(len(t), len(p)) for t, p in shapes.batches(np.arange(rows),
                                                                            owner)]
  assert batches(5, "apgd-ce") == [(5, 5)]
  assert batches(5, "apgd-t") == [(5, 5)]  # apgd-ce's size, nothing new
  assert batches(3, "apgd-ce") == [(3, 3)]  # apgd-ce's second and last
  assert batches(2, "apgd-ce") == [(2, 3)]  # padded: apgd-ce made its 2
  assert batches(2, "apgd-t") == [(2, 2)]  # apgd-t still may
  assert shapes.sizes == [32, 5, 3, 2]


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
