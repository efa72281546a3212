"""The report's plan: which compiled units run, for which attacks, on which images.

    ctx = Context(eps=8/255, budget=budget, beta=2.0, draws=0, key_kind=key, ranks=range(2, 11))
    steps, after = attack_plan.plan(specs, models, ctx, exact_per_attack=False)

`DISPATCH` is the one table from an attack method to its units (attacks/cascade.py): a single
compiled attack for the PGD family, MD, EOT, N-Attack and transfer; AutoAttack's stages
(`autoattack.stage_units`, the same as the public `autoattack()`) for aa, aa-plus, aa-rand
and the AutoAttack parts. Every unit judges its adversarial examples with
`attacks/verdicts.py` (the model, or the majority over fresh draws of a randomized one).
Cheap attacks run on every clean-correct image; expensive ones on the images every earlier
attack of another family left standing (`after`), unless exact_per_attack, and the
AutoAttack family on every clean-correct image unless exact_autoattack=False (it costs at
most ~1.5x; docs/evaluation.md has the measurement).
Units shared by several attacks (FAB-T and Square of aa and aa-joint) run once, on the images
standing for all of them.
"""
import dataclasses
import functools
import zlib
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import jax
import numpy as np

from cas_jax.evaluation.attack_registry import AttackBudget, AttackSpec
from cas_jax.attacks.autoattack import ATTACKS, VERSIONS, stage_units
from cas_jax.attacks import cascade
from cas_jax.attacks import engine
from cas_jax.attacks import verdicts
from cas_jax.attacks.blackbox import n_attack_run, transfer
from cas_jax.attacks.randomized import eot_pgd
from cas_jax.attacks.white_box import margin_decomposition, pgd

Array = jax.Array
Partial = jax.tree_util.Partial
# The order of AutoAttack's stages across its versions and parts in a report (plus: its own
# order but Square last, as in standard, after the cheaper targeted stages; the verdicts do
# not depend on the order, only the cost does).
STAGE_ORDER = ("apgd-ce", "apgd-dlr", "fab", "apgd-t", "fab-t", "square")
AA_STAGES = {"aa": VERSIONS["standard"], "aa-plus": VERSIONS["plus"],
             "aa-rand": VERSIONS["rand"], **{s: (s,) for s in ATTACKS}}
AA_VERSIONS = {"aa-plus": "plus", "aa-rand": "rand"}  # the others: standard's settings
PGD_LOSSES = ("ce", "cw", "joint_ce", "joint_cw")  # PGD's and CW's, one program (_single_attack)


class Models(NamedTuple):
  """The model functions of a report, as Partials: main (deterministic), source, random."""
  main: Partial
  source: Optional[Partial]
  random: Optional[Partial]


# ----------------------------------------------------------------------------- single units


@functools.partial(jax.jit, static_argnames=("spec", "beta", "budget"))
def _single_attack(models: Models, x: Array, y: Array, keys: Array, eps, loss_index=0, *,
                   spec: AttackSpec, beta: float, budget: AttackBudget):
  """x_adv of an attack that compiles as one function, and the iterations it made (N-Attack).

  PGD and CW (spec.method "pgd", spec.joint False: `_static_spec`) run one program: the loss
  is PGD_LOSSES[loss_index], traced.
  """
  ce, cw = ("joint_ce", "joint_cw") if spec.joint else ("ce", "cw")
  method, steps, made = spec.method, spec.steps, 0
  if method == "pgd":
    x_adv = pgd(models.main, x, y, eps=eps, steps=steps, key=keys, loss=PGD_LOSSES,
                loss_index=loss_index, beta=beta, norm=spec.norm)
  elif method in ("fgsm", "cas-head"):
    x_adv = pgd(models.main, x, y, eps=eps, steps=1 if method == "fgsm" else steps, key=keys,
                step_size=eps if method == "fgsm" else None,
                loss="cas_ce" if method == "cas-head" else ce, beta=beta, norm=spec.norm)
  elif method == "md":
    x_adv = margin_decomposition(models.main, x, y, eps=eps, steps=steps, key=keys,
                                 restarts=budget.md_restarts, beta=beta if spec.joint else 0.0)
  elif method in ("eot", "avg-pgd"):
    x_adv = eot_pgd(models.random, x, y, eps=eps, steps=steps, key=keys,
                    loss=ce if method == "eot" else cw, beta=beta, draws=budget.eot_draws,
                    norm=spec.norm)
  elif method == "n-attack":
    x_adv, made = n_attack_run(models.main, x, y, eps, keys, population=budget.n_attack_population,
                               max_iters=budget.n_attack_iters)
  else:  # transfer-pgd, transfer-cw
    x_adv = transfer(models.source, x, y, attack=method[len("transfer-"):], eps=eps, steps=steps,
                     key=keys, norm=spec.norm)
  return x_adv, made


