"""Seconds of our AutoAttack against the official one (pyautoattack) on a full-width ResNet-18.

  python -m benchmarks.full_width_vs_official --cifar_dir=../shared/data/cifar-10-batches-py \
      --out=benchmarks/results/full_width_vs_official_cpu.json

RobustBench 1.1.1's ResNet18 (full width, 11.2M parameters) is trained --train_steps SGD steps in
PyTorch on the CIFAR-10 training images and saved as RobustBench saves it. Each side then runs
in a process of its own, on the same cores, images, eps and budget, and is timed from outside,
start-up included (one run each, nothing else on the cores):
  ours: `cas-jax-benchmark --attacks=aa` as a user runs it (XLA:CPU convolutions through Eigen,
    as the command sets them: cas_jax.cli.use_eigen_cpu_convolutions), once from an empty compilation cache
    (a fresh folder) and once more from the cache the first run filled;
  official: AutoAttack standard (seed 0) on the same checkpoint, torch using every core.
Inside our process the seconds are split into start-up (imports, checkpoint, images), XLA
compilation (JAX's monitoring events, per program), each unit's run time from the report's cost
table, and the rest (host transfers, scheduling, writing the report). The verdicts of the two
sides are compared image by image, and their model rows counted (ours: the report's cost table,
natural pass included; the official's: a wrapper around its network, its final check included).
"""
import json
import os
import subprocess
import sys
import time

START = time.perf_counter()

from absl import app  # pylint: disable=g-import-not-at-top  (START times the imports)
from absl import flags  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
flags.DEFINE_string("cifar_dir", None, "CIFAR-10 in the official python layout.")
flags.DEFINE_integer("images", 32, "The first N test images.")
flags.DEFINE_string("eps", "1/255", "L-inf radius.")
flags.DEFINE_integer("apgd_steps", 10, "APGD and FAB iterations on both sides.")
flags.DEFINE_integer("square_queries", 200, "Square queries on both sides.")
flags.DEFINE_integer("target_classes", 9, "APGD-T / FAB-T targets on both sides.")
flags.DEFINE_integer("train_steps", 20, "SGD steps of batch 64 in PyTorch before the attacks.")
flags.DEFINE_string("workdir", "/tmp/full_width_vs_official", "Checkpoint, caches, outputs.")
flags.DEFINE_enum("side", "both", ["both", "ours", "official"], "both: train, then time each "
                  "side in its own process (the other two values are those processes).")
flags.DEFINE_string("cache", "", "ours: the compilation cache folder of this run.")
flags.DEFINE_string("run", "", "ours: this run's name (its output folder).")
flags.DEFINE_string("out", "", "Write the results as JSON here.")


def budget() -> dict:
  """The budget both sides run, in cas-jax-benchmark's flag names."""
  return {"apgd-steps": FLAGS.apgd_steps, "fab-steps": FLAGS.apgd_steps,
          "square-queries": FLAGS.square_queries, "target-classes": FLAGS.target_classes}


def checkpoint_path() -> str:
  return os.path.join(FLAGS.workdir, "resnet18.pt")


def test_images():
  """(uint8 NHWC images, labels) of the first --images test images."""
  from cas_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  _, (x, y) = input_pipeline.load_cifar_dir(FLAGS.cifar_dir)
  return x[:FLAGS.images], y[:FLAGS.images]


def run_ours() -> dict:
  """cas_jax.benchmark with --attacks=aa, its seconds split by where they went."""
  from cas_jax import cli  # pylint: disable=g-import-not-at-top
  cli.use_eigen_cpu_convolutions()  # as the cas-jax-benchmark command does
  import jax  # pylint: disable=g-import-not-at-top
  from cas_jax import compilation  # pylint: disable=g-import-not-at-top
  from cas_jax.evaluation import benchmark  # pylint: disable=g-import-not-at-top
  from cas_jax.evaluation.attack_registry import AttackBudget  # pylint: disable=g-import-not-at-top
  compilation.use_persistent_cache(FLAGS.cache)
  compilation.use_unrolled_threefry_on_cpu()  # as the commands do (cas_jax.cli.run)
  imported = time.perf_counter() - START
  with compilation.counted() as stats:
    begin = time.perf_counter()
    result = benchmark.benchmark(
        checkpoint_path(), arch="resnet18", arch_options={"cas_stages": ()},
        n_examples=FLAGS.images, threat_model="Linf", eps=FLAGS.eps, attacks="aa",
        out_dir=os.path.join(FLAGS.workdir, FLAGS.run),
        cifar_dir=FLAGS.cifar_dir, progress=False,
        budget=AttackBudget(apgd_steps=FLAGS.apgd_steps, fab_steps=FLAGS.apgd_steps,
                            square_queries=FLAGS.square_queries,
                            target_classes=FLAGS.target_classes))
    seconds = time.perf_counter() - begin
  units = {name: {"seconds": round(c["seconds"], 3), "forward_rows": c["forward_rows"],
                  "gradient_rows": c["gradient_rows"], "padding_rows": c["padding_rows"]}
           for name, c in result.report.costs["stages"].items()}
  unit_seconds = sum(u["seconds"] for u in units.values())
  total = result.report.costs["total"]
  return {"import_seconds": imported, "benchmark_call_seconds": seconds,
          "rows": int(total["rows"]), "gradient_rows": int(total["gradient_rows"]),
          "compilation": stats.as_dict(), "units": units, "unit_seconds": unit_seconds,
          "verdicts": np.asarray(result.report.verdicts["aa"]).tolist(),
          "robust_acc": result.entry["autoattack_acc"], "jax": jax.__version__,
          "xla_flags": os.environ.get("XLA_FLAGS", "")}


