"""A thin Orbax CheckpointManager wrapper: keep the two latest and the best (by robust accuracy).

    manager = checkpointing.create_manager(workdir)
    state = checkpointing.restore_or_init(manager, state)      # resumes from the latest
    checkpointing.save(manager, state, metrics={"pgd_acc": 0.41})

A damaged checkpoint (a truncated or corrupt file, a missing _METADATA) is skipped when an
older one restores, and renamed `<step>.unrestorable` (kept for inspection; Orbax ignores
names that are not step numbers). Any other failure to restore stops with its cause.
"""
import json
import os
import re
import zlib
from typing import Any, Mapping, Optional, Tuple

from absl import logging
import jax
from jax.experimental import multihost_utils
from etils import epath
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from cas_jax import errors

BEST_METRIC = "pgd_acc"
UNRESTORABLE_SUFFIX = ".unrestorable"


def _best_metric(metrics: Mapping[str, float]) -> float:
  return float(metrics.get(BEST_METRIC, float("-inf")))


def create_manager(workdir: str, async_save: bool = True) -> ocp.CheckpointManager:
  """A manager in workdir/checkpoints keeping the two latest and the best checkpoint."""
  # Two latest: if the newest cannot be read back, training resumes from the one before.
  keep = policies.AnyPreservationPolicy([
      policies.LatestN(n=2),
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


def add_metrics(manager: ocp.CheckpointManager, step: int, metrics: Mapping[str, float]) -> None:
  """Attach evaluation metrics to saved checkpoint `step` (one saved before its evaluation)."""
  if not metrics:
    return
  manager.wait_until_finished()
  if jax.process_index() == 0:
    # Where and how CheckpointManager.save writes them: <step>/metrics/metrics, JSON.
    name = ocp.checkpoint_manager.METRIC_ITEM_NAME
    folder = epath.Path(manager.directory) / str(step) / name
    folder.mkdir(exist_ok=True)
    ocp.JsonCheckpointHandler(filename=name).save(
        folder, args=ocp.args.JsonSave({k: float(v) for k, v in metrics.items()}))
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"cas_jax metrics of checkpoint {step}")
  manager.reload()


def restore(manager: ocp.CheckpointManager, state: Any, step: Optional[int] = None) -> Any:
  """Restore checkpoint `step` (default: the latest) into the structure and shardings of `state`."""
  step = manager.latest_step() if step is None else step
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)
  return manager.restore(step, args=ocp.args.StandardRestore(abstract))


def _first_line(error: Exception) -> str:
  first = (str(error).strip().splitlines() or [""])[0]
  return f"{type(error).__name__}: {first.split(' See full TensorStore details')[0][:200]}"


def _set_aside(manager: ocp.CheckpointManager, step: int) -> str:
  """Rename checkpoint `step` to <step>.unrestorable[.k] (never deleted); the new path."""
  source = os.path.join(str(manager.directory), str(step))
  target, k = source + UNRESTORABLE_SUFFIX, 1
  while os.path.exists(target):
    target, k = f"{source}{UNRESTORABLE_SUFFIX}.{k}", k + 1
  if jax.process_index() == 0:
    os.rename(source, target)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"cas_jax set aside checkpoint {step}")
  return target


# TensorStore's status codes for files that are cut short, corrupt or gone: damage. Others
# (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, UNKNOWN: an I/O error...) are not.
DAMAGE_CODES = ("OUT_OF_RANGE:", "DATA_LOSS:", "NOT_FOUND:")
_STATUS_CODE = re.compile(r"^[A-Z_]+: ")


class RestoreError(RuntimeError):
  """A checkpoint could not be read for a reason other than damage (it was left in place)."""


def damage(manager: ocp.CheckpointManager, step: int, error: Exception) -> Optional[str]:
  """What is damaged in checkpoint `step` (files missing, cut short, corrupt), or None."""
  step_dir = os.path.join(str(manager.directory), str(step))
  missing = [name for name in ("default", os.path.join("default", "_METADATA"))
             if not os.path.exists(os.path.join(step_dir, name))]
  if missing:
    return f"{missing[-1]} is missing"
  if isinstance(error, json.JSONDecodeError):
    return f"unreadable metadata ({error})"
  if isinstance(error, ValueError) and str(error).startswith(DAMAGE_CODES):
    return _first_line(error)
  return None


def _is_config_mismatch(error: Exception) -> bool:
  """A ValueError from Orbax or the tree utilities (shapes, structure), not from TensorStore I/O."""
  return isinstance(error, ValueError) and not _STATUS_CODE.match(str(error))


def _hosts_agree(value: Any) -> bool:
  """Whether every process holds the same `value` (always true with one process)."""
  if jax.process_count() == 1:
    return True
  digest = zlib.crc32(repr(value).encode()) & 0x7FFFFFFF
  digests = multihost_utils.process_allgather(jax.numpy.asarray(digest, jax.numpy.int32))
  return bool((digests == digests[0]).all())


