"""A thin Orbax CheckpointManager wrapper: keep the two latest and the best (by robust accuracy).

    manager = checkpointing.create_manager(workdir)
    state = checkpointing.restore_or_init(manager, state)      # resumes from the latest
    checkpointing.save(manager, state, metrics={"pgd_acc": 0.41})

Every checkpoint carries an integrity manifest (cas_jax/integrity.py: each file's size and
SHA-256), written once its save has committed: at once for a synchronous save, for an async one
when the next save or `wait_until_finished` finds it committed (Orbax's post-finalization
callback runs before the commit, on the temporary folder). A restore verifies it
first: a missing, resized, changed or extra file is damage, certain; such a checkpoint is
renamed `<step>.unrestorable` (kept for inspection; Orbax ignores names that are not step
numbers) and the previous verified one restores. A checkpoint whose manifest verifies but which
still cannot be read (out of memory, a permission or transient I/O error) stops the run with
one line and renames nothing. A checkpoint written before manifests existed is restored
unverified, and the log says so.
"""
import collections
import json
import os
import threading
import weakref
import zlib
from typing import Any, Dict, Mapping, Optional, Tuple

from absl import logging
import jax
import numpy as np
from jax.experimental import multihost_utils
from etils import epath
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from cas_jax import errors
from cas_jax import input_pipeline
from cas_jax import integrity

BEST_METRIC = "pgd_acc"
UNRESTORABLE_SUFFIX = ".unrestorable"


def _best_metric(metrics: Mapping[str, float]) -> float:
  return float(metrics.get(BEST_METRIC, float("-inf")))


# Steps saved by this process whose manifest is still to be written, per checkpoint folder.
_PENDING: Dict[str, list] = {}
_PENDING_LOCK = threading.Lock()
_ASYNC_MANAGERS = weakref.WeakSet()  # managers whose saves commit in the background


def _write_pending_manifests(directory: str) -> None:
  """Write the manifest of every step this process saved into `directory` that has committed."""
  with _PENDING_LOCK:
    pending = _PENDING.get(directory, [])
    ready = [step for step in pending if os.path.isdir(os.path.join(directory, str(step)))]
    _PENDING[directory] = [step for step in pending if step not in ready]
  if jax.process_index() == 0:
    for step in ready:
      integrity.write_manifest(os.path.join(directory, str(step)))


def create_manager(workdir: str, async_save: bool = True) -> ocp.CheckpointManager:
  """A manager in workdir/checkpoints keeping the two latest and the best checkpoint."""
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  # Two latest: if the newest cannot be read back, training resumes from the one before.
  keep = policies.AnyPreservationPolicy([
      policies.LatestN(n=2),
      policies.BestN(get_metric_fn=_best_metric, n=1, keep_checkpoints_without_metrics=False),
  ])
  # best_fn also makes a fresh manager read the saved metrics back (for resume and best_step).
  options = ocp.CheckpointManagerOptions(
      preservation_policy=keep, best_fn=_best_metric, best_mode="max",
      enable_async_checkpointing=async_save, create=True)
  manager = ocp.CheckpointManager(directory, options=options)
  if async_save:
    _ASYNC_MANAGERS.add(manager)
  return manager


def save(manager: ocp.CheckpointManager, state: Any,
         metrics: Optional[Mapping[str, float]] = None) -> None:
  """Save `state` at its step (with the evaluation metrics that rank it), if not saved yet."""
  step = int(jax.device_get(state.step))
  if step in manager.all_steps():
    return
  metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
  directory = str(manager.directory)
  wait_until_finished(manager)  # the previous save commits and gets its manifest
  with _PENDING_LOCK:
    _PENDING.setdefault(directory, []).append(step)
  manager.save(step, args=ocp.args.StandardSave(state), metrics=metrics)
  if manager not in _ASYNC_MANAGERS:
    _write_pending_manifests(directory)  # a synchronous save has committed on return


def wait_until_finished(manager: ocp.CheckpointManager) -> None:
  """Wait for the save in flight to commit, then write the manifests still due."""
  manager.wait_until_finished()
  _write_pending_manifests(str(manager.directory))


def add_metrics(manager: ocp.CheckpointManager, step: int, metrics: Mapping[str, float]) -> None:
  """Attach evaluation metrics to saved checkpoint `step` (one saved before its evaluation)."""
  if not metrics:
    return
  wait_until_finished(manager)
  if jax.process_index() == 0:
    # Where and how CheckpointManager.save writes them: <step>/metrics/metrics, JSON.
    name = ocp.checkpoint_manager.METRIC_ITEM_NAME
    step_dir = str(epath.Path(manager.directory) / str(step))
    verified = integrity.check_manifest(step_dir).status == "verified"
    folder = epath.Path(step_dir) / name
    folder.mkdir(exist_ok=True)
    ocp.JsonCheckpointHandler(filename=name).save(
        folder, args=ocp.args.JsonSave({k: float(v) for k, v in metrics.items()}))
    if verified:  # record the metrics too (a damaged checkpoint is never re-blessed)
      integrity.write_manifest(step_dir)
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


