"""What produced a run: the resolved config, library versions, the code's commit, the devices.

    record = provenance.provenance(config)          # a JSON-ready dict; reports carry it too
    provenance.check_resume(workdir, config)         # UserError if the trained model would differ
    provenance.record_run(workdir, config, start_step)   # workdir/config.json + provenance.json

A training workdir holds `config.json` (the config of its latest run) and `provenance.json`
(one entry per start or resume: versions, commit, devices, dtype, command, and what changed).
A resume whose config differs in a field that changes the trained model (anything outside
NOT_TRAINING) stops with one line naming the fields, unless `config.allow_config_change` is
set; raising `schedule.num_epochs` to continue a finished run is always allowed. Both are
recorded in provenance.json.
"""
import datetime
import functools
import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys
from typing import Any, Dict, Optional, Tuple

import jax

from cas_jax import errors

CONFIG_FILE = "config.json"
PROVENANCE_FILE = "provenance.json"
# Fields (or whole sections) that do not change the trained weights: evaluation, analysis,
# checkpointing, logging, the test split's size, and where the same data lives on disk.
NOT_TRAINING = ("eval", "analysis", "ckpt", "log_every_steps", "eval_batch_size",
                "data.num_test", "data.synthetic_num_test", "data.cifar_dir",
                "data.tfds_data_dir", "data.tfds_download", "allow_config_change",
                "compilation_cache")
EXTENDABLE = ("schedule.num_epochs",)  # may change on a resume (continue a finished run)
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "ml_collections")
PROJECT = "cas_jax"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def flatten(tree: Any, prefix: str = "") -> Dict[str, Any]:
  """{'optim.lr': 0.1, ...} of a ConfigDict or nested dict, values as JSON would read them back."""
  tree = tree.to_dict() if hasattr(tree, "to_dict") else tree
  flat = {}
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, dict):
      flat.update(flatten(value, path + "."))
    else:
      flat[path] = json.loads(json.dumps(value, default=str))  # tuples -> lists
  return flat


def is_training_field(path: str) -> bool:
  """Whether config field `path` (dotted) changes the trained model."""
  return not any(path == f or path.startswith(f + ".") for f in NOT_TRAINING)


def differences(recorded: Dict[str, Any], config, training_only: bool = True
                ) -> Dict[str, Tuple[Any, Any]]:
  """{field: (recorded value, requested value)} where they differ (a missing field: None)."""
  old, new = flatten(recorded), flatten(config)
  fields = sorted(set(old) | set(new))
  return {f: (old.get(f), new.get(f)) for f in fields
          if old.get(f) != new.get(f) and (is_training_field(f) or not training_only)}


def describe(changes: Dict[str, Tuple[Any, Any]], most: int = 6) -> str:
  """'optim.lr 0.1 -> 0.05, seed 0 -> 1' (the first `most`, then how many more)."""
  shown = [f"{f} {json.dumps(a)} -> {json.dumps(b)}" for f, (a, b) in list(changes.items())[:most]]
  more = len(changes) - most
  return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def _project_version() -> Optional[str]:
  import cas_jax  # pylint: disable=g-import-not-at-top
  return getattr(cas_jax, "__version__", None)


def _git(root: str, *args: str) -> Optional[str]:
  """The output of `git -C root args...`, or None if git is missing or fails."""
  try:
    result = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True,
                            timeout=10, check=True)
  except (OSError, subprocess.SubprocessError):
    return None
  return result.stdout.strip()


def project(root: str = REPO_ROOT) -> Dict[str, Any]:
  """The project's version and, if `root` (default: this package's checkout) is a git checkout,
  its commit and whether files were changed (a changed tracked file or a new, not ignored one)."""
  info = {"name": PROJECT, "version": _project_version(), "path": root}
  if os.path.exists(os.path.join(root, ".git")):  # a folder, or a file in a git worktree
    commit = _git(root, "rev-parse", "HEAD")
    status = _git(root, "status", "--porcelain")  # changed or new files (not the ignored ones)
    info.update(commit=commit, dirty=None if status is None else bool(status))
  return info


@functools.lru_cache(maxsize=None)
def code_digest(package: str = os.path.dirname(os.path.abspath(__file__))) -> str:
  """The package's version and a SHA-256 of its Python sources: the code a result came from,
  in a checkout (committed or not) and in an installed wheel alike."""
  digest = hashlib.sha256(str(_project_version()).encode())
  for root, dirs, files in os.walk(package):
    dirs.sort()
    for name in sorted(f for f in files if f.endswith(".py")):
      path = os.path.join(root, name)
      digest.update(os.path.relpath(path, package).encode())
      with open(path, "rb") as f:
        digest.update(f.read())
  return f"{_project_version()}+{digest.hexdigest()[:12]}"


