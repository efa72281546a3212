"""Robustness evaluation: named attacks, the per-image worst case over them, and workdir reports.

    from cas_jax import evaluate
    report = evaluate.robustness_report(apply_fn, x, y, eps=8/255, key=jax.random.key(0))
    print(report.markdown())           # table with the worst case, sanity report under it
    report = evaluate.robustness_report(apply_fn, x, y, key=key, attacks="pgd100,aa-joint,sweep")

    python main.py --config=configs/smoke.py --workdir=/tmp/cas_smoke --mode=eval

`apply_fn(x) -> (logits, cas_logits)` (or logits alone) is the model in evaluation mode, on
NHWC images in [0, 1]. Attacks are named by strings (config.eval.attacks is a comma-separated
list of them); see `attack_registry` for the names. Cheap attacks (the PGD family, transfer)
run on every image, so their own figures are exact; expensive ones (AutoAttack and its parts,
MD, Avg-PGD, N-Attack) run only on the images every earlier attack left standing, unless
exact_per_attack=True; the table lists the attacks in the order they ran (cheap ones first).
AutoAttack variants share one subset so that `aa` and `aa-joint` stay comparable. Each image's
randomness is folded from its global index (`indices`), so verdicts do not depend on the batch
size, the device count or the process count (batches are sharded over every local device;
with several processes, under --distributed, each one attacks its share of the images and
the verdicts are gathered).
A randomized model (a SAP network; `random_apply_fn=`) is judged over fresh draws: each
verdict is the majority over budget.eot_draws draws, natural accuracy their mean.
"""
import dataclasses
import functools
import os
import time
import zlib
from typing import Dict, Optional

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from cas_jax import input_pipeline
from cas_jax import loading
from cas_jax.models import baselines
from cas_jax import report as report_lib
from cas_jax.attack_registry import AttackBudget, AttackSpec, attack_names, parse_attacks
from cas_jax.attacks import engine
from cas_jax.attacks.autoattack import autoattack
from cas_jax.attacks.blackbox import n_attack, transfer
from cas_jax.attacks.randomized import avg_pgd, eot_pgd
from cas_jax.attacks.white_box import cw_inf, fgsm, margin_decomposition, pgd

Array = jax.Array
Partial = jax.tree_util.Partial


# ----------------------------------------------------------------------------- compiled attacks


@jax.jit
def _correct(model, x: Array, y: Array) -> Array:
  return jnp.argmax(engine.main_logits(model, x), -1) == y


image_keys = jax.jit(engine.index_keys)  # one key per image, from its global index
_VERDICT_STREAM = 0x7E5  # fold_in tag of the fresh draws that judge a randomized model


@functools.partial(jax.jit, static_argnames="draws")
def _correct_fraction(random_model, x: Array, y: Array, keys: Array, draws: int) -> Array:
  """Per image, the fraction of `draws` fresh draws of a randomized model that classify it y."""
  keys = engine.fold_keys(keys, _VERDICT_STREAM)
  hits = jax.lax.map(lambda d: jnp.argmax(engine.main_logits(
      lambda z: random_model(z, engine.fold_keys(keys, d)), x), -1) == y, jnp.arange(draws))
  return jnp.mean(hits, axis=0)


def _ignoring_keys(model, x: Array, keys: Array):
  del keys
  return model(x)


def _judge(model_fns, x_adv: Array, y: Array, keys: Array, draws: int) -> Array:
  """Still correct: on the model, or, for a randomized one (draws > 0), in most of `draws` draws."""
  if not draws:
    return _correct(model_fns[0], x_adv, y)
  return _correct_fraction(model_fns[2], x_adv, y, keys, draws) > 0.5


