"""The runs of an experiment (cas_jax/experiments/driver.py): reuse, train, evaluate (cached), one row.

    check_reusable(config, workdir, retrain=False)    # UserError if W holds another config's model
    check_trained(config, workdir, train_command)       # evaluation-only experiments
    reports = evaluate_setting(config, workdir, name)  # cached in W/eval/<name>/
    row = setting_row(setting_info, label, reports_per_seed, seeds, workdirs)

A setting's folder is reused only when its recorded config (config.json, written by
train.train_and_evaluate) trains the same model as the requested one; raising
schedule.num_epochs continues it. The evaluation cache keys on the whole config (attacks and
budgets included), on the code, and on the workdir's checkpoints: the saved steps, the best
one, each step's file names and sizes and the SHA-256 of its integrity manifest.
"""
import json
import os
from typing import Any, Dict, List, Optional

from absl import logging
import ml_collections
import numpy as np

from cas_jax import checkpointing
from cas_jax import errors
from cas_jax import integrity
from cas_jax.evaluation import evaluate
from cas_jax import input_pipeline
from cas_jax.training import metric_writers
from cas_jax import provenance
from cas_jax.evaluation import report as report_lib

EVAL_CACHE = "experiment_eval.json"


def _has_checkpoints(workdir: str) -> bool:
  folder = os.path.join(workdir, "checkpoints")
  return os.path.isdir(folder) and any(name.isdigit() for name in os.listdir(folder))


def _set_aside(workdir: str) -> str:
  """Rename workdir to <workdir>.replaced[.k] (never deleted); the new path."""
  target, k = workdir + ".replaced", 1
  while os.path.exists(target):
    target, k = f"{workdir}.replaced.{k}", k + 1
  os.rename(workdir, target)
  return target


def check_reusable(config: ml_collections.ConfigDict, workdir: str, retrain: bool = False,
                   flag: str = "--retrain") -> None:
  """UserError unless workdir is empty or holds a model of `config` (retrain: set it aside).

  A recorded schedule.num_epochs below the requested one is fine (training continues).
  """
  if not _has_checkpoints(workdir):
    return
  why = _other_model(config, workdir)
  if why is None:
    return
  if retrain:
    logging.warning("%s %s; kept as %s, training it again", workdir, why, _set_aside(workdir))
    return
  raise errors.UserError(f"{workdir} {why}; rerun with {flag} to train it again (the old "
                         "folder is kept, renamed), or use a new --workdir")


def _other_model(config: ml_collections.ConfigDict, workdir: str) -> Optional[str]:
  """Why workdir's checkpoints are not a model of `config` (in words), or None if they are."""
  recorded = provenance.read_config(workdir)
  if recorded is None:
    return "holds checkpoints but no config.json (trained before configs were recorded)"
  # More epochs continue the run; fewer would evaluate a model trained longer than asked.
  changes = {f: (a, b) for f, (a, b) in provenance.differences(recorded, config).items()
             if f not in provenance.EXTENDABLE or b < a}
  return f"was trained with another config ({provenance.describe(changes)})" if changes else None


def check_trained(config: ml_collections.ConfigDict, workdir: str, train_command: str) -> None:
  """UserError unless workdir holds config's model at its final epoch (evaluation-only runs)."""
  why = (_other_model(config, workdir) if is_trained(config, workdir)
         else "holds no finished training of this setting")
  if why is not None:
    raise errors.UserError(f"{workdir} {why}; this experiment trains nothing: first run "
                            f"{train_command}")


def is_trained(config: ml_collections.ConfigDict, workdir: str) -> bool:
  """Whether workdir holds the checkpoint of config's final epoch."""
  if not _has_checkpoints(workdir):
    return False
  latest = _latest_step(workdir)
  if latest is None:
    return False
  steps_per_epoch = input_pipeline.create_dataset(config).steps_per_epoch
  return latest >= config.schedule.num_epochs * steps_per_epoch


def _latest_step(workdir: str) -> Optional[int]:
  manager = checkpointing.create_manager(workdir, async_save=False)
  step = manager.latest_step()
  manager.close()
  return step


def checkpoint_identity(workdir: str) -> Dict[str, Any]:
  """The saved steps, the best one, and each step's files (see _step_identity)."""
  manager = checkpointing.create_manager(workdir, async_save=False)
  steps, best = manager.all_steps(), checkpointing.best_step(manager)
  manager.close()
  folder = os.path.join(workdir, "checkpoints")
  return {"latest": max(steps) if steps else None, "best": best,
          "steps": {str(step): _step_identity(os.path.join(folder, str(step))) for step in steps}}


def _step_identity(step_dir: str) -> Dict[str, Any]:
  """A step's files (relative name: size) and the SHA-256 of what records their contents.

  The record is the step's integrity manifest (each file's SHA-256; a checkpoint written again
  gets another one), or Orbax's commit metadata for a checkpoint saved before manifests. A
  deleted, added, cut or grown file changes the names or sizes; a file changed in place at the
  same size does not (that would take reading every file): the cached report, of the checkpoint
  as recorded, is served, and a new evaluation's restore refuses the changed file.
  """
  manifest = os.path.join(step_dir, integrity.MANIFEST)
  record = manifest if os.path.isfile(manifest) else os.path.join(step_dir, "_CHECKPOINT_METADATA")
  return {"files": integrity.file_sizes(step_dir), "record": os.path.basename(record),
          "sha256": integrity.file_digest(record) if os.path.isfile(record) else None}