def versions() -> Dict[str, Optional[str]]:
  """Installed versions of the libraries a result depends on (None: not installed)."""
  found = {"python": sys.version.split()[0]}
  for name in PACKAGES:
    try:
      found[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      found[name] = None
  return found


def devices() -> Dict[str, Any]:
  """The devices every process computes on: platform, kind, count, processes."""
  local = jax.devices()
  return {"platform": local[0].platform, "kind": local[0].device_kind,
          "count": jax.device_count(), "processes": jax.process_count()}


def provenance(config=None) -> Dict[str, Any]:
  """Versions, project commit, devices, dtype and command line of this process (JSON-ready)."""
  record = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": versions(), "project": project(), "devices": devices(),
            "command": [os.path.basename(sys.executable), *sys.argv]}
  if config is not None:
    record["dtype"] = config.model.dtype
  return record


def read_config(workdir: str) -> Optional[Dict[str, Any]]:
  """The config recorded in workdir/config.json, or None if there is none."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def check_resume(workdir: str, config) -> Dict[str, Tuple[Any, Any]]:
  """The training fields that differ from workdir's recorded config; UserError unless allowed.

  schedule.num_epochs may always change; any other difference needs
  config.allow_config_change (the differences are then returned, to be recorded).
  """
  recorded = read_config(workdir)
  saved = os.path.join(workdir, "checkpoints")
  if recorded is None or not (os.path.isdir(saved) and any(
      name.isdigit() for name in os.listdir(saved))):
    return {}  # nothing recorded, or nothing trained yet
  changes = differences(recorded, config)
  blocking = {f: v for f, v in changes.items() if f not in EXTENDABLE}
  if blocking and not config.get("allow_config_change", False):
    raise errors.UserError(
        f"--workdir={workdir} was trained with another config ({describe(blocking)}); use a "
        "new --workdir, or continue this one with --config.allow_config_change=True (recorded "
        f"in {PROVENANCE_FILE})")
  return changes


def _write_json(path: str, data: Any) -> None:
  """Write `data` to path through a temporary file (a kill leaves the old file whole)."""
  with open(path + ".tmp", "w") as f:
    json.dump(data, f, indent=1, sort_keys=True)
  os.replace(path + ".tmp", path)


def record_run(workdir: str, config, start_step: int,
               changes: Optional[Dict[str, Tuple[Any, Any]]] = None) -> Dict[str, Any]:
  """Write workdir/config.json and append this run to workdir/provenance.json; the entry."""
  entry = {**provenance(config), "start_step": int(start_step)}
  if changes:
    entry["config_changes"] = {f: {"recorded": a, "now": b} for f, (a, b) in changes.items()}
    entry["allowed_by"] = ("allow_config_change" if set(changes) - set(EXTENDABLE)
                           else "schedule.num_epochs may change on a resume")
  if jax.process_index() == 0:
    path = os.path.join(workdir, PROVENANCE_FILE)
    runs = []
    if os.path.isfile(path):
      with open(path) as f:
        runs = json.load(f).get("runs", [])
    _write_json(path, {"runs": runs + [entry]})
    _write_json(os.path.join(workdir, CONFIG_FILE), config.to_dict())
  return entry


def for_report(config, workdir: Optional[str] = None) -> Dict[str, Any]:
  """An evaluation report's provenance: this process's, its config, and workdir's training runs."""
  record = {**provenance(config), "config": config.to_dict()}
  path = os.path.join(workdir, PROVENANCE_FILE) if workdir else ""
  if path and os.path.isfile(path):
    with open(path) as f:
      record["training_runs"] = json.load(f).get("runs", [])
    record["trained_config"] = read_config(workdir)
  return json.loads(json.dumps(record, default=str))


def summary_line(record: Dict[str, Any]) -> str:
  """One markdown line of a provenance record: commit, versions, devices, dtype."""
  project_info, found = record.get("project", {}), record.get("versions", {})
  commit = project_info.get("commit")
  code = (f"commit {commit[:10]}{' (dirty)' if project_info.get('dirty') else ''}" if commit
          else f"version {project_info.get('version') or 'unknown'}")
  libraries = ", ".join(f"{n} {found[n]}" for n in ("jax", "flax", "optax", "orbax-checkpoint")
                        if found.get(n))
  where = record.get("devices", {})
  return (f"Provenance: cas_jax {code}; {libraries}; {where.get('count')} x {where.get('kind')}"
          f"; dtype {record.get('dtype', '?')}.")
