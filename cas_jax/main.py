"""Train, evaluate or analyze a CAS model: the `cas-jax` command (and the checkout's main.py).

  cas-jax --config=cifar10_at_cas --workdir=runs/at_cas      # a packaged config, by name
  cas-jax --config=configs/cifar10_at_cas.py --workdir=runs/at_cas --mode=eval
  python main.py --config=configs/cifar10_at_cas.py --workdir=runs/at_cas --mode=analyze
"""
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from cas_jax import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "A config file (configs/*.py) or a packaged "
                                "config's name (smoke, cifar10_at_cas, ...).", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, metrics and reports go here.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "analyze"],
                  "Train (resumes), evaluate a workdir, or draw the paper's channel analyses.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host runs).")
# Detected on Slurm, Open MPI and Cloud TPU when unset (JAX_COORDINATOR_ADDRESS also works).
flags.DEFINE_string("coordinator_address", None, "With --distributed: host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "With --distributed: how many processes in all.")
flags.DEFINE_integer("process_id", None, "With --distributed: this process's index, 0 first.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  """Dispatch to training or evaluation; the user's mistakes (errors.UserError) end in one line."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if FLAGS.verbosity <= 0:  # --verbosity=1 shows every library's INFO lines
    logging.get_absl_handler().addFilter(cli.QuietLibraries())
  import jax  # pylint: disable=g-import-not-at-top  (after the signal handlers)
  from cas_jax import compilation  # pylint: disable=g-import-not-at-top
  compilation.use_persistent_cache(FLAGS.config.get("compilation_cache"))
  if FLAGS.distributed:
    # Its preemption service then takes SIGTERM.
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  logging.info("JAX devices: %s (process %d of %d)", jax.devices(), jax.process_index(),
               jax.process_count())
  # Imported here so that --help stays fast.
  from cas_jax.training import train  # pylint: disable=g-import-not-at-top
  from cas_jax import errors  # pylint: disable=g-import-not-at-top
  from cas_jax import models  # pylint: disable=g-import-not-at-top
  # A bug of ours (any other error) keeps its traceback.
  with cli.exit_on_stop(), errors.exit_on_user_error():
    # The network's name and options, before any data is read (training checks them too).
    models.from_config(FLAGS.config, FLAGS.config.data.num_classes)
    if FLAGS.mode == "train":
      train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    elif FLAGS.mode == "analyze":
      from cas_jax.analysis import channels as analysis  # pylint: disable=g-import-not-at-top
      analysis.analyze_workdir(FLAGS.config, FLAGS.workdir)
    else:
      from cas_jax.evaluation import evaluate  # pylint: disable=g-import-not-at-top
      evaluate.evaluate_workdir(FLAGS.config, FLAGS.workdir)


def run() -> None:
  """The `cas-jax` console script."""
  cli.run(main)


if __name__ == "__main__":
  run()
