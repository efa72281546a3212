"""Auto-PGD (Croce & Hein, ICML 2020): PGD with momentum and a self-tuning step size.

Each image starts at step 2 * eps and halves its own step at the checkpoints of
`checkpoints(steps)` when its loss stalled, restarting from its best point. `norm` (static)
picks the ball: "linf" (default, sign steps), "l2" (normalised steps, the same schedule) or
"l1", the official L1-APGD (Croce & Hein, ICCV 2021): sparse steps on the top `sparsity`
fraction of |grad| without momentum, a step eps that at every max(int(0.04 steps), 1)
iterations is reset where the best point's sparsity fell by 5% (with a restart from the best
point) and divided by 1.5 elsewhere (within [eps / 10, eps]), and a sparsity of the best
point's L0 / 1.5. `use_largereps` runs L1-APGD at 3 eps, 2 eps, then eps. `loss` names what
is ascended; the joint losses reach the CAS heads (the adaptive attack for CAS models):

    x_adv = apgd(model_fn, x, y, eps=8/255, key=key)                              # APGD-CE
    x_adv = apgd(model_fn, x, y, eps=8/255, key=key, loss="targeted_dlr",
                 target_ranks=range(2, 11))                                     # APGD-T
    x_adv = apgd(model_fn, x, y, eps=8/255, key=key, loss="joint_ce", beta=2.0)   # adaptive
    x_adv = apgd(random_model_fn, x, y, eps=8/255, key=key, loss="dlr", eot=20)   # randomized
    x_adv = apgd(model_fn, x, y, eps=12.0, key=key, norm="l1", use_largereps=True)  # L1-APGD

The result is the adversarial example where one was found and x elsewhere. `model_fn(x)`
returns logits or (logits, cas_logits); with `eot` set it is `model_fn(x, keys)` with one
key per example (the convention of attacks/randomized.py). `key` is one key or N keys.
"""
import functools
import math
from typing import Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from cas_jax import errors
from cas_jax import losses
from cas_jax.attacks import cascade
from cas_jax.attacks import engine
from cas_jax.attacks import norms
from cas_jax.attacks import white_box

Array = jax.Array

APGD_LOSSES = ("ce", "dlr", "targeted_dlr", "joint_ce", "joint_dlr", "joint_targeted_dlr")
TARGETED_LOSSES = ("targeted_dlr", "joint_targeted_dlr")
MOMENTUM = 0.75
# The official L1-APGD's schedule: start sparsity, step reset/shrink, the largereps stages.
L1_SPARSITY, L1_SHRINK, L1_MIN_STEP = 0.2, 1.5, 10.0
LARGEREPS = ((3.0, 0.3), (2.0, 0.3), (1.0, 0.4))
# fold_in tags of the per-example streams: a run's random start and model draws (under the
# stream of its round: restart / target rank), and the clean prediction.
_START, _MODEL, _PREDICT, _ROUND = 0, 1, 2, 3


def checkpoints(steps: int) -> tuple:
  """Iterations w_j after which APGD checks its step size (w_0 = 0), as AutoAttack's code does.

  The first check comes after max(int(0.22 N), 1) iterations; each later interval is
  max(int(0.03 N), 1) shorter than the one before, but at least max(int(0.06 N), 1). When
  N is a multiple of 100 (AutoAttack's 100 iterations) this is the paper's p_0 = 0,
  p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), w_j = ceil(p_j N):
  (0, 22, 41, 57, 70, 80, 87, 93, 99) for 100. At other budgets the authors' code (and
  torchattacks) truncates the three fractions of N instead, and we follow the code: for 10
  iterations it checks after every iteration from the 2nd on.
  """
  # The reference's own float expressions, so that int() truncates exactly as it does.
  interval, shrink, shortest = (max(int(0.22 * steps), 1), max(int(0.03 * steps), 1),
                                max(int(0.06 * steps), 1))
  found = [0]
  while found[-1] + interval <= steps:
    found.append(found[-1] + interval)
    interval = max(interval - shrink, shortest)
  return tuple(found)