class RestoreError(errors.OperationalError):
  """A checkpoint could not be read for a reason other than damage (it was left in place)."""


def _legacy_damage(step_dir: str, error: Exception) -> Optional[str]:
  """What is certainly damaged in a checkpoint without a manifest (files gone, metadata cut)."""
  missing = [name for name in ("default", os.path.join("default", "_METADATA"))
             if not os.path.exists(os.path.join(step_dir, name))]
  if missing:
    return f"{missing[-1]} is missing"
  if isinstance(error, json.JSONDecodeError):
    return f"unreadable metadata ({error})"
  return None


def _path_name(path) -> str:
  """'params/layer1_0/conv1/kernel' of a tree path (dict keys, attributes, list indices)."""
  parts = [getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path]
  return "/".join(str(p) for p in parts)


def _saved_shapes(step_dir: str) -> Optional[dict]:
  """{leaf name: shape} of a checkpoint's train state from its metadata (None if unreadable)."""
  try:
    tree = ocp.StandardCheckpointHandler().metadata(epath.Path(step_dir) / "default").tree
  except Exception:  # pylint: disable=broad-except  (no metadata: nothing to compare)
    return None
  return _shapes(tree)


def _state_mismatch(saved: Optional[dict], state: Any) -> list:
  """What differs between the saved arrays and the train state's ([] if they fit or unknown).

  The shapes are compared as multisets: Orbax's metadata and the live state may name a leaf
  differently (a tuple index, a field name), never give it another shape.
  """
  wanted = _shapes(state)
  if saved is None or collections.Counter(saved.values()) == collections.Counter(wanted.values()):
    return []
  named = [p for p in _mismatches(saved, wanted) if "saved" in p]  # same name, other shape
  return named or [f"{len(saved)} arrays saved, {len(wanted)} in the train state, shapes differ"]


def _hosts_agree(value: Any) -> bool:
  """Whether every process holds the same `value` (always true with one process)."""
  if jax.process_count() == 1:
    return True
  digest = zlib.crc32(repr(value).encode()) & 0x7FFFFFFF
  digests = multihost_utils.process_allgather(jax.numpy.asarray(digest, jax.numpy.int32))
  return bool((digests == digests[0]).all())


def _one_line(problems: list) -> str:
  return "; ".join(problems[:4]) + (f"; {len(problems) - 4} more" if problems[4:] else "")


def restore_or_init(manager: ocp.CheckpointManager, state: Any) -> Any:
  """The newest checkpoint that verifies and restores into `state`, or `state` if there is none."""
  return restore_newest(manager, state)[0]


