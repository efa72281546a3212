"""Robustness evaluation: named attacks, the per-image worst case over them, and workdir reports.

    from cas_jax.evaluation import evaluate
    report = evaluate.robustness_report(apply_fn, x, y, eps=8/255, key=jax.random.key(0))
    print(report.markdown())           # table with the worst case, sanity report under it
    report = evaluate.robustness_report(apply_fn, x, y, key=key, attacks="pgd100,aa-joint,sweep")

    python main.py --config=configs/smoke.py --workdir=/tmp/cas_smoke --mode=eval

`apply_fn(x) -> (logits, cas_logits)` (or logits alone) is the model in evaluation mode, on
NHWC images in [0, 1]. Attacks are named by strings (config.eval.attacks is a comma-separated
list of them); see `attack_registry` for the names. Cheap attacks (the PGD family, transfer)
and AutoAttack (every variant and part, unless exact_autoattack=False) run on every
clean-correct image, so their own figures are exact; the other expensive ones (MD, Avg-PGD,
N-Attack) run only on the images every earlier attack left standing, unless
exact_per_attack=True; the table lists the attacks in the order they ran (cheap ones first).
`aa` and `aa-joint` share FAB-T and Square, run once on the images both left standing. Each image's
randomness is folded from its global index (`indices`), so verdicts do not depend on the batch
size, the device count or the process count (batches are sharded over every local device;
with several processes, under --distributed, each one attacks its share of the images and
the verdicts are gathered).
A randomized model (a SAP network; `random_apply_fn=`) is judged over fresh draws: each
verdict is the majority over budget.verdict_draws draws, natural accuracy their mean.
"""
import dataclasses
import functools
import os
import zlib
from typing import Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from cas_jax.evaluation import attack_plan
from cas_jax import errors
from cas_jax import input_pipeline
from cas_jax.models import loading
from cas_jax import provenance
from cas_jax.models import baselines
from cas_jax.evaluation import report as report_lib
from cas_jax.evaluation import resume_fingerprint
from cas_jax.evaluation import attack_registry
from cas_jax.evaluation.attack_registry import AttackBudget, attack_names, parse_attacks
from cas_jax.attacks.autoattack import target_ranks
from cas_jax.attacks import cascade
from cas_jax.attacks import engine
from cas_jax.attacks import verdicts
from cas_jax.attacks.white_box import pgd

Array = jax.Array
Partial = jax.tree_util.Partial
image_keys = jax.jit(engine.index_keys)  # one key per image, from its global index


@jax.jit
def _report_key_data(key, indices):
  """(attack, natural pass) key data per image: one program, not one per key operation."""
  natural_key = jax.random.fold_in(key, zlib.crc32(report_lib.NATURAL.encode()))
  return tuple(jax.random.key_data(image_keys(k, indices)) for k in (key, natural_key))


# ----------------------------------------------------------------------------- the report


def _has_cas_heads(apply_fn, x: np.ndarray) -> bool:
  model = engine.as_partial(apply_fn)  # the trace the attacks' programs reuse
  shapes = jax.eval_shape(lambda z: engine.split_outputs(model(z))[1], x[:1])
  return len(shapes) > 0


def _process_rows(n: int) -> np.ndarray:
  """The rows this process evaluates: its contiguous block of ceil(n / processes) rows, padded
  (with copies of its first row, or of row 0) to the same size on every process."""
  size = -(-n // jax.process_count())
  first = jax.process_index() * size
  rows = np.arange(first, min(first + size, n))
  return np.concatenate([rows, np.full(size - rows.size, rows[0] if rows.size else 0)])


def _gather_rows(local: np.ndarray, n: int) -> np.ndarray:
  """Every process's _process_rows results, in row order: the n rows of the whole set."""
  if jax.process_count() == 1:
    return local[:n]
  gathered = np.asarray(multihost_utils.process_allgather(local))  # (processes, size, ...)
  return gathered.reshape((-1,) + local.shape[1:])[:n]


def _process_local(leaf):
  """`leaf` on this process's devices only: a global array (e.g. weights restored replicated over
  every process's devices) would otherwise need cross-host transfers, which CPU backends lack."""
  if not isinstance(leaf, jax.Array) or leaf.is_fully_addressable:
    return leaf
  if leaf.sharding.is_fully_replicated:
    return leaf.addressable_data(0)  # this process's own copy
  return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))


