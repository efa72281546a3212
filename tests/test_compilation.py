"""Compilations are counted (JAX's monitoring events), bounded per program, and cached on disk."""
import importlib
import json
import os
import subprocess
import sys

import chex
import flax.linen as nn
import jax
import numpy as np
import pytest

from cas_jax import compilation
from cas_jax.attacks import cascade
from cas_jax.attacks import engine
from cas_jax.attacks import verdicts
from cas_jax.evaluation import evaluate
from cas_jax.evaluation.attack_registry import AttackBudget
import fake_devices
from test_cascade import KEY, W, _report_data


def apply_cas(w, x):
  """A linear model with one CAS-like head (so the default report runs aa-joint too)."""
  z = x.reshape(x.shape[0], -1) @ w
  return z, (0.5 * z,)


def _default_report(n, target_classes, batch_size=16, batch_shapes=None):
  model = jax.tree_util.Partial(apply_cas, W)
  x, y = _report_data(n)
  budget = AttackBudget(apgd_steps=3, fab_steps=3, square_queries=40,
                        target_classes=target_classes)
  with compilation.counted() as stats:
    report = evaluate.robustness_report(model, x, y, key=KEY, eps=0.02, attacks="default",
                                        batch_size=batch_size, budget=budget,
                                        batch_shapes=batch_shapes)
  return report, stats


def _count(stats, program):
  return sum(c for name, c in stats.counts.items() if name == f"jit({program})")


def test_each_program_compiles_once_per_batch_shape_whatever_the_targets():
  jax.clear_caches()
  batch_shapes = {}
  report, stats = _default_report(40, target_classes=2, batch_shapes=batch_shapes)
  shapes = 3  # a stage's batch sizes (cascade.BatchShapes)
  assert report.verdicts["aa"].sum() < report.verdicts["natural"].sum()  # AutoAttack did work
  # Distinct computations: APGD once (its 4 stages, CE and targeted DLR each main and joint,
  # the loss picked by a traced index: one compilation per batch size any of them made, at
  # most 3 + 2 per further stage), FAB-T once (shared by aa and aa-joint; its targets and
  # restarts traced), Square once (its start a traced branch of every chunk), and PGD once
  # for the report's pgd20 and cw (the loss traced).
  apgd_sizes = batch_shapes["apgd", 16].sizes
  assert len(apgd_sizes) <= shapes + 2 * 3
  bounds = {"apgd_round": len(apgd_sizes), "fab_round": shapes, "_square_chunk": shapes,
            "_single_attack": shapes, "correct": shapes}
  for program, bound in bounds.items():
    assert 1 <= _count(stats, program) <= bound, (program, apgd_sizes, stats.as_dict())
  # More targets (and so more rounds of APGD-T and FAB-T) compile nothing more: a target's
  # rank is a traced value, not a static argument of the program.
  jax.clear_caches()
  _, more = _default_report(40, target_classes=5)
  for program in ("apgd_round", "fab_round"):
    assert _count(more, program) == _count(stats, program), (program, more.as_dict())


# What a report may compile: its attack and verdict programs, its per-image keys, and the
# key streams its units fold (one small program per batch shape).
REPORT_PROGRAMS = {"apgd_round", "fab_round", "_square_chunk", "_single_attack", "correct",
                   "_report_key_data"}
KEY_FOLDING = {"_threefry_fold_in", "convert_element_type"}


def test_a_report_compiles_no_one_op_programs_for_its_bookkeeping():
  """Moving batches to the device, inverting verdicts and adding up rows happen on the host:
  in JAX each of them (jnp.asarray, ~, + on device arrays) compiles a program of its own per
  shape, which a full-width network's cold run paid for in tens of compilations."""
  jax.clear_caches()
  _, stats = _default_report(40, target_classes=2)
  compiled = {name[len("jit("):-1] for name in stats.counts}
  assert compiled - KEY_FOLDING == REPORT_PROGRAMS, stats.as_dict()
  assert sum(stats.counts[f"jit({name})"] for name in compiled & KEY_FOLDING) <= 2 * 3, (
      stats.as_dict())  # at most one fold (and its integer cast) per batch size