def restore_or_init(manager: ocp.CheckpointManager, state: Any) -> Any:
  """The newest checkpoint that restores into `state`'s structure, or `state` if there is none.

  Only damage (files missing, cut short or corrupt, on every host) is skipped: such a newer
  checkpoint is renamed once an older one restores. A config whose train state does not fit
  raises a UserError; any other failure (out of memory, a transient I/O error, hosts that
  disagree) raises RestoreError with its cause, and nothing is renamed.
  """
  damaged, steps = [], sorted(manager.all_steps(), reverse=True)
  if not _hosts_agree(steps):
    raise RestoreError(f"the hosts see different checkpoints in {manager.directory} (here: "
                       f"steps {sorted(steps)}); nothing was renamed; give every host the same "
                       "folder (a shared filesystem) and rerun")
  for step in steps:
    try:
      restored = restore(manager, state, step)
    except Exception as error:  # pylint: disable=broad-except  (TensorStore, Orbax, OS errors)
      problem = damage(manager, step, error)
      if not _hosts_agree(problem is not None):
        raise RestoreError(f"checkpoint step {step} in {manager.directory}: the hosts disagree "
                           f"on whether it is damaged (here: {problem or _first_line(error)}); "
                           "nothing was renamed; check every host's view of the folder and "
                           "rerun") from error
      if problem is not None:
        damaged.append((step, problem))
        continue
      if _is_config_mismatch(error):
        raise errors.UserError(
            f"checkpoint step {step} in {manager.directory} is whole but does not fit this "
            f"config's train state ({_first_line(error)}); rerun with the config that wrote "
            "it, or use a new --workdir") from error
      raise RestoreError(f"checkpoint step {step} in {manager.directory} could not be read "
                         f"({_first_line(error)}); it is not damaged and was left in place: "
                         "fix the cause and rerun") from error
    for bad_step, problem in damaged:
      target = _set_aside(manager, bad_step)
      logging.warning("Checkpoint step %d cannot be restored (%s); kept as %s. Resuming from "
                      "step %d.", bad_step, problem, target, step)
    if damaged:
      manager.reload()
    return restored
  if damaged:
    step, problem = damaged[0]
    raise errors.UserError(
        f"every checkpoint in {manager.directory} is damaged (step {step}: {problem}); move "
        "them out of the folder to start over, or use a new --workdir")
  return state


def best_step(manager: ocp.CheckpointManager) -> Optional[int]:
  """The step of the checkpoint with the highest robust accuracy, or None."""
  scored = [(s, manager.metrics(s)) for s in manager.all_steps()]
  scored = [(s, _best_metric(m)) for s, m in scored if m]
  return max(scored, key=lambda item: item[1])[0] if scored else None


def _replicated() -> jax.sharding.NamedSharding:
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _leaves(tree: Any) -> dict:
  """{'params/layer1_0/conv1/kernel': leaf} of every leaf in `tree`."""
  return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _shapes(tree: Any) -> dict:
  return {name: tuple(leaf.shape) for name, leaf in _leaves(tree).items()}


def _mismatches(saved: dict, network: dict) -> list:
  """'name: what differs' between the saved arrays' shapes and the network's."""
  problems = [f"{name}: not in the checkpoint" for name in network if name not in saved]
  problems += [f"{name}: only in the checkpoint" for name in saved if name not in network]
  problems += [f"{name}: saved {saved[name]}, the network has {shape}"
               for name, shape in network.items() if name in saved and saved[name] != shape]
  return problems


def restore_variables(workdir: str, template: Any, step: Any = "last") -> Tuple[int, Any]:
  """(step, {'params', 'batch_stats'}) of a workdir checkpoint: 'last', 'best' or a step number.

  `template` ({'params', 'batch_stats'} of the network, arrays or jax.ShapeDtypeStructs, e.g.
  models.variable_shapes) gives the structure; the restored arrays are replicated over every
  device unless the template's leaves carry shardings. Only these two collections are read.
  """
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  manager = create_manager(workdir, async_save=False) if os.path.isdir(directory) else None
  if manager is None or manager.latest_step() is None:
    raise FileNotFoundError(f"no checkpoint in {directory}: train first (python main.py "
                            f"--config=... --workdir={workdir})")
  chosen = {"last": manager.latest_step(), "best": best_step(manager)}.get(step, step)
  if chosen is None or chosen not in manager.all_steps():
    raise FileNotFoundError(f"no {step} checkpoint in {directory} (saved steps: "
                            f"{sorted(manager.all_steps())}); 'best' needs evaluation metrics")
  wanted = {name: template[name] for name in ("params", "batch_stats")}
  replicated = _replicated()
  abstract = jax.tree_util.tree_map(
      lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                        sharding=getattr(leaf, "sharding", None) or replicated),
      wanted)
  # A partial restore reads only these collections (not the optimizer state).
  args = ocp.args.PyTreeRestore(
      item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
      partial_restore=True)
  try:
    restored, failure = manager.restore(chosen, args=args), None
  except ValueError as error:  # a shape mismatch; named below
    if not _is_config_mismatch(error):  # TensorStore could not read it: not the config's fault
      raise RestoreError(f"checkpoint step {chosen} in {directory} could not be read "
                         f"({_first_line(error)})") from error
    restored, failure = None, error
  tree = getattr(manager.item_metadata(chosen), "tree", None)  # known once restore has read it
  saved = _shapes({name: tree.get(name, {}) for name in wanted}) if isinstance(tree, dict) else {}
  problems = _mismatches(saved, _shapes(wanted)) if saved else []
  if failure is not None and not problems:
    problems = [str(failure).split(". ")[0]]
  if restored is not None and not problems:  # without metadata: entries it lacks stay abstract
    problems = [f"{name}: not in the checkpoint" for name, leaf in _leaves(restored).items()
                if isinstance(leaf, jax.ShapeDtypeStruct)]
  if problems:
    shown = "; ".join(problems[:4]) + (f"; {len(problems) - 4} more" if problems[4:] else "")
    raise errors.UserError(
        f"checkpoint step {chosen} in {directory} does not fit the network built "
        f"from the config ({shown}); set config.model (name, width, cas_stages) as "
        "it was trained")
  return chosen, restored