def _ignoring_keys(model, x: Array, keys: Array):
  del keys
  return model(x)


VERDICTS = "verdicts"  # the batch_shapes entry of the natural pass and the attacks' verdicts


def _natural(models, x, y, keys, impl, draws, shapes: cascade.BatchShapes):
  """Per image: correct (the majority of `draws` draws for a randomized model) and the
  fraction of draws correct; and the rows evaluated (padding included). Batches of `shapes`
  (the verdicts' sizes), sharded over the local devices."""
  mesh = cascade.local_mesh()
  fraction, evaluated = np.zeros(y.size, np.float32), 0
  for take, rows in shapes.batches(np.arange(y.size)):
    evaluated += rows.size * max(draws, 1)
    xb, yb, kb = cascade.to_device(mesh, (x[rows], y[rows], keys[rows]))
    if draws:
      kb = jax.random.wrap_key_data(kb, impl=impl)
      value = verdicts.correct_fraction(models.random, xb, yb, kb, draws)
    else:
      value = verdicts.correct(models.main, xb, yb)
    fraction[take] = np.asarray(value)[:take.size]
  return fraction > 0.5, fraction, evaluated


def robustness_report(apply_fn, x, y, *, key: Array, eps: Optional[float] = None, attacks=None,
                      norm: str = "linf",
                      beta: float = 2.0, batch_size: int = 256, indices=None,
                      budget: Optional[AttackBudget] = None, exact_per_attack: bool = False,
                      exact_autoattack: bool = True, source_fn=None, random_apply_fn=None,
                      state_dir: Optional[str] = None, save_every: float = 10.0,
                      progress: bool = False, batch_shapes: Optional[dict] = None,
                      title: str = "Robustness report") -> report_lib.Report:
  """Verdicts of natural, every attack in `attacks` (default: the default set) and the worst case.

  norm: the threat model, "linf" (default), "l2" or "l1" (case-insensitive); eps is in its
  units (default: 8/255, 0.5 and 12). Attacks named with another norm (e.g. "aa-l2@0.5") run
  too, but only those at the report's norm and eps enter the worst case.

  source_fn(x) is the source model of the transfer attacks. random_apply_fn(x, keys) (one key
  per image) is a randomized model (e.g. SAP), which eot / avg-pgd / aa-rand attack; then
  apply_fn is its deterministic version (what the other attacks ascend), every verdict is
  the majority over budget.verdict_draws fresh draws of the randomized model, and natural
  accuracy is the mean over those draws. Without it, eot / avg-pgd attack apply_fn (no noise).
  Every attack stage runs on the images still standing, gathered from the whole set into
  batches of `batch_size` sharded over the local devices (attacks/cascade.py). state_dir:
  where the report records its finished batches (every `save_every` seconds, and at once on
  SIGTERM or Ctrl-C), so that the same call resumes an interrupted report without attacking
  an image twice. progress: a tqdm bar per stage (quiet when not a terminal). batch_shapes:
  a dict that several reports share, so that they reuse each other's batch sizes (and so
  their compiled programs; cascade.BatchShapes), updated in place. With several processes
  every one passes the same x and y, attacks its share of the images and returns the whole
  report.
  """
  x, y = (np.asarray(a) for a in engine.check_images_and_labels(x, y))
  norm = attack_registry.check_norm(norm)
  eps = attack_registry.DEFAULT_EPS[norm] if eps is None else eps
  attack_registry.check_eps(eps, norm)
  if y.size == 0:
    raise errors.UserError("no images to evaluate: x and y are empty")
  if int(batch_size) != batch_size or batch_size < 1:
    raise errors.UserError(f"batch_size={batch_size!r} must be a positive integer")
  indices = np.arange(y.size) if indices is None else np.asarray(indices, np.int64)
  if indices.shape != y.shape:
    raise errors.UserError(f"indices {indices.shape} must give one global index per image {y.shape}")
  budget = budget or AttackBudget()
  specs, notes = parse_attacks(attacks, eps=eps, has_cas=_has_cas_heads(apply_fn, x), norm=norm)
  if source_fn is None and any(s.method.startswith("transfer") for s in specs):
    raise errors.UserError("transfer attacks need the source model: pass source_fn= (or set "
                     "config.eval.transfer_checkpoint)")
  model_fns = tuple(engine.as_partial(f) for f in (apply_fn, source_fn, random_apply_fn))
  draws = budget.verdict_draws if random_apply_fn is not None else 0
  if random_apply_fn is None:  # eot / avg-pgd / aa-rand on a deterministic model: no noise,
    model_fns = model_fns[:2] + (Partial(_ignoring_keys, model_fns[0]),)
    budget = dataclasses.replace(budget, eot_draws=1, aa_rand_draws=1)  # one draw is as good
  # Each process attacks its own rows on its own devices; the verdicts are gathered at the end.
  num_images, rows = y.size, _process_rows(y.size)
  x, y, local_indices = x[rows], y[rows], indices[rows]
  models = attack_plan.Models(*jax.tree_util.tree_map(_process_local, model_fns))
  mesh = cascade.local_mesh()
  if mesh is not None:  # the weights on every device the batches are sharded over
    models = jax.device_put(models, NamedSharding(mesh, P()))
  key_data, natural_key_data = (np.asarray(k) for k in _report_key_data(key, local_indices))
  batch_shapes = {} if batch_shapes is None else batch_shapes
  # The natural pass and every attack's verdicts share one program, at these sizes only.
  judge_shapes = cascade.shapes_of(batch_shapes, VERDICTS, batch_size, y.size)
  natural, fraction, natural_rows = _natural(models, x, y, natural_key_data,
                                             jax.random.key_impl(key), draws, judge_shapes)
  num_classes = jax.eval_shape(lambda z: engine.main_logits(models.main, z), x[:1]).shape[-1]
  ctx = attack_plan.Context(eps=eps, budget=budget, beta=beta, draws=draws, key_kind=key,
                            ranks=target_ranks(budget.target_classes, num_classes), norm=norm,
                            judge_shapes=judge_shapes)
  steps, after = attack_plan.plan(specs, models, ctx, exact_per_attack=exact_per_attack,
                                  exact_autoattack=exact_autoattack)
  infos = {}
  for spec in specs:
    infos[spec.name] = spec.info(in_worst_case=spec.in_threat(norm, eps))
    infos[spec.name]["gradient_draws"] = (
        (budget.aa_rand_draws if spec.method == "aa-rand" else budget.eot_draws)
        if spec.averages_draws and draws else 0)
  state_path = None
  if state_dir:
    state_path = os.path.join(state_dir, f"report_state.p{jax.process_index()}.npz")
  fingerprint = resume_fingerprint.fingerprint(
      models, x, y, local_indices, key, natural, eps=eps, norm=norm, beta=beta,
      attacks=[s.name for s in specs], budget=vars(budget), after=after, draws=draws,
      processes=jax.process_count())
  result = cascade.run(steps, x, y, key_data, eligible={s.name: natural for s in specs},
                       after=after, batch_size=batch_size, shapes=batch_shapes,
                       state_path=state_path,
                       fingerprint=fingerprint, save_every=save_every, progress=progress)
  verdicts, ran_on, cut = {report_lib.NATURAL: natural}, {}, {}
  for spec in specs:
    start = natural.copy()
    for name in after[spec.name]:
      start &= ~result.broken[name]
    verdicts[spec.name] = natural & ~result.broken[spec.name]
    ran_on[spec.name], cut[spec.name] = start, result.cut[spec.name]
  verdicts, ran_on, cut = ({name: _gather_rows(v, num_images) for name, v in d.items()}
                           for d in (verdicts, ran_on, cut))
  verdicts[report_lib.WORST_CASE] = report_lib.worst_case(verdicts, infos)
  natural_cost = {**dict.fromkeys(cascade.COST_FIELDS, 0.0), "forward_rows": natural_rows,
                  "padding_rows": natural_rows - y.size * max(draws, 1)}
  summed = _sum_over_processes({**result.costs, report_lib.NATURAL: natural_cost})
  natural_cost = summed.pop(report_lib.NATURAL)
  costs = report_lib.assemble_costs(summed, steps, natural_rows=natural_cost["forward_rows"],
                                    natural_padding=natural_cost["padding_rows"])
  report = report_lib.Report(eps=eps, norm=norm, indices=indices, verdicts=verdicts,
                             ran_on=ran_on,
                             attacks=infos, notes=notes, title=title, draws=draws,
                             seconds={n: c["seconds"] for n, c in costs["attacks"].items()},
                             costs=costs, cut_short=cut,
                             natural_mean=(float(np.mean(_gather_rows(fraction, num_images)))
                                           if draws else None))
  report.sanity = report_lib.sanity_checks(report)
  return report


