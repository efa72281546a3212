"""Scalar metrics to TensorBoard event files (tensorboardX) and to a JSON-lines file in the workdir."""
import json
import os
from typing import Mapping

import jax
import numpy as np
from tensorboardX import SummaryWriter


class MetricWriter:
  """Writes scalars as TensorBoard events and as `metrics.jsonl` lines; only on process 0."""

  def __init__(self, workdir: str):
    self._active = jax.process_index() == 0
    if self._active:
      os.makedirs(workdir, exist_ok=True)
      self._tensorboard = SummaryWriter(logdir=os.path.join(workdir, "tensorboard"))
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    """Record `scalars` at `step` in both sinks."""
    if not self._active:
      return
    scalars = {k: float(np.asarray(v)) for k, v in scalars.items()}
    for name, value in scalars.items():
      self._tensorboard.add_scalar(name, value, step)
    self._jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
    self._jsonl.flush()

  def close(self) -> None:
    """Flush and close both sinks."""
    if self._active:
      self._tensorboard.close()
      self._jsonl.close()
