"""`cas-jax-benchmark` on RobustBench's own networks, against PyTorch and the official AutoAttack.

  python -m benchmarks.zoo_end_to_end --cifar_dir=../shared/data/cifar-10-batches-py \
      --out=benchmarks/results/zoo_end_to_end_cpu.json

RobustBench 1.1.1's PreActResNet18 and a DMWideResNet-16-4 (Swish), trained briefly in PyTorch
on the CIFAR-10 training images and saved as RobustBench saves them (`module.` prefix), go
through the command as a user runs it (a subprocess, --n-examples test images, reduced budgets).
Its entry's clean accuracy is compared with PyTorch's on the same images, and its AutoAttack
verdicts image by image with the official AutoAttack (pyautoattack, seed 0) at the same budget.
"""
import json
import os
import subprocess
import sys
import time

from absl import app
from absl import flags
import numpy as np
import torch

from benchmarks import common
from cas_jax import input_pipeline
from cas_jax.evaluation import benchmark
from tests.test_zoo import robustbench_architecture

FLAGS = flags.FLAGS
flags.DEFINE_string("cifar_dir", None, "CIFAR-10 in the official python layout.")
flags.DEFINE_integer("images", 32, "The first N test images.")
flags.DEFINE_string("eps", "2/255", "L-inf radius.")
flags.DEFINE_integer("train_steps", 40, "SGD steps of batch 64 in PyTorch.")
flags.DEFINE_string("workdir", "/tmp/zoo_end_to_end", "Checkpoints and the command's --out.")
flags.DEFINE_string("out", "", "Write the results as JSON here.")
BUDGET = {"apgd-steps": 10, "fab-steps": 10, "square-queries": 200, "target-classes": 3}


def networks():
  """name -> (torch network, --arch-option list)."""
  dm = robustbench_architecture("dm_wide_resnet")
  return {
      "preact_resnet18": (robustbench_architecture("resnet").PreActResNet18(), []),
      "dm_wide_resnet": (dm.DMWideResNet(num_classes=10, depth=16, width=4,
                                         activation_fn=dm.Swish),
                         ["depth=16", "width=4", "activation=swish"]),
  }


def run_command(name, options, path) -> tuple:
  """(entry, report, seconds) of cas-jax-benchmark on the checkpoint, as a user runs it."""
  out = os.path.join(FLAGS.workdir, f"{name}_out")
  flags_ = [f"--{k}={v}" for k, v in BUDGET.items()]
  command = [sys.executable, "-m", "cas_jax.evaluation.benchmark_cli", "--torch-checkpoint", path,
             "--arch", name, *[f"--arch-option={o}" for o in options], "--threat-model", "Linf",
             "--eps", FLAGS.eps, "--n-examples", str(FLAGS.images), "--cifar-dir",
             FLAGS.cifar_dir, "--out", out, "--noprogress", *flags_]
  start = time.perf_counter()
  subprocess.run(command, check=True, capture_output=True)
  seconds = time.perf_counter() - start
  with open(os.path.join(out, "robustbench.json")) as f:
    entry = json.load(f)
  with open(os.path.join(out, "report.json")) as f:
    report = json.load(f)
  return entry, report, seconds


def main(_):
  """Train, save, run the command, compare with PyTorch and the official AutoAttack."""
  torch.manual_seed(0)
  torch.set_num_threads(1)
  os.makedirs(FLAGS.workdir, exist_ok=True)
  (x_train, y_train), (x_test, y_test) = input_pipeline.load_cifar_dir(FLAGS.cifar_dir)
  x = common.as_nchw(x_test[:FLAGS.images])
  y = torch.tensor(y_test[:FLAGS.images], dtype=torch.long)
  results = {"budget": BUDGET, "eps": FLAGS.eps, "images": FLAGS.images,
             "versions": {"torch": torch.__version__}}
  for name, (net, options) in networks().items():
    net = common.train_briefly(net, x_train, y_train, FLAGS.train_steps)
    path = os.path.join(FLAGS.workdir, f"{name}.pt")
    common.save_as_robustbench(net, path)
    entry, report, ours_seconds = run_command(name, options, path)
    with torch.no_grad():
      torch_clean = float((net(x).argmax(1) == y).float().mean())
    official, official_seconds = common.official_robust(
        net, x, y.numpy(), norm="linf", eps=benchmark.parse_eps(FLAGS.eps, "linf"), seed=0,
        **{k.replace("-", "_"): v for k, v in BUDGET.items()})
    ours = np.asarray(report["verdicts"]["aa"])
    results[name] = {
        "entry": entry, "torch_clean_acc": torch_clean, "official_robust_acc": float(official.mean()),
        "official_breaks_ours_misses": np.flatnonzero(~official & ours).tolist(),
        "ours_breaks_official_misses": np.flatnonzero(official & ~ours).tolist(),
        "command_seconds_with_startup": ours_seconds, "official_seconds": official_seconds}
  common.report(results, FLAGS.out)


if __name__ == "__main__":
  app.run(main)