def run_official() -> dict:
  """The official AutoAttack standard on the same checkpoint and images."""
  import torch  # pylint: disable=g-import-not-at-top
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  from tests.test_zoo import robustbench_architecture  # pylint: disable=g-import-not-at-top
  net = robustbench_architecture("resnet").ResNet18()
  state = torch.load(checkpoint_path())
  net.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
  net.eval()
  x, y = test_images()
  from cas_jax.evaluation import benchmark  # pylint: disable=g-import-not-at-top
  counted = common.counting_network(torch, net)
  robust, seconds = common.official_robust(
      counted, common.as_nchw(x), y, norm="linf", eps=benchmark.parse_eps(FLAGS.eps, "linf"),
      seed=0, **{k.replace("-", "_"): v for k, v in budget().items()})
  return {"attack_seconds": seconds, "verdicts": robust.tolist(),
          "rows": counted.rows, "gradient_rows": counted.gradient_rows,
          "robust_acc": float(robust.mean()), "torch": torch.__version__,
          "torch_threads": torch.get_num_threads()}


def train_and_save():
  """RobustBench's ResNet18 after --train_steps SGD steps, saved with its `module.` prefix."""
  import torch  # pylint: disable=g-import-not-at-top
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  from cas_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from tests.test_zoo import robustbench_architecture  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  net = robustbench_architecture("resnet").ResNet18()
  (x, y), _ = input_pipeline.load_cifar_dir(FLAGS.cifar_dir)
  common.save_as_robustbench(common.train_briefly(net, x, y, FLAGS.train_steps),
                             checkpoint_path())


def timed_side(side: str, cache: str = "", run: str = "") -> dict:
  """One side in a process of its own: its JSON, and its wall seconds from outside."""
  command = [sys.executable, "-m", "benchmarks.full_width_vs_official", f"--side={side}",
             f"--cache={cache}", f"--run={run}", f"--workdir={FLAGS.workdir}", f"--cifar_dir={FLAGS.cifar_dir}",
             f"--images={FLAGS.images}", f"--eps={FLAGS.eps}",
             f"--apgd_steps={FLAGS.apgd_steps}", f"--square_queries={FLAGS.square_queries}",
             f"--target_classes={FLAGS.target_classes}"]
  start = time.perf_counter()
  done = subprocess.run(command, check=True, capture_output=True, text=True)
  wall = time.perf_counter() - start
  result = json.loads(done.stdout.strip().splitlines()[-1])
  result["process_seconds"] = round(wall, 2)
  print(f"{side} {run}: {wall:.1f} s", flush=True)
  return result


def main(_):
  """Train and save, then time each side in its own process and compare the verdicts."""
  if FLAGS.side != "both":
    print(json.dumps(run_ours() if FLAGS.side == "ours" else run_official()))
    return
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  os.makedirs(FLAGS.workdir, exist_ok=True)
  if not os.path.exists(checkpoint_path()):
    train_and_save()
  stamp = int(time.time())
  cold = os.path.join(FLAGS.workdir, f"cache_{stamp}")  # empty: the first run compiles
  results = {"images": FLAGS.images, "eps": FLAGS.eps, "budget": budget(),
             "cpu_count": os.cpu_count(), "network": "RobustBench ResNet18 (full width)",
             "ours_cold_cache": timed_side("ours", cold, f"ours_cold_{stamp}"),
             "ours_warm_cache": timed_side("ours", cold, f"ours_warm_{stamp}"),
             "official": timed_side("official")}
  ours = np.asarray(results["ours_cold_cache"].pop("verdicts"))
  results["ours_warm_cache"].pop("verdicts")
  official = np.asarray(results["official"].pop("verdicts"))
  results["official_breaks_ours_misses"] = np.flatnonzero(~official & ours).tolist()
  results["ours_breaks_official_misses"] = np.flatnonzero(official & ~ours).tolist()
  for side in ("ours_cold_cache", "ours_warm_cache"):
    results[f"{side}_over_official"] = round(
        results[side]["process_seconds"] / results["official"]["process_seconds"], 3)
  common.report(results, FLAGS.out)


if __name__ == "__main__":
  app.run(main)