def _attack_fn(spec: AttackSpec, eps, beta: float, budget: AttackBudget, model, source,
               random_model):
  """(x, y, keys) -> x_adv for every attack that compiles as one function."""
  ce, cw = ("joint_ce", "joint_cw") if spec.joint else ("ce", "cw")
  steps = spec.steps
  if spec.method == "fgsm":
    return lambda x, y, k: fgsm(model, x, y, eps=eps, key=k, loss=ce, beta=beta)
  if spec.method in ("pgd", "cas-head"):
    loss = "cas_ce" if spec.method == "cas-head" else ce
    return lambda x, y, k: pgd(model, x, y, eps=eps, steps=steps, key=k, loss=loss, beta=beta)
  if spec.method == "cw":
    return lambda x, y, k: cw_inf(model, x, y, eps=eps, steps=steps, key=k, loss=cw, beta=beta)
  if spec.method == "md":
    return lambda x, y, k: margin_decomposition(
        model, x, y, eps=eps, steps=steps, key=k, restarts=budget.md_restarts,
        beta=beta if spec.joint else 0.0)
  if spec.method in ("eot", "avg-pgd"):
    attack, loss = (eot_pgd, ce) if spec.method == "eot" else (avg_pgd, cw)
    return lambda x, y, k: attack(random_model, x, y, eps=eps, steps=steps, key=k, loss=loss,
                                  beta=beta, draws=budget.eot_draws)
  if spec.method == "n-attack":
    return lambda x, y, k: n_attack(model, x, y, eps=eps, key=k,
                                    population=budget.n_attack_population,
                                    max_iters=budget.n_attack_iters)
  if spec.method in ("transfer-pgd", "transfer-cw"):
    return lambda x, y, k: transfer(source, x, y, attack=spec.method[len("transfer-"):],
                                    eps=eps, steps=steps, key=k)
  raise ValueError(f"{spec.name} is not a single compiled attack")


@functools.partial(jax.jit, static_argnames=("spec", "beta", "budget", "draws"))
def _compiled_verdicts(model_fns, x: Array, y: Array, index: Array, attack_key: Array, eps, *,
                       spec: AttackSpec, beta: float, budget: AttackBudget, draws: int) -> Array:
  keys = image_keys(attack_key, index)
  x_adv = _attack_fn(spec, eps, beta, budget, *model_fns)(x, y, keys)
  return _judge(model_fns, x_adv, y, keys, draws)


def _attack_verdicts(model_fns, x: Array, y: Array, index: Array, *, attack_key: Array,
                     spec: AttackSpec, beta: float, budget: AttackBudget, draws: int) -> Array:
  """Whether each image is still classified correctly after `spec`'s attack."""
  # Name and eps are not compiled in: pgd20, pgd20@8 and the sweep share one compilation.
  return _compiled_verdicts(model_fns, x, y, index, attack_key, jnp.float32(spec.eps),
                            spec=dataclasses.replace(spec, name="", eps=0.0), beta=beta,
                            budget=budget, draws=draws)


def _autoattack_verdicts(model_fns, spec: AttackSpec, beta: float, budget: AttackBudget,
                         draws: int, x: Array, y: Array, keys: Array) -> np.ndarray:
  """AutoAttack (or one of its parts) on x: whether each image is still robust after it.

  "aa-rand" attacks the randomized model (model_fns[2]) with AutoAttack's rand version.
  """
  randomized = spec.method == "aa-rand"
  stages = None if spec.method in ("aa", "aa-rand") else (spec.method,)
  model_fn = model_fns[2] if randomized else model_fns[0]
  x_adv, robust = autoattack(model_fn, x, y, eps=spec.eps, key=keys, beta=beta,
                             version="rand" if randomized else "standard",
                             loss="joint" if spec.joint else "main", attacks=stages,
                             return_per_attack=True, apgd_steps=budget.apgd_steps,
                             fab_steps=budget.fab_steps, square_queries=budget.square_queries,
                             target_classes=budget.target_classes, eot_draws=budget.eot_draws)
  if draws:
    return np.asarray(_judge(model_fns, x_adv, y, keys, draws))
  return list(robust.values())[-1]


# ----------------------------------------------------------------------------- the report


def _has_cas_heads(apply_fn, x: np.ndarray) -> bool:
  shapes = jax.eval_shape(lambda z: engine.split_outputs(apply_fn(z))[1], x[:1])
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


def _padded_batches(x, y, indices, batch_size):
  """(count, x, y, index) per batch; the last one padded to batch_size with copies of row 0."""
  for start in range(0, len(y), batch_size):
    take = np.arange(start, min(start + batch_size, len(y)))
    rows = np.concatenate([take, np.full(batch_size - take.size, take[0])])
    yield take.size, x[rows], y[rows], indices[rows]


