"""Robustness reports: worst case over attacks, batch independence, CAS-aware AutoAttack (sanity
flags: tests/test_report_sanity.py).

Hand-built linear models on 4x4x3 images whose gradient is switched off (stop_gradient) on
half of the images: a gradient attack cannot move there, a query-based or transfer attack can.
Small budgets throughout; the same model functions are reused so that compilations are shared.
"""
import dataclasses
import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cas_jax.attacks import engine
from cas_jax.evaluation import evaluate
from cas_jax.evaluation import report as report_lib
from cas_jax.training import train
from cas_jax.evaluation.attack_registry import AttackBudget
import fake_devices
from test_train import tiny_config

N, EPS = 16, 0.1
W = jax.random.normal(jax.random.key(0), (48, 10)) / 7
BUDGET = AttackBudget(apgd_steps=5, fab_steps=5, square_queries=10, target_classes=2,
                      n_attack_population=20, n_attack_iters=100)
KEY = jax.random.key(0)


def linear(x):
  return x.reshape(x.shape[0], -1) @ W


def is_masked(x):
  return x[:, 0, 0, 0] > 0.5  # the marker pixel is 0 or 1: eps cannot flip it


def masked(x):
  """The linear model, with no gradient on the odd (marked) images."""
  z = linear(x)
  return jnp.where(is_masked(x)[:, None], jax.lax.stop_gradient(z), z)


def masked_source(x):
  """A transfer source with no gradient on the even images: the complement of `masked`."""
  z = linear(x)
  return jnp.where(is_masked(x)[:, None], z, jax.lax.stop_gradient(z))


def main_masked_cas(x):
  """A CAS-like model: no gradient through the main head; the CAS head carries the same logits."""
  z = linear(x)
  return jax.lax.stop_gradient(z), (z,)


def _data():
  rng = np.random.default_rng(0)
  x = rng.uniform(0.3, 0.7, (N, 4, 4, 3)).astype(np.float32)
  x[:, 0, 0, 0] = np.arange(N) % 2
  return x, np.asarray(jnp.argmax(linear(jnp.asarray(x)), -1), np.int32)


X, Y = _data()
ODD = np.arange(N) % 2 == 1


def report_of(apply_fn, attacks, batch_size=8, **options):
  options.setdefault("budget", BUDGET)
  return evaluate.robustness_report(apply_fn, X, Y, key=KEY, eps=EPS, attacks=attacks,
                                    batch_size=batch_size, **options)


@pytest.fixture(scope="module")
def masked_reports():
  """The same attacks on the masked model at batch sizes 4 and 8."""
  return {bs: report_of(masked, "pgd20,fgsm,transfer-pgd,n-attack", batch_size=bs,
                        source_fn=masked_source) for bs in (4, 8)}


def test_worst_case_is_the_intersection_and_names_the_attack(masked_reports):
  report = masked_reports[8]
  v = report.verdicts
  assert v["natural"].all()
  # No gradient on the odd images: PGD fails on every one of them and breaks even ones.
  assert v["pgd20"][ODD].all() and not v["pgd20"][~ODD].any()
  # The transfer source has no gradient on the even images: the complement.
  assert v["transfer-pgd"][~ODD].all() and not v["transfer-pgd"][ODD].all()
  chex.assert_trees_all_equal(v["worst_case"], v["natural"] & v["pgd20"] & v["transfer-pgd"]
                              & v["n-attack"])
  # Expensive attacks run only on images the cheap ones left standing: an upper bound.
  ran = report.ran_on["n-attack"]
  chex.assert_trees_all_equal(ran, v["pgd20"] & v["transfer-pgd"])
  assert ran.sum() == 3 and not ran[~ODD].any()
  # N-Attack queries, never differentiates: it breaks the odd images neither attack could.
  assert not v["n-attack"][ran].any() and v["n-attack"][~ran].all()
  assert report.accuracy("worst_case") == 0.0
  assert not report.is_exact("n-attack") and "<= " in report.figure("n-attack")
  gap = [w for w in report.sanity if w.startswith("the worst case")]
  assert len(gap) == 1 and "pgd20 (50.0%)" in gap[0]
  assert "transfer-pgd (" in gap[0] and "n-attack (" in gap[0]
  assert "| **worst case**" in report.table()


def test_verdicts_do_not_depend_on_the_batch_size(masked_reports):
  small, large = masked_reports[4], masked_reports[8]
  assert list(small.verdicts) == ["natural", "pgd20", "fgsm", "transfer-pgd", "n-attack",
                                  "worst_case"]
  for name in small.verdicts:
    chex.assert_shape(small.verdicts[name], (N,))
    chex.assert_trees_all_equal(small.verdicts[name], large.verdicts[name])
  chex.assert_trees_all_equal(small.ran_on, large.ran_on)