def apgd_loss(name, beta: float = 2.0, index=0):
  """The per-example loss `(outputs, y, targets) -> (N,)` that APGD ascends under `name`.

  name may be a tuple of loss names, a family: then `index` (traced) picks the one ascended,
  so that every loss of the family runs in one compiled program (AutoAttack's stages on the
  main and the joint losses). Only the picked loss is computed and differentiated.
  """
  if isinstance(name, tuple):
    return engine.picked_loss([apgd_loss(member, beta) for member in name], index)
  if name not in APGD_LOSSES:
    raise errors.UserError(f"unknown APGD loss {name!r}; valid: {', '.join(APGD_LOSSES)}")
  if name == "targeted_dlr":
    return lambda outputs, y, t: losses.targeted_dlr(engine.split_outputs(outputs)[0], y, t)
  if name == "joint_targeted_dlr":
    return lambda outputs, y, t: losses.joint_targeted_dlr(*engine.split_outputs(outputs), y, t,
                                                           beta)
  untargeted = white_box.attack_loss(name, beta)
  return lambda outputs, y, targets: untargeted(outputs, y)


def should_halve(increases: Array, interval, loss_best: Array, loss_best_at_check: Array,
                 reduced_at_check: Array, rho: float = 0.75) -> Array:
  """APGD's test at a checkpoint, per example: halve the step (and restart from the best point)?

  Yes where the loss rose in at most rho of the interval's steps (the reference code's <=),
  or where the step was not halved at the last checkpoint and the best loss has not grown.
  """
  return (increases <= rho * interval) | (~reduced_at_check & (loss_best_at_check >= loss_best))


def largereps_schedule(steps: int) -> tuple:
  """((eps factor, iterations), ...) of use_largereps: 3, 2, 1 x eps, as the official splits steps.

  The iterations are ceil(0.3 steps), ceil(0.3 steps) and the rest (the official's own floats).
  """
  first = [math.ceil(fraction * steps) for _, fraction in LARGEREPS[:-1]]
  counts = first + [steps - sum(first)]
  return tuple((factor, count) for (factor, _), count in zip(LARGEREPS, counts))


