"""One command per paper table: train every setting, evaluate each with the same attacks, write the table.

    cas-jax-experiments table3 --workdir=runs/table3     # or: python -m cas_jax.experiments.driver
    python -m cas_jax.experiments.driver fig8 --workdir=runs/fig8 --config=configs/cifar_subset.py \
        --config.data.cifar_dir=../shared/data/cifar-10-batches-py --settings=beta0,beta2
    python -m cas_jax.experiments.driver table2 --workdir=runs/table2 --dry_run   # the settings only

A setting is the base config (--config, default the packaged cifar10_at_cas, with every
--config.x=v override: dataset, width, epochs, data source, eval budgets...) plus the few
fields the setting changes (EXPERIMENTS, cas_jax/experiments/registry.py). Each trains in W/<setting>/ (with
--seeds=K: K times, in W/<setting>/seed<k>/ with config.seed + k) with
`train.train_and_evaluate` (skipped once the final epoch's checkpoint exists; a stopped run
resumes from its latest checkpoint). A folder is reused only when its recorded config.json
trains the same model; otherwise the driver names the fields that differ and stops before
any training (--retrain: the old folder is renamed and the setting trained again). Each is
evaluated by `evaluate.evaluate_workdir` with one attack list for all (default: the report's
default set plus FGSM, the last checkpoint; reports, resume state and cache in
<folder>/eval/NAME/, the cache keyed on the whole config and the checkpoints' identity), and
the driver writes W/NAME.md,
W/NAME.json (and W/fig8.png): every attack's accuracy (mean ± std over seeds) beside the
per-image worst case, each CAS row against its plain twin (a hierarchical-bootstrap interval,
a seed-level t-test, exact McNemar tests, Holm over the table: cas_jax/experiments/statistics.py),
and the paper's figures where the paper text gives them. Settings run one after the other in one process (single host).

table4, table12 and table13 evaluate table3's trained settings (same --workdir and flags) and
train nothing; table6 trains its transfer source (a natural ResNet-50) in W/source_resnet50/.
"""
import os
import shlex
import sys
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags

from cas_jax import cli
from cas_jax import compilation
from cas_jax import configs
from cas_jax import errors
from cas_jax.experiments import runs as experiment_runs
from cas_jax.experiments import tables as experiment_tables
from cas_jax.experiments.registry import (DEFAULT_CONFIG, EVAL_DEFAULTS, EXPERIMENTS,
                                          L2_FIELDS, MODEL_FIELDS, OBJECTIVE_FIELDS,
                                          Experiment, Setting)
from cas_jax import models
from cas_jax import preemption
from cas_jax import provenance
from cas_jax.training import train
from cas_jax.configs import default

# ----------------------------------------------------------------------------- configs


def _get(config, path: str):
  for key in path.split("."):
    config = config[key]
  return config


def setting_fields(experiment: Experiment, setting: Setting,
                   base: ml_collections.ConfigDict) -> Dict[str, Any]:
  """The config fields `setting` sets on the base config, by dotted path."""
  fields = {}
  if setting.objective or experiment.model:
    paper = default.setting(setting.objective or base.loss.objective, True,
                            experiment.model or base.model.name, base.data.dataset)
    names = (OBJECTIVE_FIELDS if setting.objective else ()) + (
        MODEL_FIELDS if experiment.model else ())
    fields.update({name: _get(paper, name) for name in names})
    if experiment.model and not models.accepts(experiment.model, "width"):
      fields["model.width"] = 0  # the name fixes the width (WRN-34-10): the base's is void
  if setting.cas is not None:
    fields["model.cas_stages"] = "default" if setting.cas else "none"
  fields.update(setting.overrides)
  return fields


def select_settings(name: str, only: Optional[Sequence[str]] = None) -> Tuple[Setting, ...]:
  """The experiment's settings, or those named in `only` (in the table's order)."""
  if name not in EXPERIMENTS:
    raise errors.UserError(f"unknown experiment {name!r}; valid: {', '.join(EXPERIMENTS)}")
  settings = EXPERIMENTS[name].settings
  if only:
    unknown = set(only) - {s.name for s in settings}
    if unknown:
      raise errors.UserError(f"{name} has no setting {', '.join(sorted(unknown))}; valid: "
                              f"{', '.join(s.name for s in settings)}")
    settings = tuple(s for s in settings if s.name in only)
  return settings


