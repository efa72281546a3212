"""AutoAttack (Croce & Hein, ICML 2020), L-inf/L2/L1, in JAX, with CAS-aware (joint-loss) variants.

The standard version runs APGD-CE, APGD-T (9 target classes), FAB-T (9 target classes) and
Square (5000 queries) in turn; each stage attacks only the images that every earlier stage
left robust (under L1: APGD with large eps first, APGD-CE with 5 restarts, APGD-T on 5
targets). The "plus" version runs APGD-CE and APGD-DLR with 5 restarts, untargeted FAB
with 5 restarts, Square, APGD-T and FAB-T (9 targets each), the same under every norm (as
the authors' code: no large eps under L1). The "rand" version, for randomized defenses,
runs APGD-CE and APGD-DLR with EOT over 20 draws of `model_fn(x, keys)` (one key per
example, as attacks/randomized.py).

    x_adv = autoattack(model_fn, x, y, eps=8/255, key=key)
    x_adv, robust = autoattack(model_fn, x, y, eps=8/255, key=key, loss="joint",
                               return_per_attack=True)
    robust["square"].mean()      # robust accuracy after the whole ensemble
    x_adv = autoattack(random_model_fn, x, y, eps=8/255, key=key, version="rand")
    x_adv = autoattack(model_fn, x, y, eps=0.5, key=key, version="plus", norm="l2")

loss="joint" makes the APGD stages ascend the joint losses of the main and CAS heads (CE,
targeted DLR, DLR; weight `beta`); FAB and FAB-T linearise the main head's z_k - z_y, whose
gradient passes through the CAS masks either way, and Square uses the main-head margin.
Every stage is a list of units of the survivor cascade (attacks/cascade.py): one per APGD
restart, APGD-T and FAB-T target and FAB restart, and one per chunk of Square queries
(`square_bounds`), each run on the images every unit before it left robust, so Square drops
a fooled image within SQUARE_CHUNK queries (within 10 to 80 in its first 150, when most fall).
Compiled runs are cached per model_fn object: pass the same one across calls, or better a
jax.tree_util.Partial(apply_fn, variables), whose weights are then traced inputs (not
constants baked into each program) and whose compilations survive new weights.
"""
import functools
import zlib
from typing import List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cas_jax import errors
from cas_jax.attacks import cascade
from cas_jax.attacks import engine
from cas_jax.attacks import verdicts
from cas_jax.attacks.apgd import APGD_LOSSES, apgd_round, check_budget
from cas_jax.attacks.apgd import round_passes as apgd_round_passes
from cas_jax.attacks.fab import fab_round
from cas_jax.attacks.fab import round_passes as fab_round_passes
from cas_jax.attacks.engine import predict
from cas_jax.attacks.square import square_chunk

Array = jax.Array
# Position in ATTACKS is each attack's fold_in tag: an image's randomness in one attack does
# not depend on which other attacks ran. New attacks go at the end.
ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square", "apgd-dlr", "fab")
VERSIONS = {"standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
            "plus": ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"),
            "rand": ("apgd-ce", "apgd-dlr")}
LOSS_MODES = ("main", "joint")
# Square gathers the images still standing after these queries (most fall early), then
# every SQUARE_CHUNK queries.
SQUARE_GATHERS = (10, 30, 70, 150)
SQUARE_CHUNK = 250
L1_RESTARTS = 5  # AutoAttack standard under L1: APGD-CE restarts and APGD-T targets
PLUS_RESTARTS = 5  # AutoAttack plus: APGD-CE, APGD-DLR and FAB restarts (FAB's alone too)
# Folded into every image's key before a stage's tag: AutoAttack's streams, the same in the
# public `autoattack()` and in a report, apart from every other attack's.
STREAM = zlib.crc32(b"autoattack") & 0x7FFFFFFF


def target_ranks(target_classes: int, num_classes: int) -> range:
  """The ranks APGD-T and FAB-T target: 2 .. min(target_classes, num_classes - 1) + 1."""
  if target_classes < 1:
    raise errors.UserError(f"target_classes={target_classes} must be >= 1 (AutoAttack uses 9)")
  return range(2, min(target_classes, num_classes - 1) + 2)


def _apgd_loss(stage: str, joint: bool) -> str:
  base = {"apgd-ce": "ce", "apgd-dlr": "dlr", "apgd-t": "targeted_dlr"}[stage]
  return f"joint_{base}" if joint else base