def _sum_over_processes(costs: Dict[str, Dict[str, float]]) -> Dict[str, Dict[str, float]]:
  """Every unit's costs summed over the processes (seconds: the slowest process)."""
  if jax.process_count() == 1:
    return costs
  names = sorted(costs)
  table = np.asarray([[costs[n][f] for f in cascade.COST_FIELDS] for n in names], np.float64)
  gathered = np.asarray(multihost_utils.process_allgather(table))
  total = gathered.sum(0)
  total[:, cascade.COST_FIELDS.index("seconds")] = gathered[..., -1].max(0)
  return {n: dict(zip(cascade.COST_FIELDS, row.tolist())) for n, row in zip(names, total)}


# ----------------------------------------------------------------------------- per-epoch check


@functools.partial(jax.jit, static_argnames=("eps", "steps", "step_size", "loss", "beta",
                                              "norm"))
def _natural_and_pgd_counts(apply_fn, batch, key: Array, *, eps: float, steps: int,
                            step_size: Optional[float], loss: str, beta: float, norm: str):
  x, y, mask = batch["image"], batch["label"], batch["mask"]
  x_adv = pgd(apply_fn, x, y, eps=eps, steps=steps, step_size=step_size, loss=loss, beta=beta,
              key=engine.index_keys(key, batch["index"]), norm=norm)
  return {"natural": jnp.sum(verdicts.correct(apply_fn, x, y) & mask),
          "pgd": jnp.sum(verdicts.correct(apply_fn, x_adv, y) & mask), "count": jnp.sum(mask)}