def setting_config(name: str, setting: Setting, base: ml_collections.ConfigDict,
                   command_line: Iterable[str] = ()) -> ml_collections.ConfigDict:
  """The base config with `setting`'s fields and the experiment's evaluation defaults.

  command_line: the dotted paths overridden on the command line; they keep their values
  (evaluation defaults included) and may not touch a field the experiment varies.
  """
  command_line = set(command_line)
  fields = setting_fields(EXPERIMENTS[name], setting, base)
  clash = sorted(command_line & set(fields))
  if clash:
    raise errors.UserError(f"--config.{clash[0]} is what {name} sets per setting ({setting.name}); "
                            "drop it (choose rows with --settings=...)")
  config = base.copy_and_resolve_references()
  experiment = EXPERIMENTS[name]
  changes = {**EVAL_DEFAULTS, "eval.attacks": experiment.attacks,
             **({"eval.exact_per_attack": True} if experiment.exact else {}), **fields}
  config.update_from_flattened_dict({p: v for p, v in changes.items() if p not in command_line})
  if config.attack.get("norm", "linf") == "l2":  # --config.attack.norm=l2: the L2 recipe
    recipe = default.under_l2(default.get_config())
    config.update_from_flattened_dict({p: _get(recipe, p) for p in L2_FIELDS
                                       if p not in command_line})
  if setting.extra_attacks:
    config.eval.attacks = f"{config.eval.attacks},{setting.extra_attacks}"
  train.validate_config(config)
  return config


# ----------------------------------------------------------------------------- runs


def seed_workdirs(workdir: str, setting: Setting, config: ml_collections.ConfigDict,
                  seeds: int) -> Dict[int, str]:
  """{seed: folder}: W/<setting> for one seed, W/<setting>/seed<k> (seed + k) for several."""
  folder = os.path.join(workdir, setting.name)
  if seeds == 1:
    return {config.seed: folder}
  return {config.seed + k: os.path.join(folder, f"seed{k}") for k in range(seeds)}


def _train_unless_done(config: ml_collections.ConfigDict, folder: str, what: str) -> None:
  if experiment_runs.is_trained(config, folder):
    logging.info("%s: trained (final checkpoint in %s)", what, folder)
  else:
    logging.info("%s: training in %s", what, folder)
    train.train_and_evaluate(config, folder)


def _source_summary(setting: Setting, config: ml_collections.ConfigDict, folder: str) -> dict:
  """What the table says of a transfer source: its network and its last natural accuracy."""
  accuracy = experiment_runs.last_metric(folder, "natural_acc")
  return {"setting": setting.name, "label": setting.label, "workdir": folder,
          "model": config.model.name, "width": config.model.width,
          "natural_accuracy": accuracy, "accuracy_images": config.eval.num_images,
          **experiment_runs.training_summary(folder)}


def run_experiment(name: str, base: ml_collections.ConfigDict, workdir: str,
                   command_line: Iterable[str] = (), only: Optional[Sequence[str]] = None,
                   command: str = "", seeds: int = 1, retrain: bool = False) -> dict:
  """Train (unless finished) and evaluate every setting of `name` `seeds` times; write the table.

  A setting's folder that holds a model of another config stops the run before any training
  (retrain=True: it is renamed and trained again). An evaluation-only experiment
  (Experiment.reuses) trains nothing and stops unless every folder holds its finished model.
  """
  if seeds < 1:
    raise errors.UserError(f"--seeds={seeds}; use an integer >= 1")
  settings = select_settings(name, only)
  experiment, command_line = EXPERIMENTS[name], set(command_line)
  if experiment.reuses and retrain:
    raise errors.UserError(f"{name} trains nothing; drop --retrain (retrain with "
                            f"cas-jax-experiments {experiment.reuses} --retrain)")
  # Every config is built, validated and checked against its folder before the first
  # (possibly hours-long) training.
  setting_configs = {s.name: setting_config(name, s, base, command_line) for s in settings}
  source = None
  if experiment.source and "eval.transfer_checkpoint" in command_line:
    raise errors.UserError(f"{name} trains its own transfer source; drop "
                            "--config.eval.transfer_checkpoint (or use another experiment)")
  if experiment.source:
    source = (setting_config(name, experiment.source, base, command_line),
              os.path.join(workdir, experiment.source.name))
    for config in setting_configs.values():
      config.eval.transfer_checkpoint = source[1]
  runs = {}
  for setting in settings:
    for seed, folder in seed_workdirs(workdir, setting, setting_configs[setting.name], seeds).items():
      seeded = setting_configs[setting.name].copy_and_resolve_references()
      seeded.seed = seed
      runs.setdefault(setting.name, []).append((seed, seeded, folder))
  train_command = (f"cas-jax-experiments {experiment.reuses} --workdir={workdir} with the same "
                   "--config, --config.* and --seeds flags")
  for _, config, folder in (run for group in runs.values() for run in group):
    if experiment.reuses:
      experiment_runs.check_trained(config, folder, train_command)
    else:
      experiment_runs.check_reusable(config, folder, retrain)  # after every config is valid
  if source:
    experiment_runs.check_reusable(*source, retrain)
    _train_unless_done(*source, f"{experiment.source.name} (transfer source)")
  rows = []
  for setting in settings:
    reports: Dict[str, list] = {}
    for seed, config, folder in runs[setting.name]:
      if not experiment.reuses:  # an evaluation-only run checked its folders above
        _train_unless_done(config, folder, f"{setting.name} seed {seed}")
      for label, report in experiment_runs.evaluate_setting(config, folder, name).items():
        reports.setdefault(label, []).append(report)
      # XLA:CPU programs hold memory mappings; many models passed vm.max_map_count (docs).
      compilation.free_compiled_programs_if_crowded()
    config = runs[setting.name][0][1]
    info = {"setting": setting.name, "label": setting.label, "twin": setting.twin,
            "fields": setting_fields(experiment, setting, base),
            "beta": config.loss.beta if config.model.cas_stages != "none" else 0.0,
            "paper": dict(setting.paper)}
    for label, per_seed in reports.items():
      rows.append(experiment_runs.setting_row(info, label, per_seed,
                                              [seed for seed, _, _ in runs[setting.name]],
                                              [folder for _, _, folder in runs[setting.name]]))
  devices = jax.devices()
  result = {"experiment": name, "title": experiment.title, "command": command,
            "devices": f"{len(devices)} x {devices[0].device_kind}", "seeds": seeds,
            "overrides": sorted(command_line), "provenance": provenance.provenance(base),
            "rows": rows}
  if source:
    result["source"] = _source_summary(experiment.source, *source)
  experiment_tables.write_outputs(result, workdir, plot_beta_png=experiment.plot_beta)
  return result


