"""Scalar metrics to TensorBoard event files (tensorboardX) and to a JSON-lines file in the workdir.

`metrics.jsonl` is strict JSON: a non-finite value is written as null. On resume from step S
the rows after S are dropped from `metrics.jsonl` (rewritten in place, atomically); TensorBoard
event files cannot be rewritten, so the writer starts with `purge_step=S + 1`, which makes
TensorBoard hide the older events after S.
"""
import json
import math
import os
import sys
import tempfile
from typing import Mapping, Optional

from absl import logging
import jax
import numpy as np

from cas_jax import errors

METRICS_FILE = "metrics.jsonl"


def check_workdir(workdir: str) -> None:
  """Create workdir if needed and check that files can be written there; ValueError if not."""
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.TemporaryFile(dir=workdir):
      pass
  except OSError as error:
    raise errors.UserError(
        f"cannot write to --workdir={workdir} ({error.strerror or error}); pass a "
        "folder you can write to") from None


def row_step(line: str) -> Optional[int]:
  """The step of a metrics.jsonl line, or None for a line that is not a complete row."""
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):  # a line cut short by a kill
    return None


def drop_rows_after(path: str, step: int) -> int:
  """Remove the rows of a metrics.jsonl after `step` (and unreadable ones); how many went."""
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    lines = f.readlines()
  kept = [l if l.endswith("\n") else l + "\n" for l in lines
          if (s := row_step(l)) is not None and s <= step]
  if len(kept) < len(lines):
    temporary = path + ".tmp"
    with open(temporary, "w") as f:
      f.writelines(kept)
    os.replace(temporary, path)
  return len(lines) - len(kept)


def summary_writer(logdir: str, purge_step: Optional[int] = None):
  """tensorboardX's SummaryWriter for `logdir`, tensorboardX imported without torch.

  Where torch is installed, tensorboardX imports it only to accept torch tensors, which we never
  write, and that import adds about 1.4 s to every start of a command that trains (2 CPU
  cores). While tensorboardX loads, `import torch` fails as if torch were absent, which
  tensorboardX handles; a torch the process already imported is left alone.
  """
  hide = "torch" not in sys.modules
  if hide:
    sys.modules["torch"] = None  # import torch raises ImportError while this is set
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  finally:
    if hide:
      del sys.modules["torch"]
  return SummaryWriter(logdir=logdir, purge_step=purge_step)


class MetricWriter:
  """Writes scalars as TensorBoard events and as `metrics.jsonl` lines; only on process 0.

  resume_step: the step training (re)starts from; later rows of an earlier run are dropped.
  """

  def __init__(self, workdir: str, resume_step: Optional[int] = None):
    self._active = jax.process_index() == 0
    if self._active:
      os.makedirs(workdir, exist_ok=True)
      path = os.path.join(workdir, METRICS_FILE)
      purge_step = None
      if resume_step is not None:
        dropped = drop_rows_after(path, resume_step)
        if dropped:
          logging.info("Dropped %d rows of %s after the restored step %d.", dropped, path,
                       resume_step)
        purge_step = resume_step + 1
      self._tensorboard = summary_writer(os.path.join(workdir, "tensorboard"), purge_step)
      self._jsonl = open(path, "a")

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    """Record `scalars` at `step` in both sinks (non-finite values as null in the JSON)."""
    if not self._active:
      return
    scalars = {k: float(np.asarray(v)) for k, v in scalars.items()}
    for name, value in scalars.items():
      self._tensorboard.add_scalar(name, value, step)
    row = {k: v if math.isfinite(v) else None for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": int(step), **row}, allow_nan=False) + "\n")
    self._jsonl.flush()

  def close(self) -> None:
    """Flush and close both sinks."""
    if self._active:
      self._tensorboard.close()
      self._jsonl.close()