def stage_units(model_fn, stage: str, *, eps, key_kind: Array, judge: verdicts.Judge,
                loss: str = "main", beta: float = 2.0, apgd_steps: int = 100,
                fab_steps: int = 100, square_queries: int = 5000,
                ranks: Sequence[int] = range(2, 11), eot=None,
                prefix: str = "", norm: str = "linf",
                version: str = "standard") -> List[cascade.Unit]:
  """The cascade units of one AutoAttack stage of `version`, judged by `judge` after each batch.

  Units are named prefix + stage (+ "-joint" for APGD on the joint losses) (+ "/rank" for
  APGD-T and FAB-T, "/r<restart>" for restarts, "/q<first query>" for Square's chunks); FAB,
  FAB-T and Square do not depend on `loss` or the version, so the same names (and runs) serve
  every variant. Plus's APGD under L1 (without large eps) is named "plus:..." apart from the
  standard's. Each image's key is folded with STREAM, the stage's tag and the loss mode (not
  FAB's): APGD on the main and on the joint losses start from independent points. key_kind:
  any key array of the PRNG implementation of the cascade's key data.
  """
  tag, joint = ATTACKS.index(stage), loss == "joint"
  # FAB ignores the loss: one stream, so that its units (shared by name) are one computation
  # whichever variant builds them (FAB-T's and Square's streams stay as they were).
  tags = (STREAM, tag, int(joint and stage != "fab"))
  impl = jax.random.key_impl(key_kind)

  def unit(name, attack, forward, gradient, carry=None, reads_carry=False, program=None):
    def run_batch(x, y, key_data, carry_in):
      image_keys = jax.random.wrap_key_data(key_data, impl=impl)
      stage_keys = engine.fold_keys(image_keys, *tags)
      if carry is None:
        x_adv, _ = attack(x, y, stage_keys, eps)
        carry_out, made = None, 0
      else:
        x_adv, _, carry_out, made = attack(x, y, stage_keys, carry_in, eps)
      correct, judged, judge_padding = judge(x_adv, y, image_keys)
      # On the host: one-op device programs here would each compile (per batch shape).
      return (~np.asarray(correct), x_adv, carry_out, forward + int(made) + judged, gradient,
              judge_padding)
    return cascade.Unit(prefix + name, run_batch, carry and prefix + carry, reads_carry,
                        program=program)

  if stage.startswith("apgd"):
    plus = version == "plus"
    name = ("plus:" if plus and norm == "l1" else "") + stage + ("-joint" if joint else "")
    # Under L1 the standard version runs APGD with large eps first (use_largereps), APGD-CE
    # with L1_RESTARTS restarts and APGD-T on the first L1_RESTARTS targets (as the authors').
    largereps = norm == "l1" and eot is None and not plus
    if stage == "apgd-t":
      rounds = tuple(ranks)[:L1_RESTARTS] if largereps else tuple(ranks)
    else:
      rounds = (None,) * (PLUS_RESTARTS if plus else
                          L1_RESTARTS if largereps and stage == "apgd-ce" else 1)
    forward, gradient = apgd_round_passes(apgd_steps, eot, stage == "apgd-t", largereps)
    label = lambda number, rank: (f"/{rank}" if rank is not None
                                  else f"/r{number}" if len(rounds) > 1 else "")
    # Every APGD stage, on the main or the joint losses, runs one program: the loss is picked
    # from APGD_LOSSES by a traced index, and rank 0 stands for no target.
    return [unit(name + label(number, rank),
                 functools.partial(apgd_round, model_fn, steps=apgd_steps, loss=APGD_LOSSES,
                                   loss_index=APGD_LOSSES.index(_apgd_loss(stage, joint)),
                                   beta=beta, eot=eot, rank=rank or 0, number=number,
                                   norm=norm, use_largereps=largereps), forward, gradient,
                 program="apgd")
            for number, rank in enumerate(rounds)]
  if stage.startswith("fab"):
    # FAB-T: one round per target from x; FAB: PLUS_RESTARTS restarts, the first from x.
    targeted = stage == "fab-t"
    rounds = [(rank, 0) for rank in ranks] if targeted else [
        (None, restart) for restart in range(PLUS_RESTARTS)]
    forward, gradient = fab_round_passes(fab_steps, targeted)
    return [unit(f"fab-t/{rank}" if targeted else f"fab/r{restart}",
                 functools.partial(fab_round, model_fn, steps=fab_steps, rank=rank,
                                   restart=restart, number=number, norm=norm),
                 forward, gradient) for number, (rank, restart) in enumerate(rounds)]
  bounds = square_bounds(square_queries)
  def chunk(first, end):
    def attack(x, y, stage_keys, carry, eps):
      return square_chunk(model_fn, x, y, stage_keys, carry, first, end, eps,
                          total_queries=square_queries, norm=norm)
    return attack
  return [unit(f"square/q{first}", chunk(first, end), 0, 0, carry="square",
               reads_carry=first > 0) for first, end in zip(bounds[:-1], bounds[1:])]


