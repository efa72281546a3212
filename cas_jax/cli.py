"""What the command-line tools share: config names or files, one-line errors, signals, logging.

`cas-jax` (cas_jax/main.py, the checkout's main.py), `cas-jax-experiments`
(cas_jax/experiments/driver.py) and `cas-jax-benchmark` (cas_jax/evaluation/benchmark_cli.py)
run through `run(main)`.
"""
import contextlib
import logging as python_logging
import os
import shlex
import signal
import sys
from typing import Callable, List

from absl import app
from absl import flags

import cas_jax
from cas_jax import configs

FLAGS = flags.FLAGS
PACKAGE_DIR = os.path.dirname(os.path.abspath(cas_jax.__file__)) + os.sep


class QuietLibraries(python_logging.Filter):
  """Keep INFO lines from cas_jax; libraries (Orbax, JAX) only from WARNING up."""

  def filter(self, record):
    """Whether `record` is shown."""
    ours = os.path.abspath(record.pathname).startswith(PACKAGE_DIR)
    if str(record.msg).startswith("Requested `tracked_metric`"):
      return False  # Orbax, on every checkpoint saved without evaluation metrics
    return ours or record.levelno >= python_logging.WARNING


CPU_CONVOLUTIONS_ENV = "CAS_JAX_CPU_CONVOLUTIONS"
YNN_FUSIONS_FLAG = "--xla_cpu_experimental_ynn_fusion_type"


def use_eigen_cpu_convolutions() -> bool:
  """Have XLA:CPU run convolutions with Eigen instead of YNNPACK; True if XLA_FLAGS changed.

  On 2 CPU cores a full-width ResNet-18 then takes 0.75-0.8x the seconds per input-gradient
  step at batches 8-32 and 0.6-0.8x per forward pass, and our AutoAttack 0.6x
  (docs/evaluation.md). XLA reads XLA_FLAGS once, when JAX starts its backends, so call this
  before the first computation; it leaves XLA_FLAGS alone once they started, when XLA_FLAGS
  already sets YNNPACK's fusions, or when CAS_JAX_CPU_CONVOLUTIONS=xla (XLA's own choice).
  """
  current = os.environ.get("XLA_FLAGS", "")
  # jax's own answer where this jax has it (private); a jax without it counts as not started.
  bridge = getattr(getattr(sys.modules.get("jax"), "_src", None), "xla_bridge", None)
  started = bool(getattr(bridge, "backends_are_initialized", lambda: False)())
  if (os.environ.get(CPU_CONVOLUTIONS_ENV, "").strip().lower() == "xla"
      or YNN_FUSIONS_FLAG in current or started):
    return False
  os.environ["XLA_FLAGS"] = f"{current} {YNN_FUSIONS_FLAG}=".strip()
  return True


def _exit_now(signum, frame):
  """SIGINT / SIGTERM outside the training loop: nothing in flight to save, so end at once."""
  del frame
  print(f"{signal.Signals(signum).name} outside the training loop: nothing in flight to save; "
        "rerunning the same command resumes from the latest checkpoint", file=sys.stderr,
        flush=True)
  os._exit(128 + signum)  # pylint: disable=protected-access  (no traceback, no cleanup wait)


@contextlib.contextmanager
def exit_on_stop():
  """A run stopped by SIGTERM / SIGINT with its work saved (preemption.Stopped) ends with the
  command that resumes it and status 128 + the signal number, as if the signal had ended it:
  schedulers then see a preempted job (to requeue), not a finished one."""
  from cas_jax import preemption  # pylint: disable=g-import-not-at-top  (imports jax)
  try:
    yield
  except preemption.Stopped as stopped:
    print(f"{stopped}; resume with: {shlex.join([sys.executable, *sys.argv])}", file=sys.stderr)
    sys.exit(stopped.exit_status)


def resolve_configs(argv: List[str]) -> List[str]:
  """argv with every --config=NAME[:args] of a packaged config name replaced by its file."""
  resolved = list(argv)
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      at, prefix, value = i, "--config=", arg[len("--config="):]
    elif arg == "--config" and i + 1 < len(argv):
      at, prefix, value = i + 1, "", argv[i + 1]
    else:
      continue
    name, colon, args = value.partition(":")
    resolved[at] = prefix + configs.path(name) + colon + args
  return resolved


def parse_flags(argv: List[str]) -> List[str]:
  """absl's flag parsing, with every mistake (missing config file, unknown key) in one line."""
  try:
    argv = resolve_configs(argv)
  except ValueError as error:
    sys.exit(f"error: {error}; e.g. --config=configs/smoke.py or --config=smoke")
  try:
    return FLAGS(argv)
  except flags.Error as error:
    sys.exit(f"error: {error}; see --helpshort")
  except (AttributeError, KeyError) as error:  # ml_collections: an override of an unknown key
    key = str(error).strip("\"'")
    culprits = [a for a in argv if a.startswith("--config.")
                and key in a.split("=")[0].split(".")[1:]]
    sys.exit(f"error: no config field {key!r} (in {' '.join(culprits)}); see "
             "cas_jax/configs/default.py for the valid names")


def run(main: Callable[[List[str]], None]) -> None:
  """app.run(main) with one-line flag errors and quick exits on signals before training."""
  # The training loop installs its own handlers (finish the step, save, stop) while it runs.
  for signum in (signal.SIGINT, signal.SIGTERM):
    signal.signal(signum, _exit_now)
  # --help shows the program module's docstring and flags, also when a console script runs it.
  program = sys.modules[main.__module__]
  for flag in FLAGS.get_key_flags_for_module(program):
    FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  if not sys.modules["__main__"].__doc__:
    sys.modules["__main__"].__doc__ = program.__doc__
  use_eigen_cpu_convolutions()
  from cas_jax import compilation  # pylint: disable=g-import-not-at-top  (imports jax: after XLA_FLAGS)
  compilation.use_unrolled_threefry_on_cpu()
  app.run(main, flags_parser=parse_flags)
