"""The user's mistakes told apart from our bugs: a UserError is printed in one line, a bug in full.

    from cas_jax import errors
    raise errors.UserError("batch_size=0; use an integer >= 1")

    with errors.exit_on_user_error():   # main.py, cas_jax/experiments/driver.py
      train.train_and_evaluate(config, workdir)

Raise UserError from an input check (a config field, a flag, a file the user named) with a
message that names the fix. Anything else (a ValueError from JAX's shape checks, an
AssertionError, a bug of ours) keeps its traceback.
"""
import contextlib
import sys

from absl import logging


class UserError(ValueError):
  """Bad input from the user (config, flags, files): reported in one line that names the fix."""


@contextlib.contextmanager
def exit_on_user_error():
  """End with status 1 and one `error: ...` line on a UserError or a missing file; else re-raise."""
  try:
    yield
  except (UserError, FileNotFoundError) as error:
    logging.debug("Traceback of the error below:", exc_info=True)  # shown with --verbosity=1
    sys.exit(f"error: {error}")