def test_exact_per_attack_runs_expensive_attacks_on_every_clean_correct_image():
  report = report_of(masked, "pgd20,n-attack", exact_per_attack=True)
  chex.assert_trees_all_equal(report.ran_on["n-attack"], report.verdicts["natural"])
  assert report.is_exact("n-attack") and report.accuracy("n-attack") == 0.0
  # Stronger than the white-box attack: the black-box flag fires.
  assert any("black-box attack n-attack" in w for w in report.sanity)


def test_joint_autoattack_reaches_the_cas_heads():
  report = report_of(main_masked_cas, "pgd20-main,aa,aa-joint")
  v = report.verdicts
  assert v["pgd20-main"].all()  # the main head gives no gradient
  # AutoAttack on the joint losses ascends through the CAS head, the main one cannot.
  assert v["aa-joint"].sum() < v["aa"].sum()
  assert not v["aa-joint"].any()
  # Both AutoAttack variants ran on the same images, so their figures compare.
  chex.assert_trees_all_equal(report.ran_on["aa"], report.ran_on["aa-joint"])
  assert any(w.startswith("AutoAttack on the joint losses (aa-joint)") for w in report.sanity)


def _stage_names(report):
  return list(report.costs["stages"])


def test_plain_model_runs_coinciding_attacks_once():
  plain = report_of(linear, "default,pgd20-main", batch_size=N)
  assert list(plain.verdicts) == ["natural", "pgd20", "cw", "aa", "worst_case"]
  assert not any("joint" in name for name in _stage_names(plain))  # one AutoAttack
  assert any(n.startswith("aa-joint coincides with aa") for n in plain.notes)
  assert any(n.startswith("pgd20-main coincides with pgd20") for n in plain.notes)
  cas = report_of(main_masked_cas, "default", batch_size=N)
  assert list(cas.verdicts) == ["natural", "pgd20", "cw", "aa", "aa-joint", "worst_case"]
  stages = cas.costs["stages"]
  assert stages["apgd-ce"]["attacks"] == ["aa"] and stages["apgd-ce-joint"]["attacks"] == [
      "aa-joint"]
  shared = [n for n in stages if n.startswith(("fab-t", "square"))]
  assert shared and all(stages[n]["attacks"] == ["aa", "aa-joint"] for n in shared)


def test_json_round_trips_every_verdict(masked_reports):
  report = masked_reports[8]
  data = json.loads(report.to_json())
  assert data["verdicts"]["n-attack"] == [bool(v) for v in report.verdicts["n-attack"]]
  assert data["exact"]["n-attack"] is False
  again = report_lib.Report.from_json(report.to_json())
  chex.assert_trees_all_equal(again.verdicts, report.verdicts)
  chex.assert_trees_all_equal(again.ran_on, report.ran_on)
  assert again.markdown() == report.markdown()


# ----------------------------------------------------------------------------- workdirs


def test_missing_checkpoint_names_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match="train first with the same command"):
    evaluate.evaluate_workdir(tiny_config(), str(tmp_path))
  assert not os.path.exists(tmp_path / "checkpoints")


def test_end_to_end_train_then_evaluate_workdir(tmp_path):
  result = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__),
                                                        "eval_workdir_check.py"), str(tmp_path)],
                          env=fake_devices.environment(1), capture_output=True, text=True,
                          timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  # One epoch: last and best are the same checkpoint, evaluated once and written twice.
  assert "labels: best,last" in result.stdout
  names = ["natural", "pgd20", "cw", "aa", "aa-joint", "worst_case"]
  for label in ("last", "best"):
    data = json.loads((tmp_path / "eval" / f"{label}_report.json").read_text())
    assert list(data["verdicts"]) == names
    assert all(len(v) == 16 for v in data["verdicts"].values())
    markdown = (tmp_path / "eval" / f"{label}_report.md").read_text()
    assert "| **worst case**" in markdown and "## Sanity report" in markdown
    assert "Provenance: cas_jax" in markdown and "## Cost" in markdown
    assert data["provenance"]["versions"]["jax"] == jax.__version__
    assert data["provenance"]["training_runs"]  # the workdir's training run is named
  assert "| aa-joint: AutoAttack standard, joint losses |" in result.stdout