def _single_passes(spec: AttackSpec, budget: AttackBudget) -> Tuple[int, int, int]:
  """(forward, gradient, forward per N-Attack iteration) batch passes of `_single_attack`."""
  steps, draws = spec.steps, budget.eot_draws
  if spec.method == "md":
    return 1 + 2 * budget.md_restarts, 2 * budget.md_restarts * steps, 0
  if spec.method in ("eot", "avg-pgd"):  # each draw is recomputed in the backward pass; the
    return (steps + 1) * draws, steps * draws, 0  # last iterate's draws are one more pass
  if spec.method == "n-attack":
    return 0, 0, budget.n_attack_population + 1
  if spec.method.startswith("transfer-"):
    return 0, steps, 0
  return 1, 1 if spec.method == "fgsm" else steps, 0  # + the last iterate's check


def _static_spec(spec: AttackSpec) -> Tuple[AttackSpec, int]:
  """(spec as _single_attack's static argument, loss_index): pgd20 and pgd20@16 share a
  compilation, and so do PGD and CW on the main or the joint losses (the loss is traced)."""
  static = dataclasses.replace(spec, name="", eps=0.0)
  if spec.method not in ("pgd", "cw"):
    return static, 0
  loss = ("joint_" if spec.joint else "") + ("cw" if spec.method == "cw" else "ce")
  return dataclasses.replace(static, method="pgd", joint=False), PGD_LOSSES.index(loss)


def single_unit(spec: AttackSpec, models: Models, ctx: "Context") -> List[cascade.Unit]:
  """The one unit of an attack that compiles as one function."""
  static, loss_index = _static_spec(spec)
  stream = zlib.crc32(spec.canonical.encode()) & 0x7FFFFFFF  # pgd20 = pgd20-joint on CAS
  forward, gradient, per_iteration = _single_passes(spec, ctx.budget)
  impl, check = jax.random.key_impl(ctx.key_kind), verdicts.judge(models.main, models.random,
                                                                 ctx.draws, ctx.judge_shapes)

  def run_batch(x, y, key_data, carry):
    del carry
    image_keys = jax.random.wrap_key_data(key_data, impl=impl)
    x_adv, made = _single_attack(models, x, y, engine.fold_keys(image_keys, stream),
                                 np.float32(spec.eps), loss_index, spec=static, beta=ctx.beta,
                                 budget=ctx.budget)
    still, judged, judge_padding = check(x_adv, y, image_keys)
    # On the host: one-op device programs here would each compile (per batch shape).
    return (~np.asarray(still), x_adv, None, forward + per_iteration * int(made) + judged,
            gradient, judge_padding)
  return [cascade.Unit(spec.name, run_batch,
                       source_gradient=spec.method.startswith("transfer-"))]


