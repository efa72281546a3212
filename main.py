"""Train or evaluate a CAS model.

  python main.py --config=configs/cifar10_at_cas.py --workdir=runs/at_cas
  python main.py --config=configs/cifar10_at_cas.py --workdir=runs/at_cas --mode=eval
"""
import logging as python_logging
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "A config file from configs/.", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, metrics and reports go here.")
flags.DEFINE_enum("mode", "train", ["train", "eval"], "Train (resumes), or evaluate a workdir.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host runs).")
# Detected on Slurm, Open MPI and Cloud TPU when unset (JAX_COORDINATOR_ADDRESS also works).
flags.DEFINE_string("coordinator_address", None, "With --distributed: host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "With --distributed: how many processes in all.")
flags.DEFINE_integer("process_id", None, "With --distributed: this process's index, 0 first.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(python_logging.Filter):
  """Keep INFO lines from cas_jax and main.py; libraries (Orbax, JAX) only from WARNING up."""

  def filter(self, record):
    ours = "cas_jax" in record.pathname or record.pathname == os.path.abspath(__file__)
    return ours or record.levelno >= python_logging.WARNING


def main(argv):
  """Dispatch to training or evaluation; configuration mistakes end with one error line."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if FLAGS.verbosity <= 0:  # --verbosity=1 shows every library's INFO lines
    logging.get_absl_handler().addFilter(_QuietLibraries())
  if FLAGS.distributed:
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  logging.info("JAX devices: %s (process %d of %d)", jax.devices(), jax.process_index(),
               jax.process_count())
  # Imported here so that --help stays fast.
  from cas_jax import train  # pylint: disable=g-import-not-at-top
  try:
    if FLAGS.mode == "train":
      train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    else:
      from cas_jax import evaluate  # pylint: disable=g-import-not-at-top
      evaluate.evaluate_workdir(FLAGS.config, FLAGS.workdir)
  except (ValueError, FileNotFoundError) as error:
    logging.debug("Traceback of the error below:", exc_info=True)  # shown with --verbosity=1
    sys.exit(f"error: {error}")


if __name__ == "__main__":
  app.run(main)
