"""cas_jax.benchmark and cas-jax-benchmark: the RobustBench entry against independent figures.

The model functions are nearest-class-mean classifiers (logits: minus the squared distance to
each class's mean training image), which classify a fair share of CIFAR images and which the
attacks break; the checkpoint is a PyTorch CAS WideResNet-10-1 of the authors' layout
(tests/test_interop.py). Budgets are reduced throughout (BUDGET).
"""
import json
import os
import pickle
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

import cas_jax
from cas_jax import errors
from cas_jax import input_pipeline
from cas_jax import models
from cas_jax.attacks.autoattack import autoattack
from cas_jax.evaluation import benchmark as benchmark_lib
from cas_jax.evaluation.attack_registry import AttackBudget
import fake_devices

BUDGET = AttackBudget(apgd_steps=3, fab_steps=3, square_queries=20, target_classes=2)
BUDGET_FLAGS = ["--apgd-steps=3", "--fab-steps=3", "--square-queries=20", "--target-classes=2"]
ROWS = []
ENTRY_FIELDS = {"dataset", "threat_model", "eps", "architecture", "number_forward_passes",
                "n_examples", "clean_acc", "autoattack_acc", "worst_case_acc", "autoattack_exact",
                "sanity_warnings", "attacks", "budget", "standard_budget",
                "evaluation_forward_passes", "evaluation_backward_passes"}


def _count_rows(rows):
  ROWS.append(int(rows))


def nearest_mean(means, x):
  """Minus the squared distance of each image to each class mean; counts its rows."""
  jax.debug.callback(_count_rows, x.shape[0])
  return -jnp.sum((x[:, None] - means[None]) ** 2, axis=(2, 3, 4)) / 100


def write_cifar(folder, dataset, num_train=2000, num_test=64, seed=0):
  """Synthetic class patterns in the official python layout of `dataset` (cifar10 / cifar100)."""
  num_classes = input_pipeline.NUM_CLASSES[dataset]
  (train_x, train_y), (test_x, test_y) = input_pipeline.synthetic_data(seed, num_train, num_test,
                                                                       num_classes)
  label_key = b"labels" if dataset == "cifar10" else b"fine_labels"
  names = ((["data_batch_1"], ["test_batch"]) if dataset == "cifar10" else (["train"], ["test"]))
  folder.mkdir(parents=True)
  for (name,), x, y in ((names[0], train_x, train_y), (names[1], test_x, test_y)):
    rows = x.transpose(0, 3, 1, 2).reshape(len(x), -1)
    with open(folder / name, "wb") as f:
      pickle.dump({b"data": rows, label_key: [int(v) for v in y]}, f, protocol=2)
  if dataset == "cifar10":  # the other four training batches, empty of surprises
    for i in range(2, 6):
      (folder / f"data_batch_{i}").write_bytes((folder / "data_batch_1").read_bytes())
  return str(folder)


@pytest.fixture(scope="module")
def cifar10_dir(tmp_path_factory):
  """CAS_JAX_CIFAR_DIR (real images) when set, else synthetic files in the official layout."""
  return os.environ.get("CAS_JAX_CIFAR_DIR") or write_cifar(
      tmp_path_factory.mktemp("data") / "cifar-10-batches-py", "cifar10")


def class_means(images, labels, num_classes):
  """(C, H, W, 3) float32 mean image of each class, in [0, 1] (black for a class without any)."""
  x = images.astype(np.float32) / 255
  return np.stack([x[labels == c].mean(0) if np.any(labels == c) else np.zeros_like(x[0])
                   for c in range(num_classes)]).astype(np.float32)


def mean_model(folder, dataset="cifar10"):
  """The nearest-class-mean model of `folder`'s training split, as a Partial."""
  ((images, labels),) = input_pipeline.load_cifar_dir(folder, dataset, splits=("train",))
  means = class_means(images, labels, input_pipeline.NUM_CLASSES[dataset])
  return jax.tree_util.Partial(nearest_mean, jnp.asarray(means))


def percent(fraction):
  """RobustBench's accuracy string, computed here apart from the code under test."""
  return str(round(100 * float(fraction), 2))


def numpy_accuracy(model, images, labels):
  """Clean accuracy of the nearest-mean model computed in numpy, apart from any JAX code."""
  means = np.asarray(model.args[0], np.float64)
  x = images.astype(np.float64) / 255
  distances = ((x[:, None] - means[None]) ** 2).sum(axis=(2, 3, 4))
  return np.mean(distances.argmin(1) == labels)