def test_loading_a_torch_checkpoint_compiles_nothing():
  """The weights go to the device as they are (jax.device_put), not through a staging program
  per distinct shape (jnp.asarray: 20 of them for a ResNet-18)."""
  from cas_jax import models  # pylint: disable=g-import-not-at-top
  from cas_jax.models import interop  # pylint: disable=g-import-not-at-top
  model = models.create("resnet18", width=4, cas_stages=())
  variables = jax.jit(lambda: model.init(KEY, np.zeros((1, 32, 32, 3), np.float32),
                                         train=False))()
  state_dict = interop.to_torch_state_dict("resnet18", variables)  # numpy, torch's layout
  jax.clear_caches()
  with compilation.counted() as stats:
    loaded = interop.from_torch_state_dict("resnet18", state_dict, width=4, cas_stages=())
  assert stats.total == 0, stats.as_dict()
  chex.assert_trees_all_equal(loaded, variables)


def test_the_verdicts_compile_for_three_batch_sizes_whatever_sizes_the_attacks_ran_at():
  """A judge with BatchShapes cuts and pads each batch to its sizes: the verdict program
  compiles for 3 of them, the verdicts are the unpadded ones and the padding is counted."""
  jax.clear_caches()
  x, y = _report_data(16)
  keys = jax.random.split(KEY, 16)
  check = verdicts.judge(jax.tree_util.Partial(apply_cas, W), None, 0,
                         cascade.BatchShapes(16, devices=1))
  padding = 0
  with compilation.counted() as stats:
    for n in (16, 13, 11, 9, 7, 5, 3, 2):  # sizes 16, 13 and 11 are made; the rest pad to 11
      # As an attack hands them over: its images committed to a device, the labels not.
      x_adv = jax.device_put(x[:n], jax.devices()[0])
      still, passes, padded = check(x_adv, jax.numpy.asarray(y[:n]), keys[:n])
      np.testing.assert_array_equal(still, np.argmax(x[:n].reshape(n, -1) @ W, -1) == y[:n])
      assert passes == 1
      padding += padded
  assert _count(stats, "correct") == 3, stats.as_dict()
  assert padding == (11 - 9) + (11 - 7) + (11 - 5) + (11 - 3) + (11 - 2)


def test_a_report_traces_the_model_once_per_batch_shape():
  """The natural pass, every attack program (start, loop, final check) and the judge reuse one
  trace of the model per input shape (engine.traced_once): the network is not traced again
  from Python at each call site."""
  traced = []

  def counted_apply(w, x):
    traced.append(x.shape[0])
    return apply_cas(w, x)
  x, y = _report_data(40)
  budget = AttackBudget(apgd_steps=3, fab_steps=3, square_queries=40, target_classes=2)
  report = evaluate.robustness_report(jax.tree_util.Partial(counted_apply, W), x, y, key=KEY,
                                      eps=0.02, attacks="default", batch_size=16, budget=budget)
  assert report.verdicts["aa"].sum() < report.verdicts["natural"].sum()  # the attacks ran
  assert len(traced) == len(set(traced)), traced  # each shape once (41 traces without it)


class _TinyCas(nn.Module):
  """A flax model with a CAS-like head, bound the way checkpoints are (evaluate.bind_model)."""

  @nn.compact
  def __call__(self, x, train=False):
    z = nn.Dense(10)(x.reshape(x.shape[0], -1))
    return z, (0.5 * z,)


def test_a_second_checkpoint_of_a_model_reuses_every_compiled_program():
  """bind_model makes a new Partial per checkpoint; its function's jit (engine.traced_once)
  is shared by equal partials, so the attack programs are not compiled again."""
  x, y = _report_data(24)
  model = _TinyCas()
  variables = model.init(KEY, x[:1])
  budget = AttackBudget(apgd_steps=3, fab_steps=3, square_queries=40, target_classes=2)
  report = lambda v: evaluate.robustness_report(evaluate.bind_model(model, v), x, y, key=KEY,
                                                eps=0.02, attacks="default", batch_size=16,
                                                budget=budget)
  first = report(variables)
  assert first.verdicts["aa"].sum() < first.verdicts["natural"].sum()  # the attacks ran
  with compilation.counted() as stats:
    report(jax.tree.map(np.array, variables))  # another checkpoint with these values
  for program in ("apgd_round", "fab_round", "_square_chunk", "_single_attack", "correct"):
    assert _count(stats, program) == 0, (program, stats.as_dict())