@engine.jit_with_model("steps", "loss", "beta", "rho", "eot", "norm", "continued")
def apgd_run(model_fn, x: Array, y: Array, targets: Array, keys: Array, x_start: Array, eps,
             *, steps: int, loss, beta: float, rho: float = 0.75, eot=None,
             norm: str = "linf", continued: bool = False, loss_index=0) -> dict:
  """One APGD run from x_start; a dict of per-example results (keys: the EOT draws).

  x_adv / fooled: the last misclassified iterate and whether there was one; x_best / loss_best:
  the highest-loss point; step_sizes: (steps, N) the step each image used at each iteration.
  norm: the ball (module doc). continued (L1): x_start is an earlier stage's best point, whose
  sparsity seeds this run's (the official run with x_init). loss: a name, or a family of names
  with the traced loss_index picking one (`apgd_loss`).
  """
  norm = engine.check_norm(norm)
  loss_fn = apgd_loss(loss, beta, loss_index)
  n = x.shape[0]
  per_image = lambda v: engine.per_image(v, x)
  is_checkpoint = np.zeros(steps + 1, bool)
  interval = np.zeros(steps + 1, np.int32)
  marks = checkpoints(steps)
  is_checkpoint[list(marks[1:])] = True
  interval[list(marks[1:])] = np.diff(marks)
  is_checkpoint, interval = jnp.asarray(is_checkpoint), jnp.asarray(interval)

  def draw(z, draw_keys):
    outputs = engine.call_model(model_fn, z, draw_keys, eot is not None)
    per_example = loss_fn(outputs, y, targets)
    return jnp.sum(per_example), (per_example, engine.split_outputs(outputs)[0])

  value_and_grad = jax.value_and_grad(draw, has_aux=True)

  def evaluate(z, i):
    """Loss, its gradient (both averaged over `eot` draws) and whether z is still classified y."""
    if eot is None:
      (_, (value, logits)), grad = value_and_grad(z, keys)
      return value, grad, jnp.argmax(logits, -1) == y

    def one_draw(d):
      (_, (value, logits)), grad = value_and_grad(z, engine.fold_keys(keys, _MODEL, i, d))
      return value, grad, logits

    def add_draw(d, total):
      value, grad, logits = one_draw(d)
      return total[0] + value, total[1] + grad, logits

    value, grad, logits = jax.lax.fori_loop(1, eot, add_draw, one_draw(0))
    return value / eot, grad / eot, jnp.argmax(logits, -1) == y

  l1 = norm == "l1"
  dim = int(np.prod(x.shape[1:]))
  l1_interval = max(int(0.04 * steps), 1)
  nonzero = lambda z: jnp.sum((z - x).reshape(n, -1) != 0, axis=1).astype(x.dtype)

  def first(value, grad, correct):
    """The state once x_start is evaluated."""
    # The reference code compares the first iterate's loss with 0, not with the start's: its
    # loss history is read one row back, at index -1, which wraps to a row not yet written.
    first_comparison = jnp.zeros_like(value) if steps > 1 else jnp.full_like(value, jnp.inf)
    state = dict(x_adv=x_start, x_prev=x_start, grad=grad, step=jnp.full((n,), 2.0 * eps),
                 x_best=x_start, grad_best=grad, loss_best=value, loss_prev=first_comparison,
                 x_fooled=x_start, fooled=~correct, increases=jnp.zeros(n, jnp.int32),
                 loss_best_at_check=value, reduced_at_check=jnp.ones(n, bool),
                 step_sizes=jnp.zeros((steps, n)))
    if l1:
      sparse_at_start = nonzero(x_start)
      state.update(
          step=jnp.full((n,), 1.0 * eps),
          sparsity=(sparse_at_start / dim / L1_SHRINK if continued
                    else jnp.full((n,), L1_SPARSITY, x.dtype)),
          sparse_old=sparse_at_start if continued else jnp.full((n,), float(dim), x.dtype))
    return state

  def step_from(i, s):
    """Iteration i's new point."""
    if l1:  # no momentum, as the official L1-APGD
      x_new = engine.project(s["x_adv"] + per_image(s["step"]) * norms.direction(
          s["grad"], norm, s["sparsity"]), x, eps, norm)
    else:
      momentum = jnp.where(i > 0, MOMENTUM, 1.0)
      z = engine.project(s["x_adv"] + per_image(s["step"]) * norms.direction(
          s["grad"], norm), x, eps, norm)
      x_new = engine.project(s["x_adv"] + momentum * (z - s["x_adv"])
                             + (1.0 - momentum) * (s["x_adv"] - s["x_prev"]), x, eps, norm)
    return x_new

  def update(i, s, x_new, value, grad, correct):
    """The state after iteration i evaluated its new point."""
    improved = value > s["loss_best"]
    x_best = jnp.where(per_image(improved), x_new, s["x_best"])
    grad_best = jnp.where(per_image(improved), grad, s["grad_best"])
    loss_best = jnp.where(improved, value, s["loss_best"])
    increases = s["increases"] + (value > s["loss_prev"])
    extra = {}
    if l1:  # the official L1-APGD's adaptive sparsity and step
      at_check = (i + 1) % l1_interval == 0
      sparse_now = nonzero(x_best)
      reduce = at_check & (sparse_now / s["sparse_old"] < 0.95)
      step = jnp.where(at_check, jnp.clip(jnp.where(reduce, eps, s["step"] / L1_SHRINK),
                                          eps / L1_MIN_STEP, eps), s["step"])
      extra = dict(sparsity=jnp.where(at_check, sparse_now / dim / L1_SHRINK, s["sparsity"]),
                   sparse_old=jnp.where(at_check, sparse_now, s["sparse_old"]))
    else:
      at_check = is_checkpoint[i + 1]
      reduce = at_check & should_halve(increases, interval[i + 1], loss_best,
                                       s["loss_best_at_check"], s["reduced_at_check"], rho)
      step = jnp.where(reduce, s["step"] / 2, s["step"])
    return dict(
        x_adv=jnp.where(per_image(reduce), x_best, x_new), x_prev=s["x_adv"],
        grad=jnp.where(per_image(reduce), grad_best, grad), step=step,
        x_best=x_best, grad_best=grad_best, loss_best=loss_best, loss_prev=value,
        x_fooled=jnp.where(per_image(~correct), x_new, s["x_fooled"]),
        fooled=s["fooled"] | ~correct, increases=jnp.where(at_check, 0, increases),
        loss_best_at_check=jnp.where(at_check, loss_best, s["loss_best_at_check"]),
        reduced_at_check=jnp.where(at_check, reduce, s["reduced_at_check"]),
        step_sizes=s["step_sizes"].at[i].set(s["step"]), **extra)

  def body(j, s):
    # Evaluation j of steps + 1, the first at x_start: one gradient program in the loop, where
    # a first evaluation before it compiled the model's backward pass a second time.
    x_new = jnp.where(j == 0, x_start, step_from(j - 1, s))
    value, grad, correct = evaluate(x_new, j)
    return jax.tree.map(lambda a, b: jnp.where(j == 0, a, b), first(value, grad, correct),
                        update(j - 1, s, x_new, value, grad, correct))

  placeholder = first(jnp.zeros(n, x.dtype), jnp.zeros_like(x), jnp.ones(n, bool))
  s = jax.lax.fori_loop(0, steps + 1, body, placeholder)
  return dict(x_adv=s["x_fooled"], fooled=s["fooled"], x_best=s["x_best"],
              loss_best=s["loss_best"], step_sizes=s["step_sizes"])


