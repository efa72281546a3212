r"""Benchmark a robust CIFAR model: the `cas-jax-benchmark` command (cas_jax.benchmark).

  cas-jax-benchmark --torch-checkpoint model.pt --arch wrn --arch-option depth=28 \
      --arch-option widen_factor=10 --arch-option "cas_stages=()" --threat-model Linf \
      --eps 8/255 --n-examples 10000 --cifar-dir data/cifar-10-batches-py --out runs/model
  python -m cas_jax.evaluation.benchmark_cli ...        # the same, from a checkout

Writes --out/report.md and report.json (the worst-case robustness report) and
--out/robustbench.json (a RobustBench-format entry); the same command resumes an interrupted
run from --out/state. Without --cifar-dir the test split comes from TFDS. The budget flags
(--apgd-steps, --fab-steps, --square-queries, --target-classes) are for quick checks only: a
reduced budget makes the figures incomparable with RobustBench's (the entry says
standard_budget: false). docs/benchmark.md has the details.
"""
import json

from absl import app
from absl import flags
from absl import logging

from cas_jax import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("torch-checkpoint", None, "The PyTorch state_dict (.pt/.pth) to evaluate.")
flags.DEFINE_string("arch", None, "Its architecture: a name of cas_jax.models.NAMES.")
flags.DEFINE_multi_string("arch-option", [], "KEY=VALUE for models.create, repeatable: "
                          "depth=28, widen_factor=10, 'cas_stages=()', activation=swish.")
flags.DEFINE_string("threat-model", None, "RobustBench's threat model: Linf or L2.")
flags.DEFINE_string("eps", None, "The radius, in the threat model's units: 8/255, 0.0313725, 0.5.")
flags.DEFINE_integer("n-examples", 10000, "How many test images, the first ones in order.")
flags.DEFINE_enum("dataset", "cifar10", ["cifar10", "cifar100"], "The test split's dataset.")
flags.DEFINE_string("cifar-dir", None, "The official CIFAR python folder (cifar-10-batches-py "
                    "or cifar-100-python); without it the test split comes from TFDS.")
flags.DEFINE_string("tfds-data-dir", None, "Where TFDS keeps prepared datasets (its default).")
flags.DEFINE_string("out", None, "Report, RobustBench entry and resume state go here.")
flags.DEFINE_string("architecture", None, "The entry's architecture name (default: from --arch, "
                    "RobustBench's spelling such as WideResNet-28-10).")
flags.DEFINE_string("attacks", "default", "The report's attacks (docs/evaluation.md); must "
                    "include aa.")
flags.DEFINE_integer("batch-size", 256, "Images per batch, sharded over every local device.")
flags.DEFINE_integer("seed", 0, "The attacks' random seed.")
flags.DEFINE_integer("apgd-steps", 100, "APGD iterations (AutoAttack: 100); quick checks only.")
flags.DEFINE_integer("fab-steps", 100, "FAB-T iterations (AutoAttack: 100); quick checks only.")
flags.DEFINE_integer("square-queries", 5000, "Square queries (AutoAttack: 5000); quick checks "
                     "only.")
flags.DEFINE_integer("target-classes", 9, "APGD-T / FAB-T targets (AutoAttack: 9); quick checks "
                     "only.")
flags.DEFINE_bool("progress", True, "A progress bar per attack stage (quiet when not a terminal).")
flags.mark_flags_as_required(["torch-checkpoint", "arch", "out"])


def main(argv):
  """Benchmark the checkpoint; the user's mistakes end in one `error: ...` line."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if FLAGS.verbosity <= 0:  # --verbosity=1 shows every library's INFO lines
    logging.get_absl_handler().addFilter(cli.QuietLibraries())
  from cas_jax import compilation  # pylint: disable=g-import-not-at-top  (--help stays fast)
  from cas_jax import errors  # pylint: disable=g-import-not-at-top
  from cas_jax.evaluation import benchmark  # pylint: disable=g-import-not-at-top
  from cas_jax.evaluation.attack_registry import AttackBudget  # pylint: disable=g-import-not-at-top
  compilation.use_persistent_cache()  # CAS_JAX_COMPILATION_CACHE=off turns it off
  flag = lambda name: FLAGS[name].value
  with cli.exit_on_stop(), errors.exit_on_user_error():
    budget = AttackBudget(apgd_steps=flag("apgd-steps"), fab_steps=flag("fab-steps"),
                          square_queries=flag("square-queries"),
                          target_classes=flag("target-classes"))
    result = benchmark.benchmark(
        flag("torch-checkpoint"), n_examples=flag("n-examples"), dataset=flag("dataset"),
        threat_model=flag("threat-model"), eps=flag("eps"), arch=flag("arch"),
        arch_options=benchmark.parse_arch_options(flag("arch-option")),
        architecture=flag("architecture"), out_dir=flag("out"), cifar_dir=flag("cifar-dir"),
        tfds_data_dir=flag("tfds-data-dir"), attacks=flag("attacks"), budget=budget,
        batch_size=flag("batch-size"), seed=flag("seed"), progress=flag("progress"))
  print(result.report.markdown())
  print(json.dumps(result.entry, indent=2))
  print(f"Wrote {flag('out')}/{benchmark.REPORT_FILE}.md, .json and {benchmark.ENTRY_FILE}",
        flush=True)


def run() -> None:
  """The `cas-jax-benchmark` console script."""
  cli.run(main)


if __name__ == "__main__":
  run()