def test_plus_compiles_one_apgd_program_and_one_per_fab_kind_whatever_the_restarts():
  """aa-plus runs 5 restarts of APGD-CE, APGD-DLR and FAB and 3 targets of APGD-T and FAB-T:
  restarts, targets and APGD's loss are traced values, so APGD compiles once for its three
  losses (CE, DLR, targeted DLR) and FAB once targeted and once untargeted, per batch shape."""
  jax.clear_caches()
  x, y = _report_data(40)
  budget = AttackBudget(apgd_steps=3, fab_steps=3, square_queries=40, target_classes=3)
  with compilation.counted() as stats:
    report = evaluate.robustness_report(jax.tree_util.Partial(apply_cas, W), x, y, key=KEY,
                                        eps=0.02, attacks="aa-plus", batch_size=16,
                                        budget=budget)
  assert report.verdicts["aa-plus"].sum() < report.verdicts["natural"].sum()
  shapes = 3
  for program, bound in {"apgd_round": shapes + 2 * 2, "fab_round": 2 * shapes}.items():
    assert 1 <= _count(stats, program) <= bound, (program, stats.as_dict())


def test_the_counter_sees_every_compilation_and_only_those_inside_it():
  f = jax.jit(lambda v: v * 2 + 1)
  with compilation.counted() as stats:
    f(np.ones(3, np.float32))
    f(np.ones(3, np.float32))  # cached: no compilation
    f(np.ones(5, np.float32))  # a new shape: one more
  assert stats.counts.get("jit(<lambda>)") == 2 and stats.total_seconds > 0
  with compilation.counted() as again:
    f(np.ones(5, np.float32))
  assert again.total == 0


def test_cache_dir_follows_the_environment_then_the_config(monkeypatch, tmp_path):
  monkeypatch.delenv(compilation.ENV, raising=False)
  assert compilation.cache_dir(None) == os.path.expanduser("~/.cache/cas_jax/jax")
  assert compilation.cache_dir(str(tmp_path)) == str(tmp_path)
  assert compilation.cache_dir("off") is None
  monkeypatch.setenv(compilation.ENV, str(tmp_path / "env"))
  assert compilation.cache_dir(str(tmp_path)) == str(tmp_path / "env")
  monkeypatch.setenv(compilation.ENV, "off")
  assert compilation.cache_dir(str(tmp_path)) is None


def test_compiled_programs_are_kept_until_the_process_nears_the_mapping_limit(monkeypatch):
  f = jax.jit(lambda v: v - 1)
  f(np.ones(2, np.float32))
  held, limit = compilation.memory_mappings()
  if held is None or limit is None:
    pytest.skip("no /proc: the policy clears after every model there")
  assert 0 < held < limit
  assert not compilation.free_compiled_programs_if_crowded()  # a test process: far below
  with compilation.counted() as kept:
    f(np.ones(2, np.float32))
  assert kept.total == 0
  assert compilation.free_compiled_programs_if_crowded(fraction=held / limit / 2)
  with compilation.counted() as cleared:
    f(np.ones(2, np.float32))
  assert cleared.total == 1  # freed: the next call compiles again
  monkeypatch.setattr(compilation, "memory_mappings", lambda: (None, None))
  assert compilation.free_compiled_programs_if_crowded()  # cannot tell: clears


SCRIPT = """
import json, sys
import jax, numpy as np
sys.path.insert(0, {tests!r})
from cas_jax import compilation
from cas_jax.attacks import cascade
from cas_jax.attacks import verdicts
folder = compilation.use_persistent_cache()  # the folder CAS_JAX_COMPILATION_CACHE names
import test_compilation
report, stats = test_compilation._default_report(24, target_classes=2)
print(json.dumps({{"folder": folder, "hits": stats.cache_hits, "compilations": stats.total,
                  "seconds": stats.total_seconds,
                  "verdicts": {{k: v.tolist() for k, v in report.verdicts.items()}}}}))
"""