def autoattack_units(spec: AttackSpec, models: Models, ctx: "Context") -> List[cascade.Unit]:
  """AutoAttack's stages (or one part) as units; their names are shared across loss variants."""
  randomized = spec.method == "aa-rand"
  prefix = "" if spec.in_threat(ctx.norm, ctx.eps) else (f"@{spec.eps * 255:g}:" if spec.norm == "linf"
                                   else f"{spec.norm}@{spec.eps:g}:")
  model = models.random if randomized else models.main
  options = dict(eps=spec.eps, key_kind=ctx.key_kind,
                 judge=verdicts.judge(models.main, models.random, ctx.draws, ctx.judge_shapes),
                 loss="joint" if spec.joint else "main", beta=ctx.beta,
                 apgd_steps=ctx.budget.apgd_steps, fab_steps=ctx.budget.fab_steps,
                 square_queries=ctx.budget.square_queries, ranks=ctx.ranks,
                 eot=ctx.budget.aa_rand_draws if randomized else None,
                 prefix=prefix + ("rand:" if randomized else ""), norm=spec.norm,
                 version=AA_VERSIONS.get(spec.method, "standard"))
  units = []
  for stage in AA_STAGES[spec.method]:
    units += stage_units(model, stage, **options)
  return units


DISPATCH = {
    **{m: single_unit for m in ("fgsm", "pgd", "cw", "cas-head", "md", "eot", "avg-pgd",
                                "n-attack", "transfer-pgd", "transfer-cw")},
    **{m: autoattack_units for m in AA_STAGES},
}


@dataclasses.dataclass(frozen=True)
class Context:
  """What every unit of a report shares: eps, budget, beta, verdict draws, key kind, ranks."""
  eps: float
  budget: AttackBudget
  beta: float
  draws: int
  key_kind: Array  # any key array of the report's PRNG implementation
  ranks: Sequence[int]
  norm: str = "linf"  # the report's threat model (with eps: the worst case's)
  judge_shapes: Optional[cascade.BatchShapes] = None  # the verdict program's batch sizes


def _stage_position(unit_name: str) -> Tuple[int, int]:
  """(stage, position within the stage) of an AutoAttack unit name: 'fab-t/3', 'apgd-ce/r2',
  'plus:apgd-dlr/r1'."""
  bare = unit_name.rpartition(":")[2]
  stage, _, rest = bare.partition("/")
  stage = stage.replace("-joint", "")
  return STAGE_ORDER.index(stage), int(rest.lstrip("qr") or 0)


def plan(specs: Sequence[AttackSpec], models: Models, ctx: Context, *,
         exact_per_attack: bool = False, exact_autoattack: bool = True
         ) -> Tuple[List[cascade.Step], Dict[str, List[str]]]:
  """The cascade's steps (cheap attacks first, then expensive ones in the order given, the
  AutoAttack family as one block where its first member stands) and each attack's `after`."""
  cheap = [s for s in specs if not s.expensive]
  expensive = [s for s in specs if s.expensive]
  in_worst = lambda s: s.in_threat(ctx.norm, ctx.eps)
  after, done = {}, []
  steps: List[cascade.Step] = []
  blocks: List[List[AttackSpec]] = []
  for spec in cheap:
    blocks.append([spec])
  family = [s for s in expensive if s.family == "autoattack"]
  for spec in expensive:
    if spec.family != "autoattack":
      blocks.append([spec])
    elif spec is family[0]:
      blocks.append(family)
  for block in blocks:
    for spec in block:
      exact = exact_per_attack or not spec.expensive or not in_worst(spec) or (
          spec.family == "autoattack" and exact_autoattack)
      after[spec.name] = [] if exact else [d.name for d in done
                                           if in_worst(d) and d.family != spec.family]
    units: Dict[str, Tuple[cascade.Unit, List[str]]] = {}
    for spec in block:
      for unit in DISPATCH[spec.method](spec, models, ctx):
        units.setdefault(unit.name, (unit, []))[1].append(spec.name)
    ordered = list(units.values())
    if len(block) > 1 or block[0].family == "autoattack":
      ordered.sort(key=lambda pair: _stage_position(pair[0].name))
    steps += [cascade.Step(unit, tuple(members)) for unit, members in ordered]
    done += block
  return steps, after