def square_bounds(queries: int) -> List[int]:
  """The query counts at which Square's survivors are gathered again: 0, SQUARE_GATHERS, then
  every SQUARE_CHUNK queries, and `queries`."""
  bounds = [0] + [b for b in SQUARE_GATHERS if b < queries]
  while bounds[-1] + SQUARE_CHUNK < queries:
    bounds.append(max(SQUARE_CHUNK, bounds[-1] + SQUARE_CHUNK - bounds[-1] % SQUARE_CHUNK))
  return bounds + [queries]


def check_stages(version: str, loss: str, names: Sequence[str]) -> None:
  """One ValueError line for an unknown version, loss mode or stage list."""
  if version not in VERSIONS:
    raise errors.UserError(f"unknown version {version!r}; valid: {', '.join(VERSIONS)}")
  if loss not in LOSS_MODES:
    raise errors.UserError(f"unknown loss {loss!r}; valid: 'main' (every attack on the main logits) "
                     "or 'joint' (APGD on the joint losses of the main and CAS heads)")
  unknown = [a for a in names if a not in ATTACKS]
  if unknown or not names:
    raise errors.UserError(f"unknown attacks {unknown or names}; valid: {', '.join(ATTACKS)}")
  if version == "rand" and set(names) - set(VERSIONS["rand"]):
    raise errors.UserError(f"version='rand' runs gradient attacks with EOT only: "
                     f"{', '.join(VERSIONS['rand'])}; got {', '.join(names)}")


def autoattack(model_fn, x: Array, y: Array, *, eps=8 / 255, version: str = "standard",
               key: Array, loss: str = "main", beta: float = 2.0,
               attacks: Optional[Sequence[str]] = None, return_per_attack: bool = False,
               apgd_steps: int = 100, fab_steps: int = 100, square_queries: int = 5000,
               target_classes: int = 9, eot_draws: int = 20, verdict_draws: int = 10,
               norm: str = "linf"):
  """AutoAttack; with return_per_attack, also {"clean" and each attack: robust flags after it}.

  version: "standard", "plus" or "rand" (module doc). `attacks` overrides the version's list
  (run in the order given, with the version's restarts), e.g. ("apgd-ce", "square").
  The step, query, target and draw counts default to AutoAttack's; tests make them small.
  Stages, random streams and judge are a report's (`robustness_report(..., attacks="aa")`
  gives the same verdicts for the same key); version="rand" judges by the majority of
  `verdict_draws` fresh draws of model_fn(x, keys). norm: "linf" (default), "l2" or "l1"
  (case-insensitive), eps in its units.
  """
  x, y = engine.check_images_and_labels(x, y)
  norm = engine.check_norm(norm)
  engine.check_eps(eps, norm)
  names = VERSIONS.get(version, ()) if attacks is None else tuple(attacks)
  check_stages(version, loss, names)
  check_budget(min(apgd_steps, fab_steps, square_queries), 1, eot_draws)
  randomized = version == "rand"
  keys = engine.example_keys(key, x.shape[0])
  judge = (verdicts.judge(None, model_fn, verdict_draws) if randomized
           else verdicts.judge(model_fn, None, 0))
  robust, _, _ = judge(x, y, keys)
  num_classes = jax.eval_shape(lambda z, k: predict(model_fn, z, k, randomized), x[:1],
                               keys[:1]).shape[-1]
  options = dict(eps=eps, key_kind=keys, judge=judge, loss=loss, beta=beta, apgd_steps=apgd_steps,
                 fab_steps=fab_steps, square_queries=square_queries,
                 ranks=target_ranks(target_classes, num_classes),
                 eot=eot_draws if randomized else None, norm=norm, version=version)
  units = {name: stage_units(model_fn, name, **options) for name in names}
  result = cascade.run([cascade.Step(u, ("aa",)) for n in names for u in units[n]],
                       np.asarray(x), np.asarray(y), np.asarray(jax.random.key_data(keys)),
                       eligible={"aa": np.asarray(robust)}, batch_size=x.shape[0],
                       keep_adversarial=True)
  per_attack, standing = {"clean": np.asarray(robust)}, np.asarray(robust)
  for name in names:
    for u in units[name]:
      standing = standing & ~result.fooled[u.name]
    per_attack[name] = standing
  x_adv = jnp.asarray(result.x_adv)
  return (x_adv, per_attack) if return_per_attack else x_adv
