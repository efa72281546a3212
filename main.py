"""Train or evaluate a CAS model.

  python main.py --config=configs/cifar10_at_cas.py --workdir=runs/at_cas
  python main.py --config=configs/cifar10_at_cas.py --workdir=runs/at_cas --mode=eval
  python main.py --config=configs/cifar10_at_cas.py --workdir=runs/at_cas --mode=analyze
"""
import logging as python_logging
import os
import shlex
import signal
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "A config file from configs/.", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, metrics and reports go here.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "analyze"],
                  "Train (resumes), evaluate a workdir, or draw the paper's channel analyses.")
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
    if str(record.msg).startswith("Requested `tracked_metric`"):
      return False  # Orbax, on every checkpoint saved without evaluation metrics
    return ours or record.levelno >= python_logging.WARNING


def _exit_now(signum, frame):
  """SIGINT / SIGTERM outside the training loop: nothing in flight to save, so end at once."""
  del frame
  print(f"{signal.Signals(signum).name} outside the training loop: nothing in flight to save; "
        "rerunning the same command resumes from the latest checkpoint", file=sys.stderr,
        flush=True)
  os._exit(128 + signum)  # pylint: disable=protected-access  (no traceback, no cleanup wait)


def _config_paths(argv):
  """The --config=FILE[:args] paths in argv (either flag form)."""
  paths = []
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      paths.append(arg[len("--config="):])
    elif arg == "--config" and i + 1 < len(argv):
      paths.append(argv[i + 1])
  return [p.split(":")[0] for p in paths]


def parse_flags(argv):
  """absl's flag parsing, with every mistake (missing config file, unknown key) in one line."""
  for path in _config_paths(argv):
    if not os.path.isfile(path):
      sys.exit(f"error: config file {path} does not exist; pass one of configs/*.py, e.g. "
               "--config=configs/smoke.py")
  try:
    return FLAGS(argv)
  except flags.Error as error:
    sys.exit(f"error: {error}; see --helpshort")
  except (AttributeError, KeyError) as error:  # ml_collections: an override of an unknown key
    key = str(error).strip("\"'")
    culprits = [a for a in argv if a.startswith("--config.")
                and key in a.split("=")[0].split(".")[1:]]
    sys.exit(f"error: no config field {key!r} (in {' '.join(culprits)}); see "
             "configs/default.py for the valid names")


def main(argv):
  """Dispatch to training or evaluation; the user's mistakes (errors.UserError) end in one line."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if FLAGS.verbosity <= 0:  # --verbosity=1 shows every library's INFO lines
    logging.get_absl_handler().addFilter(_QuietLibraries())
  import jax  # pylint: disable=g-import-not-at-top  (after the signal handlers)
  if FLAGS.distributed:
    # Its preemption service then takes SIGTERM.
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  logging.info("JAX devices: %s (process %d of %d)", jax.devices(), jax.process_index(),
               jax.process_count())
  # Imported here so that --help stays fast.
  from cas_jax import train  # pylint: disable=g-import-not-at-top
  from cas_jax import preemption  # pylint: disable=g-import-not-at-top
  from cas_jax import errors  # pylint: disable=g-import-not-at-top
  from cas_jax import models  # pylint: disable=g-import-not-at-top
  try:
    with errors.exit_on_user_error():  # a bug of ours (any other error) keeps its traceback
      # The network's name and options, before any data is read (training checks them too).
      models.from_config(FLAGS.config, FLAGS.config.data.num_classes)
      if FLAGS.mode == "train":
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
      elif FLAGS.mode == "analyze":
        from cas_jax import analysis  # pylint: disable=g-import-not-at-top
        analysis.analyze_workdir(FLAGS.config, FLAGS.workdir)
      else:
        from cas_jax import evaluate  # pylint: disable=g-import-not-at-top
        evaluate.evaluate_workdir(FLAGS.config, FLAGS.workdir)
  except preemption.Stopped as stopped:
    # Exit status 128 + signal number, as if the signal had ended the process: schedulers
    # then see a preempted job (to requeue), not a finished one.
    print(f"{stopped} with its checkpoint saved; resume with: "
          f"{shlex.join([sys.executable, *sys.argv])}", file=sys.stderr)
    sys.exit(stopped.exit_status)


if __name__ == "__main__":
  # The training loop installs its own handlers (finish the step, save, stop) while it runs.
  for signum in (signal.SIGINT, signal.SIGTERM):
    signal.signal(signum, _exit_now)
  app.run(main, flags_parser=parse_flags)