@pytest.mark.slow
def test_a_second_process_fetches_the_programs_from_the_persistent_cache(tmp_path):
  folder = str(tmp_path / "cache")
  script = SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)))
  env = {k: v for k, v in fake_devices.environment(1).items() if not k.startswith("JAX_")}
  env[compilation.ENV] = folder
  runs = []
  for _ in range(2):
    done = subprocess.run([sys.executable, "-c", script], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
  first, second = runs
  assert first["folder"] == folder and os.listdir(folder)
  assert first["hits"] == 0
  # Every program the first process compiled comes from the disk in the second.
  assert second["hits"] >= 0.9 * first["compilations"], (first, second)
  assert second["seconds"] < first["seconds"] / 3, (first, second)
  assert second["verdicts"] == first["verdicts"]


def _model_calls(jaxpr, name):
  """(outside any loop, inside one): calls of the jitted function `name` in a jaxpr."""
  outside = inside = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("pjit", "jit") and eqn.params.get("name") == name:
      outside += 1
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      sub_outside, sub_inside = _model_calls(sub, name)
      if eqn.primitive.name in ("scan", "while"):
        inside += sub_outside + sub_inside
      else:
        outside, inside = outside + sub_outside, inside + sub_inside
  return outside, inside


def test_apgd_differentiates_the_model_inside_its_loop_only():
  """APGD evaluates its start inside its loop: the model (and so its backward pass, which
  XLA compiles wherever it appears) is in the program once, not once more before the loop."""
  apgd_module = importlib.import_module("cas_jax.attacks.apgd")
  w = np.asarray(W[:, :4])

  def tiny_linear(x):
    return x.reshape(x.shape[0], -1) @ w
  x, y = _report_data(3)
  keys = jax.random.split(KEY, 3)
  run = lambda x: apgd_module.apgd_run.jitted(engine.as_partial(tiny_linear), x, y, y, keys, x,
                                              0.02, steps=3, loss="ce", beta=2.0)
  outside, inside = _model_calls(jax.make_jaxpr(run)(x).jaxpr, "tiny_linear")
  assert (outside, inside) == (0, 2), (outside, inside)  # its forward and its transpose


THREEFRY_SCRIPT = """
import json
import jax
from cas_jax import compilation
draws = lambda k: (jax.random.uniform(jax.random.fold_in(k, 7), (1000,)),
                   jax.random.key_data(jax.random.split(k, 4)))
key = jax.random.key(3)
rolled = jax.jit(draws)
before, before_text = rolled(key), rolled.lower(key).compile().as_text()
switched = compilation.use_unrolled_threefry_on_cpu()
unrolled = jax.jit(lambda k: draws(k))  # a new function: traced and lowered again
after, after_text = unrolled(key), unrolled.lower(key).compile().as_text()
print(json.dumps({"switched": switched, "loop_before": " while(" in before_text,
                  "loop_after": " while(" in after_text,
                  "same": all(bool((a == b).all()) for a, b in zip(before, after))}))
"""


def test_unrolled_threefry_draws_the_same_bits_without_a_loop():
  """compilation.use_unrolled_threefry_on_cpu (the CLI commands call it) changes how XLA:CPU
  compiles the threefry hash, not what it computes: the same uniforms and split keys, and no
  while loop left in the program (jax's CPU default has one per threefry call)."""
  env = {k: v for k, v in fake_devices.environment(1).items() if not k.startswith("JAX_")}
  env["JAX_PLATFORMS"] = "cpu"
  done = subprocess.run([sys.executable, "-c", THREEFRY_SCRIPT], env=env, capture_output=True,
                        text=True, timeout=300, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  seen = json.loads(done.stdout.strip().splitlines()[-1])
  assert seen == {"switched": True, "loop_before": True, "loop_after": False, "same": True}


def test_fab_projects_both_points_of_a_step_in_one_loop():
  """Each FAB step projects its iterate and the original image onto the same hyperplane; as one
  call of the projection over both (its rows are independent), its Newton loop is compiled
  once, not twice (FAB's own loop has a fixed count: a scan, not a while loop)."""
  from test_attack_losses import _count_primitive  # pylint: disable=g-import-not-at-top
  fab_module = importlib.import_module("cas_jax.attacks.fab")
  x, y = _report_data(3)
  keys = jax.random.split(KEY, 3)
  jaxpr = jax.make_jaxpr(lambda x: fab_module.fab_round.jitted(
      jax.tree_util.Partial(apply_cas, W), x, y, keys, 0.02, steps=3, rank=2))(x).jaxpr
  assert _count_primitive(jaxpr, "while") == 1  # the projection's Newton loop