def test_entry_matches_an_independent_computation(cifar10_dir, tmp_path):
  model, n = mean_model(cifar10_dir), 32
  ROWS.clear()
  entry, report = cas_jax.benchmark(model, n_examples=n, eps=8 / 255, cifar_dir=cifar10_dir,
                                    budget=BUDGET, architecture="nearest mean",
                                    out_dir=str(tmp_path))
  jax.effects_barrier()
  seen = sum(ROWS)
  (_, (images, labels)) = input_pipeline.load_cifar_dir(cifar10_dir)  # the same first images
  images, labels = images[:n], labels[:n]
  assert set(entry) == ENTRY_FIELDS
  assert (entry["dataset"], entry["threat_model"], entry["eps"], entry["n_examples"]) == (
      "cifar10", "Linf", "8/255", n)
  assert entry["architecture"] == "nearest mean" and entry["number_forward_passes"] == 1
  assert entry["clean_acc"] == percent(numpy_accuracy(model, images, labels))
  # AutoAttack alone with the same key and budget breaks the images of the report's aa row.
  robust = autoattack(model, images.astype(np.float32) / 255, labels, eps=8 / 255,
                      key=jax.random.key(0), apgd_steps=3, fab_steps=3, square_queries=20,
                      target_classes=2, return_per_attack=True)[1]["square"]
  np.testing.assert_array_equal(report.verdicts["aa"], np.asarray(robust))
  assert entry["autoattack_acc"] == percent(np.mean(robust))
  assert entry["autoattack_exact"] and entry["attacks"] == ["pgd20", "cw", "aa"]
  worst = np.logical_and.reduce([report.verdicts[a] for a in ("natural", "pgd20", "cw", "aa")])
  assert entry["worst_case_acc"] == percent(np.mean(worst))
  assert float(entry["worst_case_acc"]) <= float(entry["autoattack_acc"]) < float(
      entry["clean_acc"])
  assert entry["sanity_warnings"] == report.sanity
  # Every row the model evaluated, but for the evaluation-mode probe's 2 batches of 2 images.
  assert entry["evaluation_forward_passes"] == report.costs["total"]["rows"] == seen - 4
  assert entry["evaluation_backward_passes"] == report.costs["total"]["gradient_rows"] > 0
  assert entry["budget"] == {"apgd_steps": 3, "fab_steps": 3, "square_queries": 20,
                             "target_classes": 2} and entry["standard_budget"] is False
  assert json.loads((tmp_path / "robustbench.json").read_text()) == entry
  assert json.loads((tmp_path / "report.json").read_text())["verdicts"]["aa"] == [
      bool(v) for v in report.verdicts["aa"]]
  assert "| aa: AutoAttack standard" in (tmp_path / "report.md").read_text()


def test_a_second_run_in_the_same_out_attacks_nothing_again(cifar10_dir, tmp_path, caplog):
  model, n = mean_model(cifar10_dir), 16
  options = dict(n_examples=n, eps="4/255", cifar_dir=cifar10_dir, budget=BUDGET,
                 attacks="pgd5,aa", out_dir=str(tmp_path))
  first = cas_jax.benchmark(model, **options)
  ROWS.clear()
  with caplog.at_level("INFO"):
    again = cas_jax.benchmark(model, **options)
  jax.effects_barrier()
  assert sum(ROWS) == n + 4  # the natural pass and the probe: every stage replayed
  assert any("image-stages already attacked" in r.getMessage() for r in caplog.records)
  assert again.entry == first.entry
  assert float(first.entry["autoattack_acc"]) < float(first.entry["clean_acc"])


def test_cifar100_runs_autoattack_with_nine_targets(tmp_path):
  folder = os.environ.get("CAS_JAX_CIFAR100_DIR") or write_cifar(
      tmp_path / "cifar-100-python", "cifar100", num_train=3000, num_test=12)
  model, n = mean_model(folder, "cifar100"), 12
  budget = AttackBudget(apgd_steps=2, fab_steps=2, square_queries=10)  # 9 targets, as official
  entry, report = cas_jax.benchmark(model, n_examples=n, dataset="cifar100", eps=8 / 255,
                                    cifar_dir=folder, budget=budget, attacks="aa")
  (_, (images, labels)) = input_pipeline.load_cifar_dir(folder, "cifar100")
  assert entry["dataset"] == "cifar100" and entry["budget"]["target_classes"] == 9
  assert entry["clean_acc"] == percent(numpy_accuracy(model, images[:n], labels[:n]))
  assert float(entry["clean_acc"]) > 50  # the 100 classes are told apart
  targets = sorted(int(s.split("/")[1]) for s in report.costs["stages"] if "apgd-t/" in s)
  assert targets == list(range(2, 11))  # the 2nd to the 10th most likely classes