def ranked_targets(logits: Array, rank: int) -> Array:
  """The class with the rank-th largest logit of each row (rank 1 = the prediction)."""
  num_classes = logits.shape[-1]
  if isinstance(rank, int) and not 2 <= rank <= num_classes:  # a traced rank is checked before
    raise errors.UserError(f"target rank {rank} is invalid for {num_classes} classes; valid: "
                     f"2..{num_classes} (rank 2 = the runner-up class)")
  return jnp.argsort(logits, axis=-1)[:, -rank]


def start_and_run(model_fn, x: Array, y: Array, targets: Array, round_keys: Array, eps, *,
                  steps: int, norm: str = "linf", use_largereps: bool = False,
                  **options) -> dict:
  """A round's random start in the `norm` ball and its apgd_run (options: apgd_run's).

  use_largereps (L1): the official schedule: a start in the 3 eps ball, then runs at 3 eps,
  2 eps and eps (`largereps_schedule`), each from the last one's best point projected into
  its ball; the dict of the last run (earlier runs' examples lie outside the eps-ball).
  """
  start_keys = engine.fold_keys(round_keys, _START)
  if not use_largereps:
    start = engine.random_start(start_keys, x, eps, norm=norm)
    return apgd_run(model_fn, x, y, targets, round_keys, start, eps, steps=steps, norm=norm,
                    **options)
  schedule = largereps_schedule(steps)
  x_start = engine.random_start(start_keys, x, schedule[0][0] * eps, norm=norm)
  for factor, count in schedule:
    x_start = engine.project(x_start, x, factor * eps, norm)
    out = apgd_run(model_fn, x, y, targets, round_keys, x_start, factor * eps, steps=count,
                   norm=norm, continued=True, **options)
    x_start = out["x_best"]
  return out


@engine.jit_with_model("steps", "loss", "beta", "rho", "eot", "norm", "use_largereps")
def apgd_round(model_fn, x: Array, y: Array, keys: Array, eps, *, steps: int, loss,
               beta: float = 2.0, rho: float = 0.75, eot=None, rank=None, number=0,
               norm: str = "linf", use_largereps: bool = False, loss_index=0):
  """Round `number` of APGD (one target rank, one restart) on a batch: (x_adv, fooled).

  rank: the target class's rank by the clean logits (targeted losses), else None; a traced
  rank of 0 stands for no target (the untargeted members of a loss family). rank, number and
  loss_index are traced: every target and restart of a loss, and with `loss` a family of
  names (`apgd_loss`) every loss of it, runs one compiled program. A round
  costs steps + 1 gradient passes (each over `eot` draws), plus one forward pass for the
  targets (`round_passes`). With `eot` it returns the iterate of the highest EOT-averaged loss
  (its best point, what a judge over many draws should see), not one a single draw misread.
  norm / use_largereps: the ball and the L1 schedule (`start_and_run`; 3 runs: 2 more passes).
  """
  targets = y
  if rank is not None:
    def ranked():
      clean = engine.predict(model_fn, x, engine.fold_keys(keys, _PREDICT), eot is not None)
      return ranked_targets(clean, rank).astype(y.dtype)
    targets = jax.lax.cond(rank > 0, ranked, lambda: y)  # no forward pass without a target
  out = start_and_run(model_fn, x, y, targets, engine.fold_keys(keys, _ROUND, number), eps,
                      steps=steps, loss=loss, beta=beta, rho=rho, eot=eot, norm=norm,
                      use_largereps=use_largereps, loss_index=loss_index)
  return out["x_best" if eot is not None else "x_adv"], out["fooled"]


def round_passes(steps: int, eot=None, targeted: bool = False, use_largereps: bool = False):
  """(forward, gradient) batch passes of one apgd_round."""
  runs = len(LARGEREPS) if use_largereps else 1
  return int(targeted), (steps + runs) * (eot or 1)