def test_evaluates_a_pytorch_checkpoint_of_the_authors_layout(tmp_path):
  torch = pytest.importorskip("torch")
  import test_interop  # pylint: disable=g-import-not-at-top  (needs torch)
  from cas_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  net = test_interop._randomised(test_interop.TorchResNet18(width=4)).eval()
  with torch.no_grad():  # input-dependent predictions, so the verdicts are not all equal
    net.linear.weight.mul_(100.0)
    net.linear.bias.zero_()
  path = tmp_path / "resnet18_cas.pth"
  torch.save({"state_dict": net.state_dict()}, path)
  config = tiny_config(image_size=32)
  config.eval.torch_checkpoint = str(path)
  config.eval.report_images = 16
  config.eval.attacks = "pgd3,cw3"
  reports = evaluate.evaluate_workdir(config, str(tmp_path / "work"))
  report = reports["resnet18_cas"]
  dataset = input_pipeline.create_dataset(config)
  images = dataset.test_images[:16].astype(np.float32) / 255
  with torch.no_grad():
    logits = net(torch.from_numpy(images.transpose(0, 3, 1, 2)))
  logits = logits[0] if isinstance(logits, tuple) else logits
  expected = logits.argmax(-1).numpy() == dataset.test_labels[:16]
  assert 0 < expected.sum() < 16  # both verdicts occur: the comparison can fail
  np.testing.assert_array_equal(report.verdicts["natural"], expected)
  assert (tmp_path / "work" / "eval" / "resnet18_cas_report.json").exists()


def test_verdicts_do_not_depend_on_the_device_count():
  one, four = (fake_devices.run_script("eval_devices_check.py", n, "uncounted") for n in (1, 4))
  counts = ("devices", "rows", "padding", "seen", "natural_rows")  # padding differs
  names = [n for n in one.files if n not in counts]
  assert {"natural", "pgd5", "cw5", "aa", "aa-joint", "worst_case"} <= set(names)
  for name in names:
    np.testing.assert_array_equal(one[name], four[name], err_msg=name)
  assert 0 < one["rugged:pgd5"].sum() < one["rugged:natural"].sum()  # not fixed outcomes


def test_per_epoch_accuracy_matches_a_direct_computation():
  from cas_jax import input_pipeline, models  # pylint: disable=g-import-not-at-top
  from cas_jax.attacks import engine, white_box  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  config.eval.num_images, config.eval_batch_size = 12, 8  # two batches, the second padded
  config.eval.eps = 0.3  # large enough to flip some predictions of this untrained network
  dataset = input_pipeline.create_dataset(config)
  model = models.from_config(config, 10)
  variables = model.init(jax.random.key(0), dataset.test_images[:1] / 255.0, train=False)
  variables["params"]["linear"]["kernel"] *= 300.0  # input-dependent predictions
  apply_fn = evaluate.bind_model(model, variables)
  # Labels: the prediction on even images, another class on odd ones (half correct).
  predicted = np.asarray(jnp.argmax(apply_fn(dataset.test_images / np.float32(255))[0], -1))
  labels = np.where(np.arange(predicted.size) % 2 == 0, predicted, (predicted + 1) % 10)
  dataset = dataclasses.replace(dataset, test_labels=labels.astype(np.int32))
  key = jax.random.PRNGKey(3)
  result = evaluate.natural_and_pgd_accuracy(apply_fn, dataset, config, key=key)
  x = jnp.asarray(dataset.test_images[:12], jnp.float32) / 255
  y = jnp.asarray(dataset.test_labels[:12])
  natural = np.asarray(jnp.argmax(apply_fn(x)[0], -1) == y)
  x_adv = white_box.pgd(apply_fn, x, y, eps=0.3, steps=2, loss="joint_ce", beta=2.0,
                        key=engine.index_keys(key, jnp.arange(12)))
  robust = np.asarray(jnp.argmax(apply_fn(x_adv)[0], -1) == y)
  assert natural.sum() == 6 and robust.sum() < 6  # the attack changes something
  assert result == {"natural_acc": pytest.approx(natural.mean()),
                    "pgd_acc": pytest.approx(robust.mean()), "eval_images": 12}