def natural_and_pgd_accuracy(apply_fn, dataset, config, *, key: Array,
                             mesh=None) -> Dict[str, float]:
  """Natural and PGD accuracy (config.eval: eps, steps, step_size, loss) on the first
  config.eval.num_images test images (0 = all), each batch sharded over every device."""
  evaluation, mesh = config.eval, mesh or input_pipeline.data_mesh()
  settings = dict(eps=evaluation.eps, steps=evaluation.steps, loss=evaluation.loss,
                  step_size=evaluation.step_size or None, beta=config.loss.beta,
                  norm=evaluation.get("norm", "linf"))
  totals = {"natural": 0, "pgd": 0, "count": 0}
  for batch in dataset.eval_batches(config.eval_batch_size,
                                    num_images=evaluation.num_images or None):
    counts = jax.device_get(_natural_and_pgd_counts(
        engine.as_partial(apply_fn), input_pipeline.to_global_array(batch, mesh), key, **settings))
    totals = {k: totals[k] + int(counts[k]) for k in totals}
  return {"natural_acc": totals["natural"] / totals["count"],
          "pgd_acc": totals["pgd"] / totals["count"], "eval_images": totals["count"]}


# ----------------------------------------------------------------------------- workdirs


def _apply_eval(model, variables, x):
  return model.apply(variables, x, train=False)


@functools.lru_cache(maxsize=None)
def _eval_fn(model):
  # One function object per model: jit caches keyed on it hit across checkpoints.
  return functools.partial(_apply_eval, model)


def bind_model(model, variables) -> Partial:
  """apply_fn(x) -> (logits, cas_logits) of `model` in evaluation mode with `variables`."""
  return Partial(_eval_fn(model), variables)


def budget_from_config(evaluation) -> AttackBudget:
  """The AttackBudget of config.eval (fields of the same names; missing ones keep defaults)."""
  defaults = AttackBudget()
  return AttackBudget(**{name: int(evaluation.get(name, default))
                         for name, default in vars(defaults).items()})


