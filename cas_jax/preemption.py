"""Stop training cleanly when the job is preempted (SIGTERM) or interrupted (SIGINT).

    signals = preemption.StopSignals().install()   # or: with preemption.StopSignals() as signals:
    try:
      for step in ...:
        state = train_step(state, ...)
        signum = signals.requested(manager, step)
        if signum:
          save(...); raise preemption.Stopped(step, signum)
    finally:
      signals.restore()

In one process, a Python handler only records the first SIGTERM or SIGINT, so the step in
flight finishes and the loop saves it; a second SIGINT goes to the handler that was there
before (KeyboardInterrupt by default; main.py's ends the process at once).
With several processes (`--distributed`) no handler is installed: JAX's preemption service
catches SIGTERM and Orbax's `CheckpointManager.reached_preemption` makes every process stop
at the same step, so all of them take part in the last checkpoint.
"""
import signal
import threading
from typing import Optional

import jax

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(Exception):
  """Training stopped on a signal after `step`, whose checkpoint was saved."""

  def __init__(self, step: int, signum: int, message: Optional[str] = None):
    self.step, self.signum = step, signum
    self.signal_name = signal.Signals(signum).name
    super().__init__(message or f"stopped by {self.signal_name} after step {step} with its "
                     "checkpoint saved")

  @property
  def exit_status(self) -> int:
    """128 + the signal number, what a shell reports for a process ended by that signal."""
    return 128 + self.signum


class StopSignals:
  """Context manager recording a stop request instead of dying on SIGTERM / SIGINT."""

  def __init__(self):
    self.signum: Optional[int] = None
    self._previous = {}

  def install(self) -> "StopSignals":
    """Record SIGTERM / SIGINT from now on (one process, main thread); returns self."""
    self._previous = {}
    # Handlers can only be set from the main thread; several processes use JAX's service.
    if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
      for signum in SIGNALS:
        self._previous[signum] = signal.signal(signum, self._record)
    return self

  def restore(self) -> None:
    """Put back the handlers that were there before install()."""
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}

  def __enter__(self) -> "StopSignals":
    return self.install()

  def __exit__(self, *exc_info) -> None:
    self.restore()

  def _record(self, signum, frame) -> None:
    if self.signum is not None and signum == signal.SIGINT:
      # A second Ctrl-C: stop now, without a checkpoint, as the handler before ours would.
      previous = self._previous.get(signum)
      if callable(previous):
        previous(signum, frame)
      elif previous != signal.SIG_IGN:
        raise KeyboardInterrupt
      return
    self.signum = signum

  def requested(self, manager, step: int) -> Optional[int]:
    """The signal to stop on after `step` (all processes agree), or None to go on."""
    if self.signum is not None:
      return self.signum
    if jax.process_count() > 1 and manager.reached_preemption(step):
      return signal.SIGTERM
    return None