def robustness_report(apply_fn, x, y, *, key: Array, eps: float = 8 / 255, attacks=None,
                      beta: float = 2.0, batch_size: int = 256, indices=None,
                      budget: Optional[AttackBudget] = None, exact_per_attack: bool = False,
                      source_fn=None, random_apply_fn=None,
                      title: str = "Robustness report") -> report_lib.Report:
  """Verdicts of natural, every attack in `attacks` (default: the default set) and the worst case.

  source_fn(x) is the source model of the transfer attacks. random_apply_fn(x, keys) (one key
  per image) is a randomized model (e.g. SAP), which eot / avg-pgd / aa-rand attack; then
  apply_fn is its deterministic version (what the other attacks ascend), every verdict is
  the majority over budget.eot_draws fresh draws of the randomized model, and natural
  accuracy is the mean over those draws. Without it, eot / avg-pgd attack apply_fn (no noise).
  With several processes every one passes the same x and y, attacks its share of the images
  and returns the whole report.
  """
  x, y = (np.asarray(a) for a in engine.check_images_and_labels(x, y))
  engine.check_eps(eps)
  if y.size == 0:
    raise ValueError("no images to evaluate: x and y are empty")
  indices = np.arange(y.size) if indices is None else np.asarray(indices, np.int64)
  if indices.shape != y.shape:
    raise ValueError(f"indices {indices.shape} must give one global index per image {y.shape}")
  budget = budget or AttackBudget()
  specs, notes = parse_attacks(attacks, eps=eps, has_cas=_has_cas_heads(apply_fn, x))
  if source_fn is None and any(s.method.startswith("transfer") for s in specs):
    raise ValueError("transfer attacks need the source model: pass source_fn= (or set "
                     "config.eval.transfer_checkpoint)")
  model_fns = tuple(engine.as_partial(f) for f in (apply_fn, source_fn, random_apply_fn))
  draws = budget.eot_draws if random_apply_fn is not None else 0
  if random_apply_fn is None:  # eot / avg-pgd / aa-rand on a deterministic model: no noise,
    model_fns = model_fns[:2] + (Partial(_ignoring_keys, model_fns[0]),)
    budget = dataclasses.replace(budget, eot_draws=1)  # so one draw is as good as many
  # Each process attacks its own rows on its own devices; the verdicts are gathered at the end.
  num_images, rows = y.size, _process_rows(y.size)
  x, y, local_indices = x[rows], y[rows], indices[rows]
  model_fns = jax.tree_util.tree_map(_process_local, model_fns)
  devices = jax.local_device_count()
  batch_size = -(-min(batch_size, y.size) // devices) * devices
  mesh = jax.sharding.Mesh(np.array(jax.local_devices()), ("data",)) if devices > 1 else None
  if mesh is not None:  # the weights on every device the batches are sharded over
    model_fns = jax.device_put(model_fns, NamedSharding(mesh, P()))

  def to_device(*arrays):
    if mesh is None:
      return tuple(jnp.asarray(a) for a in arrays)
    return tuple(input_pipeline.to_global_array(list(arrays), mesh))

  batches = [(count, *to_device(*arrays))
             for count, *arrays in _padded_batches(x, y, local_indices, batch_size)]
  if draws:  # one draw fraction per image, from keys folded with its global index
    natural_key = jax.random.fold_in(key, zlib.crc32(report_lib.NATURAL.encode()))
    fraction = np.concatenate([np.asarray(_correct_fraction(
        model_fns[2], xb, yb, image_keys(natural_key, ib), draws))[:count]
                               for count, xb, yb, ib in batches])
    natural = fraction > 0.5
  else:
    natural = np.concatenate([np.asarray(_correct(model_fns[0], xb, yb))[:count]
                              for count, xb, yb, _ in batches])
  verdicts, ran_on, infos, seconds = {report_lib.NATURAL: natural}, {}, {}, {}
  for spec in [s for s in specs if not s.expensive] + [s for s in specs if s.expensive]:
    start = time.perf_counter()
    info = spec.info(in_worst_case=abs(spec.eps - eps) < 1e-9)
    info["gradient_draws"] = budget.eot_draws if spec.averages_draws and draws else 0
    attack_key = jax.random.fold_in(key, zlib.crc32(spec.name.encode()) & 0x7FFFFFFF)
    active = natural.copy()
    if spec.expensive and info["in_worst_case"] and not exact_per_attack:
      for name, other in infos.items():
        if other["in_worst_case"] and other["family"] != spec.family:
          active &= verdicts[name]
    verdict, ran = natural.copy(), np.zeros_like(natural)
    run = functools.partial(_attack_verdicts, model_fns, attack_key=attack_key, spec=spec,
                            beta=beta, budget=budget, draws=draws)
    if spec.family == "autoattack":  # its stages are jitted with the model as a Partial
      run = functools.partial(_autoattack_verdicts, model_fns, spec, beta, budget, draws)
    for first, (count, xb, yb, ib) in zip(range(0, y.size, batch_size), batches):
      rows = slice(first, first + count)
      if not spec.expensive:
        verdict[rows] &= np.asarray(run(xb, yb, ib))[:count]
        ran[rows] = natural[rows]
        continue
      if spec.family == "autoattack":
        ib = image_keys(attack_key, ib)
      found = engine.run_on_subset(run, np.pad(active[rows], (0, batch_size - count)), xb, yb, ib)
      if found is not None:
        idx, still_correct = found
        verdict[first + idx] = np.asarray(still_correct)
        ran[first + idx] = True
    verdicts[spec.name], ran_on[spec.name], infos[spec.name] = verdict, ran, info
    seconds[spec.name] = time.perf_counter() - start
    logging.info("%s: %.1f%% still correct (%d attacked, %.1f s)", spec.name,
                 100 * verdict.mean(), ran.sum(), seconds[spec.name])
  verdicts = {name: _gather_rows(v, num_images) for name, v in verdicts.items()}
  ran_on = {name: _gather_rows(v, num_images) for name, v in ran_on.items()}
  verdicts[report_lib.WORST_CASE] = report_lib.worst_case(verdicts, infos)
  report = report_lib.Report(eps=eps, indices=indices, verdicts=verdicts, ran_on=ran_on,
                             attacks=infos, notes=notes, seconds=seconds, title=title,
                             draws=draws,
                             natural_mean=float(np.mean(_gather_rows(fraction, num_images))) if draws else None)
  report.sanity = report_lib.sanity_checks(report)
  return report


# ----------------------------------------------------------------------------- per-epoch check


@functools.partial(jax.jit, static_argnames=("eps", "steps", "step_size", "loss", "beta"))
def _natural_and_pgd_counts(apply_fn, batch, key: Array, *, eps: float, steps: int,
                            step_size: Optional[float], loss: str, beta: float):
  x, y, mask = batch["image"], batch["label"], batch["mask"]
  x_adv = pgd(apply_fn, x, y, eps=eps, steps=steps, step_size=step_size, loss=loss, beta=beta,
              key=engine.index_keys(key, batch["index"]))
  return {"natural": jnp.sum(_correct(apply_fn, x, y) & mask),
          "pgd": jnp.sum(_correct(apply_fn, x_adv, y) & mask), "count": jnp.sum(mask)}


def natural_and_pgd_accuracy(apply_fn, dataset, config, *, key: Array,
                             mesh=None) -> Dict[str, float]:
  """Natural and PGD accuracy (config.eval: eps, steps, step_size, loss) on the first
  config.eval.num_images test images (0 = all), each batch sharded over every device."""
  evaluation, mesh = config.eval, mesh or input_pipeline.data_mesh()
  settings = dict(eps=evaluation.eps, steps=evaluation.steps, loss=evaluation.loss,
                  step_size=evaluation.step_size or None, beta=config.loss.beta)
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


def evaluate_workdir(config, workdir: str) -> Dict[str, report_lib.Report]:
  """Evaluate config.eval.checkpoints of workdir (or config.eval.torch_checkpoint); write reports.

  Writes workdir/eval/<checkpoint>_report.md and .json and prints each markdown report.
  """
  evaluation = config.eval
  parse_attacks(evaluation.attacks, eps=evaluation.eps, has_cas=True)  # fail fast on typos
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
  out_dir = os.path.join(workdir, "eval")
  writes = jax.process_index() == 0  # every process evaluates; the first one writes
  if writes:
    os.makedirs(out_dir, exist_ok=True)
  reports: Dict[str, report_lib.Report] = {}
  by_step: Dict[int, report_lib.Report] = {}
  for target in targets:
    label, step, variables = target.label, target.step, target.variables
    where = f"{label} checkpoint (step {step})" if step is not None else label
    title = (f"{config.model.name}, {where}: {count} test images, "
             f"eps {report_lib.format_eps(evaluation.eps)}")
    if step is not None and step in by_step:  # last == best: evaluated once
      report = report_lib.Report.from_json(by_step[step].to_json())
      report.title = title
      report.notes = report.notes + [f"The same checkpoint as the report above (step {step})."]
    else:
      report = robustness_report(
          bind_model(expectation, variables), x, y, key=key, eps=evaluation.eps,
          attacks=evaluation.attacks, beta=config.loss.beta, batch_size=config.eval_batch_size,
          budget=budget, exact_per_attack=evaluation.get("exact_per_attack", False),
          source_fn=source_fn, title=title,
          random_apply_fn=baselines.bind_random(model, variables) if randomized else None)
      by_step[step] = report
    reports[label] = report
    if not writes:
      continue
    paths = [os.path.join(out_dir, f"{label}_report.{ext}") for ext in ("md", "json")]
    with open(paths[0], "w") as f:
      f.write(report.markdown())
    with open(paths[1], "w") as f:
      f.write(report.to_json())
    print(report.markdown())
    print(f"Wrote {paths[0]} and {paths[1]}\n", flush=True)
  return reports