def evaluation_config(config):
  """config with the network computing in config.eval.dtype (unless that is ""): a model
  trained in bfloat16 is attacked and judged in float32 by default; the weights are the same."""
  dtype = config.eval.get("dtype", "")
  if not dtype or dtype == config.model.dtype:
    return config
  config = config.copy_and_resolve_references()
  config.model.dtype = dtype  # an existing field: allowed in a locked config too
  return config


def evaluate_workdir(config, workdir: str,
                     out_dir: Optional[str] = None) -> Dict[str, report_lib.Report]:
  """Evaluate config.eval.checkpoints of workdir (or config.eval.torch_checkpoint); write reports.

  Writes out_dir (default workdir/eval)/<checkpoint>_report.md and .json and prints each
  markdown report. Each report records its progress in out_dir/state/<checkpoint>/: the same
  command after an interruption resumes it, and a finished one is replayed without attacking
  anything again.
  """
  config = evaluation_config(config)
  evaluation = config.eval
  norm = evaluation.get("norm", "linf")
  parse_attacks(evaluation.attacks, eps=evaluation.eps, has_cas=True, norm=norm)  # typos: now
  budget = budget_from_config(evaluation)
  dataset = input_pipeline.create_dataset(config)
  count = min(evaluation.get("report_images", 0) or dataset.num_test, dataset.num_test)
  x = dataset.test_images[:count].astype(np.float32) / np.float32(255)
  y = dataset.test_labels[:count]
  image_shape = dataset.test_images.shape[1:]
  targets = loading.load_evaluation_targets(config, workdir, dataset.num_classes, image_shape)
  model = targets[0].model
  # A randomized defense (SAP): the attacks without EOT ascend its expectation.
  randomized = baselines.is_randomized(model)
  expectation = baselines.expectation_model(model)
  needs_source = any(n.startswith("transfer") for n in attack_names(evaluation.attacks))
  source = (loading.load_transfer_source(config, dataset.num_classes, image_shape)
            if needs_source else None)
  source_fn = bind_model(source.model, source.variables) if source else None
  key = jax.random.fold_in(jax.random.key(config.seed), 1)
  out_dir = out_dir or os.path.join(workdir, "eval")
  writes = jax.process_index() == 0  # every process evaluates; the first one writes
  if writes:
    os.makedirs(out_dir, exist_ok=True)
  reports: Dict[str, report_lib.Report] = {}
  by_step: Dict[int, report_lib.Report] = {}
  batch_shapes = {}  # the checkpoints' reports reuse each other's batch sizes
  for target in targets:
    label, step, variables = target.label, target.step, target.variables
    where = f"{label} checkpoint (step {step})" if step is not None else label
    title = (f"{config.model.name}, {where}: {count} test images, "
             f"eps {report_lib.format_eps(evaluation.eps, norm)}, computed in {config.model.dtype}")
    if step is not None and step in by_step:  # last == best: evaluated once
      report = report_lib.Report.from_json(by_step[step].to_json())
      report.title = title
      report.notes = report.notes + [f"The same checkpoint as the report above (step {step})."]
    else:
      report = robustness_report(
          bind_model(expectation, variables), x, y, key=key, eps=evaluation.eps, norm=norm,
          attacks=evaluation.attacks, beta=config.loss.beta, batch_size=config.eval_batch_size,
          budget=budget, exact_per_attack=evaluation.get("exact_per_attack", False),
          exact_autoattack=evaluation.get("exact_autoattack", True), source_fn=source_fn,
          title=title, state_dir=os.path.join(out_dir, "state", label),
          progress=evaluation.get("progress", True), batch_shapes=batch_shapes,
          random_apply_fn=baselines.bind_random(model, variables) if randomized else None)
      by_step[step] = report
    report.provenance = provenance.for_report(
        config, None if evaluation.get("torch_checkpoint") else workdir)
    report.provenance_line = provenance.summary_line(report.provenance)
    reports[label] = report
    if not writes:
      continue
    paths = report.write(os.path.join(out_dir, f"{label}_report"))
    print(report.markdown())
    print(f"Wrote {paths[0]} and {paths[1]}\n", flush=True)
  return reports
