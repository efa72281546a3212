"""A thin Orbax CheckpointManager wrapper: keep the latest and the best (by robust accuracy).

    manager = checkpointing.create_manager(workdir)
    state = checkpointing.restore_or_init(manager, state)      # resumes from the latest
    checkpointing.save(manager, state, metrics={"pgd_acc": 0.41})
"""
import os
from typing import Any, Mapping, Optional

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

BEST_METRIC = "pgd_acc"


def _best_metric(metrics: Mapping[str, float]) -> float:
  return float(metrics.get(BEST_METRIC, float("-inf")))


def create_manager(workdir: str, async_save: bool = True) -> ocp.CheckpointManager:
  """A manager in workdir/checkpoints keeping the latest and the best checkpoint."""
  keep = policies.AnyPreservationPolicy([
      policies.LatestN(n=1),
      policies.BestN(get_metric_fn=_best_metric, n=1, keep_checkpoints_without_metrics=False),
  ])
  # best_fn also makes a fresh manager read the saved metrics back (for resume and best_step).
  options = ocp.CheckpointManagerOptions(
      preservation_policy=keep, best_fn=_best_metric, best_mode="max",
      enable_async_checkpointing=async_save, create=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               options=options)


def save(manager: ocp.CheckpointManager, state: Any,
         metrics: Optional[Mapping[str, float]] = None) -> None:
  """Save `state` at its step (with the evaluation metrics that rank it), if not saved yet."""
  step = int(jax.device_get(state.step))
  if step in manager.all_steps():
    return
  metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
  manager.save(step, args=ocp.args.StandardSave(state), metrics=metrics)


def restore(manager: ocp.CheckpointManager, state: Any, step: Optional[int] = None) -> Any:
  """Restore checkpoint `step` (default: the latest) into the structure and shardings of `state`."""
  step = manager.latest_step() if step is None else step
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)
  return manager.restore(step, args=ocp.args.StandardRestore(abstract))


def restore_or_init(manager: ocp.CheckpointManager, state: Any) -> Any:
  """The latest checkpoint restored into `state`'s structure, or `state` itself if there is none."""
  if manager.latest_step() is None:
    return state
  return restore(manager, state)


def best_step(manager: ocp.CheckpointManager) -> Optional[int]:
  """The step of the checkpoint with the highest robust accuracy, or None."""
  scored = [(s, manager.metrics(s)) for s in manager.all_steps()]
  scored = [(s, _best_metric(m)) for s, m in scored if m]
  return max(scored, key=lambda item: item[1])[0] if scored else None