def check_largereps(steps: int, norm: str) -> None:
  """One UserError line when use_largereps cannot run: not L1, or a stage without iterations."""
  if norm != "l1":
    raise errors.UserError(f"use_largereps is the official L1-APGD's eps schedule; got "
                           f"norm={norm!r}, use norm='l1' or use_largereps=False")
  if min(count for _, count in largereps_schedule(steps)) < 1:
    raise errors.UserError(f"use_largereps splits steps={steps} into "
                           f"{[c for _, c in largereps_schedule(steps)]}: a stage without "
                           "iterations; use steps=3 or steps >= 5")


def check_budget(steps: int, restarts: int = 1, eot=None) -> None:
  """One ValueError line for a step, restart or EOT count below 1."""
  if steps < 1 or restarts < 1:
    raise errors.UserError(f"steps={steps} and restarts={restarts} must both be >= 1")
  if eot is not None and eot < 1:
    raise errors.UserError(f"eot={eot}: use None for a deterministic model or a number of draws >= 1")


def apgd(model_fn, x: Array, y: Array, *, eps=8 / 255, key: Array, steps: int = 100,
         loss: str = "ce", target_ranks: Union[int, Sequence[int]] = 2, beta: float = 2.0,
         restarts: int = 1, rho: float = 0.75, eot=None, best_loss: bool = False,
         active=None, norm: str = "linf", use_largereps: bool = False) -> Array:
  """APGD on `loss`: each restart (and target rank) runs only on the images still robust.

  Targeted losses attack each rank in `target_ranks` in turn (ranks by the clean logits;
  range(2, 11) is APGD-T). `active` (N,) bool picks the images to attack (default: those
  classified correctly); best_loss=True returns every image's highest-loss point instead.
  norm: "linf", "l2" or "l1" (module doc). use_largereps (default False, L1 only): each round
  runs at 3 eps, 2 eps, then eps over ceil(0.3 steps), ceil(0.3 steps) and the remaining
  iterations, as the official L1-APGD with use_largereps=True (also with best_loss, where
  the official runs without it); the result lies in the eps-ball.
  """
  x, y = engine.check_images_and_labels(x, y)
  norm = engine.check_norm(norm)
  engine.check_eps(eps, norm, int(np.prod(x.shape[1:])))
  if use_largereps:
    check_largereps(steps, norm)
  apgd_loss(loss, beta)  # validates the name
  check_budget(steps, restarts, eot)
  ranks = (target_ranks,) if isinstance(target_ranks, int) else tuple(target_ranks)
  if loss not in TARGETED_LOSSES:
    ranks = (None,)
  keys = engine.example_keys(key, x.shape[0])
  clean_logits = engine.predict(model_fn, x, engine.fold_keys(keys, _PREDICT), eot is not None)
  for r in ranks:
    if r is not None:
      ranked_targets(clean_logits, r)  # validates the rank
  rounds = [(r, restart) for r in ranks for restart in range(restarts)]
  if best_loss:
    targets = {r: y if r is None else ranked_targets(clean_logits, r) for r in ranks}
    x_best, loss_best = x, jnp.full(x.shape[:1], -jnp.inf)
    for number, (r, _) in enumerate(rounds):
      out = start_and_run(model_fn, x, y, targets[r], engine.fold_keys(keys, _ROUND, number),
                          eps, steps=steps, loss=loss, beta=beta, rho=rho, eot=eot, norm=norm,
                          use_largereps=use_largereps)
      better = out["loss_best"] > loss_best
      x_best = jnp.where(engine.per_image(better, x), out["x_best"], x_best)
      loss_best = jnp.maximum(out["loss_best"], loss_best)
    return x_best

  robust = jnp.argmax(clean_logits, -1) == y if active is None else jnp.asarray(active)
  forward, gradient = round_passes(steps, eot, loss in TARGETED_LOSSES, use_largereps)
  units = [cascade.attack_unit(
      f"apgd/{number}", functools.partial(apgd_round, model_fn, steps=steps, loss=loss,
                                          beta=beta, rho=rho, eot=eot, rank=r, number=number,
                                          norm=norm, use_largereps=use_largereps),
      eps, keys, forward, gradient) for number, (r, _) in enumerate(rounds)]
  return cascade.attack_in_rounds(units, x, y, keys, np.asarray(robust))