def eval_request(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Everything an evaluation depends on, as JSON data (a cached result is reused if equal).

  The config (attacks and budgets included), the checkpoints, the code that evaluates (the
  package's version and source digest: a fixed attack bug never reuses an old report) and,
  for a transfer source that is a workdir, its checkpoints too.
  """
  request = {"config": config.to_dict(), "checkpoints": checkpoint_identity(workdir),
             "code": provenance.code_digest()}
  source = config.eval.get("transfer_checkpoint", "")
  if source and os.path.isdir(source):
    request["transfer_source"] = checkpoint_identity(source)
  return json.loads(json.dumps(request))


def evaluate_setting(config: ml_collections.ConfigDict, workdir: str,
                     experiment: str) -> Dict[str, report_lib.Report]:
  """{checkpoint label: Report} of workdir for `experiment`, cached if the request is the same.

  Reports, resume state and cache go to workdir/eval/<experiment>/, so that experiments that
  share a trained setting (table3, table13, ...) keep each its own evaluation. The cache carries
  its own SHA-256: a cut or altered cache is kept aside and the evaluation runs again.
  """
  out_dir = os.path.join(workdir, "eval", experiment)
  path = os.path.join(out_dir, EVAL_CACHE)
  request = eval_request(config, workdir)
  if os.path.isfile(path):
    try:
      cached = integrity.load_sealed_json(path)
    except integrity.Damaged as damage:
      integrity.set_aside(path, str(damage), "The evaluation cache")
    else:
      if cached["request"] == request:
        logging.info("Reusing the evaluation in %s", path)
        return {label: report_lib.Report.from_json(json.dumps(data))
                for label, data in cached["reports"].items()}
  reports = evaluate.evaluate_workdir(config, workdir, out_dir=out_dir)
  sealed = integrity.seal_json(
      {"request": request,
       "reports": {label: json.loads(r.to_json()) for label, r in reports.items()}})
  temporary = path + ".tmp"
  with open(temporary, "w") as f:
    json.dump(sealed, f)
  os.replace(temporary, path)
  return reports


def _metric_rows(workdir: str) -> List[dict]:
  """The whole rows of workdir/metrics.jsonl (a line cut short by a stop is skipped)."""
  path = os.path.join(workdir, metric_writers.METRICS_FILE)
  if not os.path.isfile(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if metric_writers.row_step(line) is not None]


def training_summary(workdir: str) -> Dict[str, float]:
  """Epochs trained and the summed epoch times of workdir/metrics.jsonl."""
  epochs, seconds = 0, 0.0
  for row in _metric_rows(workdir):
    if row.get("epoch") is not None:
      epochs = max(epochs, int(row["epoch"]))
      seconds += row.get("epoch_time_s") or 0.0
  return {"epochs": epochs, "train_seconds": seconds}


def last_metric(workdir: str, name: str) -> Optional[float]:
  """The last value of metric `name` in workdir/metrics.jsonl (None if none was written)."""
  values = [row[name] for row in _metric_rows(workdir) if name in row]
  return float(values[-1]) if values else None


def _figure(reports: List[report_lib.Report], name: str) -> str:
  """One seed: the report's figure; several: 'mean ± std' (std over seeds, ddof 1)."""
  if len(reports) == 1:
    return reports[0].figure(name)
  values = np.array([100 * r.accuracy(name) for r in reports])
  bound = "<= " if any(r.figure(name).startswith("<=") for r in reports) else ""
  return f"{bound}{values.mean():.1f} ± {values.std(ddof=1):.1f}"


def setting_row(info: Dict[str, Any], label: str, reports: List[report_lib.Report],
                seeds: List[int], workdirs: List[str]) -> dict:
  """One table row of a setting's checkpoint `label` over its seeds (every seed kept)."""
  first = reports[0]
  names = [report_lib.NATURAL, *first.attacks, report_lib.WORST_CASE]
  names = [n for n in names if all(n in r.verdicts for r in reports)]
  per_seed = []
  for seed, report, workdir in zip(seeds, reports, workdirs):
    per_seed.append({"seed": seed, "workdir": workdir,
                     "accuracy": {n: report.accuracy(n) for n in names},
                     # a stage shared by several attacks counts once
                     "eval_seconds": report.costs["total"]["seconds"],
                     "evaluated_by": report.provenance_line, **training_summary(workdir)})
  accuracy = {n: float(np.mean([s["accuracy"][n] for s in per_seed])) for n in names}
  spread = {n: float(np.std([s["accuracy"][n] for s in per_seed], ddof=1))
            if len(per_seed) > 1 else 0.0 for n in names}
  return {**info, "checkpoint": label, "seeds": seeds, "workdir": os.path.dirname(workdirs[0])
          if len(workdirs) > 1 else workdirs[0],
          "num_images": first.num_images, "eps": first.eps, "norm": first.norm,
          "accuracy": accuracy, "accuracy_std": spread,
          "figure": {n: _figure(reports, n) for n in names},
          "descriptions": {n: d["description"] for n, d in first.attacks.items()},
          "sanity": [f"seed {seed}: {w}" if len(seeds) > 1 else w
                     for seed, r in zip(seeds, reports) for w in r.sanity],
          "per_seed": per_seed,
          "verdicts": {n: [np.asarray(r.verdicts[n], int).tolist() for r in reports]
                       for n in names},
          "eval_seconds": sum(s["eval_seconds"] for s in per_seed),
          "epochs": min(s["epochs"] for s in per_seed),
          "train_seconds": sum(s["train_seconds"] for s in per_seed)}
