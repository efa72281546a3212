"""A `cas-jax --mode=eval` report's AutoAttack against the authors' own (pyautoattack), image by
image: the same weights, the same test images, the report's norm, eps and budgets.

  cas-jax --config=cifar10_at_cas --workdir=runs/at_cas --mode=eval \
      --config.eval.norm=l2 --config.eval.eps=0.5
  python -m benchmarks.report_vs_official --config=configs/cifar10_at_cas.py \
      --checkpoint=runs/at_cas --report=runs/at_cas/eval/last_report.json --seeds=2 \
      --out=benchmarks/results/report_vs_official_l2.json

The network (a workdir or an authors'-layout .pth, with the authors' CAS placement) is exported to
the PyTorch network of the authors' layout and both forward passes are compared first. The
official AutoAttack then runs its `standard` version under the report's norm and eps on the
report's images, once per seed, with the report's APGD / FAB iterations and Square queries (its
restarts and targets are the official ones for the norm: under L1, 5 APGD-CE restarts and 5
targets). Printed and written: robust accuracy of both sides, and the images the official
breaks that our `aa` left standing (the figure that must be 0, or at most the official's own
seed-to-seed spread), and the other way round; and the same against our worst case, since on a
CAS model `aa` shares FAB-T and Square with `aa-joint`, which leaves `aa` an upper bound ("<=")
on the images `aa-joint` already broke (listed as cut short).
"""
import importlib.metadata
import json

from absl import app
from absl import flags
import jax
import numpy as np
from ml_collections import config_flags
import torch

from benchmarks import common
from cas_jax import input_pipeline

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "The config the report was made with.")
flags.DEFINE_string("checkpoint", None, "The workdir (its latest checkpoint) or .pth evaluated.")
flags.DEFINE_string("report", None, "The report's JSON (workdir/eval/<checkpoint>_report.json).")
flags.DEFINE_string("attack", "aa", "The report's AutoAttack row to compare.")
flags.DEFINE_integer("seeds", 1, "Official runs with seeds 0..seeds-1.")
flags.DEFINE_integer("torch_threads", 2, "torch.set_num_threads.")
flags.DEFINE_string("out", "", "Write the comparison as JSON here.")

def compare(ours_broken, worst_broken, cut_short, official_runs, clean) -> dict:
  """Robust accuracy of both sides and the images one breaks and the other does not: against
  our AutoAttack row and against our worst case (which also holds the images the row left to a
  stage it shares with another attack, `cut_short`)."""
  theirs_any = np.any(official_runs, 0)
  theirs_every = np.all(official_runs, 0)
  spread = max(int(np.sum(a != b)) for a in official_runs for b in official_runs)
  listed = lambda mask: np.flatnonzero(mask).tolist()
  return {
      "images": int(clean.size), "clean_acc": float(np.mean(clean)),
      "ours_robust_acc": float(np.mean(clean & ~ours_broken)),
      "ours_worst_case_acc": float(np.mean(clean & ~worst_broken)),
      "official_robust_acc_per_seed": [float(np.mean(clean & ~b)) for b in official_runs],
      "ours_cut_short": listed(cut_short & clean),
      "official_breaks_ours_misses": listed(theirs_any & ~ours_broken),
      "official_breaks_ours_misses_not_cut_short": listed(theirs_any & ~ours_broken & ~cut_short),
      "official_every_seed_breaks_ours_misses": listed(theirs_every & ~ours_broken),
      "official_breaks_worst_case_misses": listed(theirs_any & ~worst_broken),
      "ours_breaks_official_misses": listed(ours_broken & ~theirs_any),
      "official_seed_to_seed_spread": spread,
  }


def main(_):
  """Load the report and the network, run the official AutoAttack, compare, print, write."""
  if not (FLAGS.config and FLAGS.checkpoint and FLAGS.report):
    raise app.UsageError("--config, --checkpoint and --report are required")
  torch.set_num_threads(FLAGS.torch_threads)
  with open(FLAGS.report) as f:
    report = json.load(f)
  config = FLAGS.config
  norm, eps = report.get("norm", "linf"), float(report["eps"])
  budget = {k: int(config.eval[k])
            for k in ("apgd_steps", "fab_steps", "square_queries", "target_classes")}
  dataset = input_pipeline.create_dataset(config)
  indices = np.asarray(report["indices"], np.int64)
  x = dataset.test_images[indices].astype(np.float32) / np.float32(255)
  y = dataset.test_labels[indices].astype(np.int64)
  model_fn, net = common.load_models(config, FLAGS.checkpoint, x.shape[1:], "cpu")
  gap, logits = common.checked_logit_gap(model_fn, net, x, "cpu")
  clean = np.asarray(report["verdicts"]["natural"])
  if not np.array_equal(clean, logits.argmax(1) == y):
    raise RuntimeError("the report's clean verdicts are not this network's on these images: "
                       "pass the --config and --checkpoint the report was made with")
  ran_on = np.asarray(report["ran_on"][FLAGS.attack])
  if np.any(clean & ~ran_on):
    raise RuntimeError(f"{FLAGS.attack} skipped clean images: make the report with "
                       "config.eval.exact_autoattack=True")
  ours_broken = clean & ~np.asarray(report["verdicts"][FLAGS.attack])
  worst_broken = clean & ~np.asarray(report["verdicts"]["worst_case"])
  cut_short = np.asarray(report.get("cut_short", {}).get(FLAGS.attack, np.zeros_like(clean)))
  x_nchw = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
  runs, seconds = [], []
  for seed in range(FLAGS.seeds):
    robust, took = common.official_robust(net, x_nchw, y, norm=norm, eps=eps, seed=seed,
                                          **budget)
    broken = ~robust
    runs.append(broken & clean)
    seconds.append(took)
    print(f"official seed {seed}: robust {100 * np.mean(clean & ~broken):.1f}% in {took:.0f} s",
          flush=True)
    result = {"report": FLAGS.report, "attack": FLAGS.attack, "norm": norm, "eps": eps,
              "budget": budget, "max_logit_gap": gap, "official_seconds": seconds,
              **compare(ours_broken, worst_broken, cut_short, np.array(runs), clean),
              "versions": {"jax": jax.__version__, "torch": torch.__version__,
                           "pyautoattack": importlib.metadata.version("pyautoattack")}}
    common.report(result, FLAGS.out)  # after every seed: a long run keeps what it finished


if __name__ == "__main__":
  app.run(main)