def restore_newest(manager: ocp.CheckpointManager, state: Any) -> Tuple[Any, bool]:
  """(restore_or_init's state, whether its files were verified: False without a manifest).

  Damage is what the manifest shows (a missing, resized, changed or extra file): such a newer
  checkpoint is renamed once an older one restores. A checkpoint that verifies but does not fit
  the config's train state raises a UserError; any other failure (out of memory, a transient
  I/O error, hosts that disagree) raises RestoreError (one line) and nothing is renamed.
  """
  damaged, steps = [], sorted(manager.all_steps(), reverse=True)
  if not _hosts_agree(steps):
    raise RestoreError(f"the hosts see different checkpoints in {manager.directory} (here: "
                       f"steps {sorted(steps)}); nothing was renamed; give every host the same "
                       "folder (a shared filesystem) and rerun")
  for step in steps:
    step_dir = os.path.join(str(manager.directory), str(step))
    verdict = integrity.check_manifest(step_dir)
    if not _hosts_agree(verdict.status):
      raise RestoreError(f"checkpoint step {step} in {manager.directory}: the hosts disagree "
                         f"on whether it is damaged (here: {verdict.status}); nothing was "
                         "renamed; check every host's view of the folder and rerun")
    if verdict.status == "damaged":
      damaged.append((step, verdict.problem))
      continue
    try:
      restored = restore(manager, state, step)
    except Exception as error:  # pylint: disable=broad-except  (TensorStore, Orbax, OS errors)
      problem = _legacy_damage(step_dir, error) if verdict.status == "unverified" else None
      if not _hosts_agree(problem is not None):
        raise RestoreError(f"checkpoint step {step} in {manager.directory}: the hosts disagree "
                           f"on whether it is damaged (here: {problem or _first_line(error)}); "
                           "nothing was renamed; check every host's view of the folder and "
                           "rerun") from error
      if problem is not None:
        damaged.append((step, problem))
        continue
      mismatches = _state_mismatch(_saved_shapes(step_dir), state)
      if mismatches:
        raise errors.UserError(
            f"checkpoint step {step} in {manager.directory} is whole but does not fit this "
            f"config's train state ({_one_line(mismatches)}); rerun with the config that wrote "
            "it, or use a new --workdir") from error
      unverified = ("; it has no integrity manifest (saved before manifests), so damage cannot "
                    "be told from a read failure: move it out of the folder to resume from "
                    "the one before" if verdict.status == "unverified" else
                    "; its files verify against their manifest, so it is not damaged and was "
                    "left in place: fix the cause and rerun")
      raise RestoreError(f"checkpoint step {step} in {manager.directory} could not be read "
                         f"({_first_line(error)}){unverified}") from error
    if verdict.status == "unverified":
      logging.warning("Checkpoint step %d in %s has no integrity manifest (saved before "
                      "manifests existed): restored without verifying its files.", step,
                      manager.directory)
    for bad_step, problem in damaged:
      target = _set_aside(manager, bad_step)
      logging.warning("Checkpoint step %d cannot be restored (%s); kept as %s. Resuming from "
                      "step %d.", bad_step, problem, target, step)
    if damaged:
      manager.reload()
    return restored, verdict.status == "verified"
  if damaged:
    step, problem = damaged[0]
    raise errors.UserError(
        f"every checkpoint in {manager.directory} is damaged (step {step}: {problem}); move "
        "them out of the folder to start over, or use a new --workdir")
  return state, True


def newest_verified_step(manager: ocp.CheckpointManager) -> Optional[int]:
  """The newest checkpoint whose files match their manifest (its values are finite: train
  checks the state before every save), or None."""
  for step in sorted(manager.all_steps(), reverse=True):
    if integrity.check_manifest(os.path.join(str(manager.directory), str(step))).status == \
        "verified":
      return step
  return None


def best_step(manager: ocp.CheckpointManager) -> Optional[int]:
  """The step of the checkpoint with the highest robust accuracy, or None."""
  scored = [(s, manager.metrics(s)) for s in manager.all_steps()]
  scored = [(s, _best_metric(m)) for s, m in scored if m]
  return max(scored, key=lambda item: item[1])[0] if scored else None


def _replicated() -> jax.sharding.NamedSharding:
  # The data mesh (Auto axes): weights on an Explicit mesh cannot meet batches sharded on it.
  return jax.sharding.NamedSharding(input_pipeline.data_mesh(), jax.sharding.PartitionSpec())


def _leaves(tree: Any) -> dict:
  """{'params/layer1_0/conv1/kernel': leaf} of every leaf in `tree`."""
  return {_path_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _shapes(tree: Any) -> dict:
  """{leaf name: shape}; a Python number (TrainState.step before a restore) has shape ()."""
  return {name: tuple(leaf.shape if hasattr(leaf, "shape") else np.shape(leaf))
          for name, leaf in _leaves(tree).items()}


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
  step_dir = os.path.join(directory, str(chosen))
  verdict = integrity.check_manifest(step_dir)
  if verdict.status == "damaged":
    raise RestoreError(f"checkpoint step {chosen} in {directory} is damaged ({verdict.problem}); "
                       f"evaluate another step (saved: {sorted(manager.all_steps())})")
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
  except ValueError as error:  # a shape mismatch (named below) or a read failure
    restored, failure = None, error
  saved = {name: shape for name, shape in (_saved_shapes(step_dir) or {}).items()
           if name.split("/", 1)[0] in wanted}
  problems = _mismatches(saved, _shapes(wanted)) if saved else []
  if failure is not None and not problems:  # the network fits: it could not be read
    raise RestoreError(f"checkpoint step {chosen} in {directory} could not be read "
                       f"({_first_line(failure)})") from failure
  if restored is not None and not problems:  # without metadata: entries it lacks stay abstract
    problems = [f"{name}: not in the checkpoint" for name, leaf in _leaves(restored).items()
                if isinstance(leaf, jax.ShapeDtypeStruct)]
  if problems:
    raise errors.UserError(
        f"checkpoint step {chosen} in {directory} does not fit the network built "
        f"from the config ({_one_line(problems)}); set config.model (name, width, cas_stages) "
        "as it was trained")
  return chosen, restored