# ----------------------------------------------------------------------------- command line


FLAGS = flags.FLAGS


def _define_flags():
  config_flags.DEFINE_config_file("config", configs.path(DEFAULT_CONFIG), "The base config: a "
                                  "file (configs/*.py) or a packaged config's name.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Each setting trains in <workdir>/<setting>/.")
  flags.DEFINE_list("settings", None, "Run only these settings of the experiment (row names).")
  flags.DEFINE_bool("dry_run", False, "Print every setting's config changes; train nothing.")
  flags.DEFINE_integer("seeds", 1, "Train every setting this many times (seed folders).")
  flags.DEFINE_bool("retrain", False, "Train again a setting whose folder holds another "
                    "config's model (the old folder is renamed, not deleted).")
  flags.mark_flags_as_required(["workdir"])


def main(argv: List[str]) -> None:
  """Run the experiment named by the one positional argument."""
  if len(argv) != 2:
    raise app.UsageError("usage: cas-jax-experiments NAME --workdir=W "
                         f"[--config=...] [--config.x=v ...]; NAME: {', '.join(EXPERIMENTS)}")
  name, overrides = argv[1], config_flags.get_override_values(FLAGS["config"])
  command = shlex.join(["python", "-m", "cas_jax.experiments.driver", *sys.argv[1:]])
  compilation.use_persistent_cache(FLAGS.config.get("compilation_cache"))
  try:
    with errors.exit_on_user_error():  # a bug of ours keeps its traceback
      if FLAGS.dry_run:
        for setting in select_settings(name, FLAGS.settings):
          config = setting_config(name, setting, FLAGS.config, overrides)
          changes = setting_fields(EXPERIMENTS[name], setting, FLAGS.config)
          print(f"{setting.name} ({setting.label}): {changes}; {config.schedule.num_epochs} "
                f"epochs; eval {config.eval.attacks} on {config.eval.checkpoints}")
        experiment = EXPERIMENTS[name]
        if experiment.source:
          changes = setting_fields(experiment, experiment.source, FLAGS.config)
          print(f"{experiment.source.name} ({experiment.source.label}), trained first: {changes}")
        if experiment.reuses:
          print(f"Evaluation only: the models {experiment.reuses} trained in --workdir.")
        return
      run_experiment(name, FLAGS.config, FLAGS.workdir, overrides, FLAGS.settings,
                     command=command, seeds=FLAGS.seeds, retrain=FLAGS.retrain)
  except preemption.Stopped as stopped:  # the setting in training saved its checkpoint
    print(f"{stopped}; rerun the same command to resume: {command}", file=sys.stderr)
    sys.exit(stopped.exit_status)


def run() -> None:
  """The `cas-jax-experiments` console script (also `python -m cas_jax.experiments.driver`)."""
  _define_flags()
  cli.run(main)


if __name__ == "__main__":
  run()