@pytest.mark.slow
def test_a_bfloat16_model_is_evaluated_in_float32_unless_eval_dtype_says_otherwise(tmp_path):
  from cas_jax import input_pipeline, models  # pylint: disable=g-import-not-at-top
  from cas_jax.models import loading  # pylint: disable=g-import-not-at-top
  from test_fault_tolerance import small_config  # pylint: disable=g-import-not-at-top
  evaluation = {"model.dtype": "bfloat16", "schedule.num_epochs": 1, "eval.attacks": "pgd2",
                "eval.report_images": 16, "eval.checkpoints": "last", "eval.progress": False}
  config = small_config(**evaluation)
  train.train_and_evaluate(config, str(tmp_path))
  report = evaluate.evaluate_workdir(config, str(tmp_path))["last"]
  assert report.title.endswith("computed in float32")
  # The natural verdicts are the float32 network's on the trained weights, computed here.
  float32 = small_config(**{**evaluation, "model.dtype": "float32"})
  dataset = input_pipeline.create_dataset(float32)
  loaded = loading.load(float32, str(tmp_path), dataset.num_classes,
                        dataset.test_images.shape[1:])
  x = dataset.test_images[:16].astype(np.float32) / np.float32(255)
  logits, _ = loaded.model.apply(loaded.variables, x, train=False)
  assert logits.dtype == jnp.float32
  np.testing.assert_array_equal(report.verdicts["natural"],
                                np.argmax(logits, -1) == dataset.test_labels[:16])
  assert models.from_config(config, 10).dtype == jnp.bfloat16  # the trained network's
  config.eval.dtype = ""  # the training dtype
  again = evaluate.evaluate_workdir(config, str(tmp_path), out_dir=str(tmp_path / "bf16"))
  assert again["last"].title.endswith("computed in bfloat16")


V = jax.random.normal(jax.random.key(3), (48, 10))


def rugged(x):
  """The linear model plus a fast ripple: where APGD ends depends on its random start."""
  flat = x.reshape(x.shape[0], -1)
  return linear(x) + 0.03 * jnp.sin(1000.0 * flat) @ V


@pytest.mark.parametrize("model_fn,attack,loss,eps", [
    (masked, "aa", "main", EPS), (main_masked_cas, "aa-joint", "joint", 0.02),
    (rugged, "apgd-ce", "main", 0.003)])
def test_public_autoattack_and_the_report_give_the_same_verdicts(model_fn, attack, loss, eps):
  """One assembler: autoattack() runs a report's stages, random streams and judge (on
  `rugged`, apgd-ce's verdicts change with the random stream: keys 0 and 1 differ)."""
  from cas_jax.attacks.autoattack import autoattack  # pylint: disable=g-import-not-at-top
  y = np.asarray(jnp.argmax(engine.main_logits(model_fn, jnp.asarray(X)), -1), np.int32)
  public = lambda key: autoattack(
      model_fn, X, y, eps=eps, key=key, loss=loss, return_per_attack=True,
      attacks=None if attack.startswith("aa") else (attack,), apgd_steps=BUDGET.apgd_steps,
      fab_steps=BUDGET.fab_steps, square_queries=BUDGET.square_queries,
      target_classes=BUDGET.target_classes)[1]
  robust = public(KEY)
  report = evaluate.robustness_report(model_fn, X, y, key=KEY, eps=eps, attacks=attack,
                                      batch_size=8, budget=BUDGET)
  verdicts = np.asarray(report.verdicts[attack])
  np.testing.assert_array_equal(robust[list(robust)[-1]], verdicts)
  assert 0 < verdicts.sum() < robust["clean"].sum() or attack == "apgd-ce"
  if model_fn is rugged:
    assert np.any(public(jax.random.key(1))["apgd-ce"] != verdicts)


def test_verdicts_of_a_model_without_fixed_outcomes_do_not_depend_on_the_batch_size():
  """On `rugged` the verdicts depend on each image's random stream (another key changes them);
  at batch sizes 3, 7 and 16 (other bucket shapes, other neighbours in each batch) they stay
  the same. Padding (a rest smaller than the device count) is exercised on 2 and 4 devices
  (eval_devices_check.py, 15 images)."""
  y = np.asarray(jnp.argmax(rugged(jnp.asarray(X)), -1), np.int32)
  attacks = "pgd5,apgd-ce,square"  # eps 0.001: 2 to 5 of 16 pgd5 verdicts change with the key
  report = lambda batch_size, key=KEY: evaluate.robustness_report(
      rugged, X, y, key=key, eps=0.001, attacks=attacks, batch_size=batch_size, budget=BUDGET)
  reports = {size: report(size) for size in (3, 7, 16)}
  for size in (3, 7):
    for name, verdict in reports[16].verdicts.items():
      np.testing.assert_array_equal(reports[size].verdicts[name], verdict, err_msg=name)
  other = report(16, jax.random.key(1))
  assert any(np.any(other.verdicts[n] != reports[16].verdicts[n]) for n in other.verdicts)