def fake_tfds_splits(builder, split, **kwargs):
  """tfds.data_source's splits under mock_data: 20 noise images each, the test split's first 6
  labelled 0..5."""
  if isinstance(split, (tuple, list)):  # what tfds's own as_data_source maps over
    return [fake_tfds_splits(builder, s, **kwargs) for s in split]
  rng = np.random.default_rng(0 if str(split) == "test" else 1)
  images = rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
  labels = np.concatenate([np.arange(6), rng.integers(0, 10, 14)])
  return [{"image": image, "label": label} for image, label in zip(images, labels)]


def test_the_test_split_comes_from_tfds_without_a_cifar_dir():
  # The model knows the test split's first 6 images (each its class's mean), in order: it
  # classifies them all, and noise images from elsewhere hardly.
  test = fake_tfds_splits(None, "test")
  images = np.stack([e["image"] for e in test[:6]])
  means = np.concatenate([images / np.float32(255), np.zeros((4, 32, 32, 3), np.float32)])
  model = jax.tree_util.Partial(nearest_mean, jnp.asarray(means))
  with tfds.testing.mock_data(as_data_source_fn=fake_tfds_splits):
    entry, report = cas_jax.benchmark(model, n_examples=6, eps=8 / 255, budget=BUDGET,
                                      attacks="aa")
    with pytest.raises(errors.UserError, match="21 test images asked for, but the cifar10 test "
                       "split in TFDS cifar10 holds 20; ask for at most 20"):
      cas_jax.benchmark(model, n_examples=21, eps=8 / 255, attacks="aa")
  assert report.num_images == 6 and entry["clean_acc"] == "100.0"


def test_eps_threat_models_and_architecture_names():
  parse = benchmark_lib.parse_eps
  assert parse("8/255", "linf") == 8 / 255 and parse(" 0.0313725 ", "linf") == 0.0313725
  assert parse(0.5, "l2") == 0.5 and parse("1/2", "l2") == 0.5
  assert benchmark_lib._eps_string(0.0313725, "linf") == "8/255"  # what RobustBench writes
  assert benchmark_lib._eps_string(0.031, "linf") == "0.031"
  assert benchmark_lib._eps_string(0.5, "l2") == "0.5"
  assert [benchmark_lib.threat_norm(t, 0.1) for t in ("Linf", "L2", "linf", "l2")] == [
      "linf", "l2", "linf", "l2"]
  assert benchmark_lib.parse_arch_options(["depth=28", "activation=swish", "cas_stages=()"]) == {
      "depth": 28, "activation": "swish", "cas_stages": ()}
  name = benchmark_lib.architecture_name
  assert name("wrn", 10, depth=28, widen_factor=10) == "WideResNet-28-10"
  assert name("wrn34_10", 100) == "WideResNet-34-10"
  assert name("wide_resnet", 10) == "WideResNet-28-10"
  assert name("dm_wide_resnet", 10, depth=70, width=16) == "WideResNet-70-16"
  assert name("dm_preact_resnet", 10) == "PreActResNet-18"
  assert name("dm_preact_resnet", 10, depth=34) == "PreActResNet-34"
  assert name("preact_resnet34", 10) == "PreActResNet-34"
  assert name("resnet18", 10) == "ResNet-18"
  assert name("resnet18", 10, width=8) == "ResNet-18 (width 8)"
  for arch in models.NAMES:  # every architecture has a name, also those added later
    assert name(arch, 10)


