"""The user's mistakes told apart from our bugs: a UserError is printed in one line, a bug in full.

    from cas_jax import errors
    raise errors.UserError("batch_size=0; use an integer >= 1")

    with errors.exit_on_user_error():   # main.py, cas_jax/experiments/driver.py
      train.train_and_evaluate(config, workdir)

Raise UserError from an input check (a config field, a flag, a file the user named) with a
message that names the fix, OperationalError for a failure of the machine (a read error, out of
memory) with its cause; both print one line, their traceback only with --verbosity=1. Anything else (a ValueError from JAX's shape checks, an
AssertionError, a bug of ours) keeps its traceback.
"""
import contextlib
import sys

from absl import logging


class UserError(ValueError):
  """Bad input from the user (config, flags, files): reported in one line that names the fix."""


class OperationalError(RuntimeError):
  """The machine, not the code, failed (a read error, memory, hosts that disagree): one line."""


@contextlib.contextmanager
def exit_on_user_error():
  """End with status 1 and one `error: ...` line on a UserError or a missing file; else re-raise."""
  try:
    yield
  except (UserError, OperationalError, FileNotFoundError) as error:
    logging.debug("Traceback of the error below:", exc_info=True)  # shown with --verbosity=1
    sys.exit(f"error: {error}")