def _bad_calls(folder):
  model = mean_model(folder)

  def batch_norm(x):  # normalised by its batch's statistics: a network in training mode
    z = x.reshape(x.shape[0], -1)
    return ((z - z.mean(0)) / (z.std(0) + 1e-3))[:, :10]

  return [
      (dict(model="m.pt", arch="resnet99"), f"unknown architecture 'resnet99'; valid: "
       f"{', '.join(models.NAMES)}"),
      (dict(model="m.pt"), "a checkpoint needs its architecture"),
      (dict(model=model, threat_model=None), "eps=0.03137254901960784 given without a threat "
       "model; add threat_model='Linf' or 'L2'"),
      (dict(model=model, threat_model="L1"), "threat model 'L1' is unknown; choose one of Linf, L2"),
      (dict(model=model, threat_model="corruptions"), "threat model 'corruptions' has no "
       "adversary to attack (common corruptions): not supported; choose one of Linf, L2"),
      (dict(model=model, eps="8"), "eps=8.0 is outside (0, 1]; images are in [0, 1], e.g. "
       "eps=8/255."),
      (dict(model=model, eps="8/0"), "eps='8/0' is not a number; write e.g. 8/255"),
      (dict(model=model, eps=None), "no eps; give the threat model's radius"),
      (dict(model=model, n_examples=100000), "100000 test images asked for, but the cifar10 test "
       "split in"),
      (dict(model=model, n_examples=0), "n_examples=0 must be a positive integer"),
      (dict(model=model, dataset="imagenet"), "dataset 'imagenet' is not supported"),
      (dict(model=model, attacks="pgd5"), "lack AutoAttack at the threat model's eps"),
      (dict(model=model, attacks="aa-joint,aa@4"), "lack AutoAttack at the threat model's eps"),
      (dict(model=batch_norm), "the model's logits for an image depend on the other images of "
       "its batch: it runs in training mode"),
      (dict(model=lambda x: jnp.full((x.shape[0], 10), jnp.nan)), "the model's logits are not "
       "finite (NaN or inf): its weights diverged"),
      (dict(model=model, arch="wrn"), "arch and arch_options describe a checkpoint"),
      (dict(model=lambda x: jnp.zeros((x.shape[0], 100))), "the model has 100 outputs but "
       "cifar10 has 10 classes"),
  ]


def test_bad_input_gets_one_line_naming_the_fix(cifar10_dir):
  for options, message in _bad_calls(cifar10_dir):
    call = {**dict(n_examples=4, eps=8 / 255, cifar_dir=cifar10_dir, attacks="aa"), **options}
    with pytest.raises(errors.UserError) as raised:
      cas_jax.benchmark(call.pop("model"), **call)
    assert message in str(raised.value) and "\n" not in str(raised.value), options


def torch_checkpoint(path, prefix="module."):
  """A PyTorch CAS WideResNet-10-1 (the authors' layout, random weights and BN statistics)
  saved as its state_dict with DataParallel's prefix; the network itself."""
  import torch  # pylint: disable=g-import-not-at-top
  from test_interop import _randomised, build_torch_network  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  net = _randomised(build_torch_network("wrn", {"depth": 10, "widen_factor": 1})).eval()
  torch.save({prefix + k: v for k, v in net.state_dict().items()}, path)
  return net


def run_cli(*args):
  """cas-jax-benchmark in a fresh process (its module, as the console script runs it)."""
  return subprocess.run([sys.executable, "-m", "cas_jax.evaluation.benchmark_cli", *args],
                        env=fake_devices.environment(1), cwd=fake_devices.ROOT,
                        capture_output=True, text=True, timeout=300, check=False)


def test_the_command_benchmarks_a_pytorch_checkpoint(cifar10_dir, tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  net, n = torch_checkpoint(tmp_path / "wrn.pt"), 8
  result = run_cli("--torch-checkpoint", str(tmp_path / "wrn.pt"), "--arch", "wrn",
                   "--arch-option", "depth=10", "--arch-option=widen_factor=1",
                   "--threat-model", "Linf", "--eps", "8/255", "--n-examples", str(n),
                   "--cifar-dir", cifar10_dir, "--out", str(tmp_path / "out"), *BUDGET_FLAGS)
  assert result.returncode == 0, result.stderr[-3000:]
  entry = json.loads((tmp_path / "out" / "robustbench.json").read_text())
  (_, (images, labels)) = input_pipeline.load_cifar_dir(cifar10_dir)
  with torch.no_grad():  # PyTorch's own clean accuracy on the same first images
    logits = net(torch.from_numpy(images[:n].transpose(0, 3, 1, 2).astype(np.float32) / 255))[0]
  assert entry["clean_acc"] == percent(np.mean(logits.argmax(1).numpy() == labels[:n]))
  assert (entry["architecture"], entry["eps"], entry["threat_model"]) == (
      "WideResNet-10-1", "8/255", "Linf")
  assert entry["attacks"] == ["pgd20", "cw", "aa", "aa-joint"]  # a CAS network: adaptive too
  report = json.loads((tmp_path / "out" / "report.json").read_text())
  assert report["eps"] == 8 / 255 and report["num_images"] == n
  assert '"autoattack_acc"' in result.stdout and "## Sanity report" in result.stdout


def test_the_command_says_what_is_wrong_in_one_line(tmp_path):
  result = run_cli("--torch-checkpoint", str(tmp_path / "m.pt"), "--arch", "preactresnet",
                   "--threat-model", "Linf", "--eps", "8/255", "--out", str(tmp_path / "out"))
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      f"error: unknown architecture 'preactresnet'; valid: {', '.join(models.NAMES)}")
