"""White-box attacks on the engine: PGD, FGSM, CW-inf and Margin Decomposition.

Every attack is a pure function of (model_fn, x, y, key) returning x_adv, compiled with lax
loops (jit it with the ints, `loss` and `model_fn` static). `model_fn(x)` returns logits or
(logits, cas_logits); `loss` names what is ascended (see `attack_loss`), so the paper's
adaptive attacks on CAS models are the same functions with a joint loss:

    x_adv = pgd(model_fn, x, y, eps=8/255, steps=20, key=key)                   # PGD-20
    x_adv = pgd(model_fn, x, y, eps=8/255, steps=20, key=key, loss="joint_ce")  # adaptive
    x_adv = cw_inf(model_fn, x, y, eps=8/255, key=key, loss="joint_cw")
    x_adv = margin_decomposition(model_fn, x, y, eps=8/255, key=key)            # Table 12

`key` is one key (folded with 0..N-1, one per example) or a batch of N per-example keys:
evaluation passes keys folded with global image indices, so results do not depend on batching.
`norm` ("linf", default, "l2" or "l1"; static) picks the ball, its random start, its steepest
step and its projection (attacks/norms.py): pgd(..., eps=0.5, norm="l2") is PGD-L2.
"""
from typing import Callable, Union

import jax
import jax.numpy as jnp

from cas_jax import errors
from cas_jax import losses
from cas_jax.attacks import engine

Array = jax.Array
AttackLoss = Callable[..., Array]

ATTACK_LOSSES = ("ce", "cw", "dlr", "joint_ce", "joint_cw", "joint_dlr", "cas_ce")


def _cas_ce(cas_logits, labels: Array) -> Array:
  if not cas_logits:
    raise errors.UserError("loss 'cas_ce' attacks the CAS heads, but the model function returns no "
                     "CAS logits; use 'ce' for a plain network.")
  return sum(losses.cross_entropy(c, labels) for c in cas_logits) / len(cas_logits)


def attack_loss(name: Union[str, AttackLoss, tuple], beta: float = 2.0, index=0) -> AttackLoss:
  """The per-example loss `(outputs, y) -> (N,)` named `name` (a callable passes through).

  name may be a tuple of names, a family: `index` (traced) picks the loss, so that every loss
  of the family runs in one compiled program; only the picked one is computed.
  """
  if callable(name):
    return name
  if isinstance(name, tuple):
    return engine.picked_loss([attack_loss(member, beta) for member in name], index)
  per_name = {
      "ce": lambda logits, cas, y: losses.cross_entropy(logits, y),
      "cw": lambda logits, cas, y: losses.margin(logits, y),
      "dlr": lambda logits, cas, y: losses.dlr(logits, y),
      "joint_ce": lambda logits, cas, y: losses.joint_ce(logits, cas, y, beta),
      "joint_cw": lambda logits, cas, y: losses.joint_margin(logits, cas, y, beta),
      "joint_dlr": lambda logits, cas, y: losses.joint_dlr(logits, cas, y, beta),
      "cas_ce": lambda logits, cas, y: _cas_ce(cas, y),
  }
  if name not in per_name:
    raise errors.UserError(f"unknown attack loss {name!r}; valid: {', '.join(ATTACK_LOSSES)} "
                     "or a callable (outputs, y) -> (N,)")
  fn = per_name[name]
  return lambda outputs, y: fn(*engine.split_outputs(outputs), y)


@engine.compiled_attack("steps", "loss", "beta", "start", "keep_misclassified", "norm")
def pgd(model_fn, x: Array, y: Array, *, eps=8 / 255, steps: int = 20, key: Array,
        step_size=None, loss="ce", beta: float = 2.0, start: str = "uniform",
        keep_misclassified: bool = True, norm: str = "linf", loss_index=0) -> Array:
  """PGD-`steps` with step `step_size` (default eps/10, the paper's protocol) on `loss`
  (a name, or a family of names with the traced loss_index picking one: `attack_loss`).

  Under norm "l2" each step is step_size * grad / ||grad||_2; under "l1" a sparse step
  (norms.steepest_step), each then projected into the norm's eps-ball and [0, 1].

  keep_misclassified: an image some iterate misclassified (main head) gets that iterate when
  the last one is classified correctly, as APGD does (one more forward pass); False returns
  the last iterate (e.g. transfer examples, crafted to maximise the source's loss).
  """
  x, y = engine.check_images_and_labels(x, y)
  engine.check_eps(eps, norm)
  loss_fn = attack_loss(loss, beta, loss_index)
  step_size = eps / 10 if step_size is None else step_size
  options = dict(eps=eps, step_size=step_size, steps=steps, key=key, start=start, norm=norm)
  if not keep_misclassified:
    return engine.ascend(lambda z: loss_fn(model_fn(z), y), x, **options)

  def loss_and_logits(z):
    outputs = model_fn(z)
    return loss_fn(outputs, y), engine.split_outputs(outputs)[0]
  x_last, tracked = engine.ascend(loss_and_logits, x, track=engine.misclassified_tracker(x, y),
                                  **options)
  return engine.prefer_misclassified(x_last, engine.main_logits(model_fn, x_last), y, tracked)


@engine.compiled_attack("loss", "beta", "norm", "start")
def fgsm(model_fn, x: Array, y: Array, *, eps=8 / 255, key: Array, loss="ce",
         beta: float = 2.0, norm: str = "linf", start: str = "uniform") -> Array:
  """FGSM as the paper runs it: one signed step of size eps from a random start in the ball.

  Under "l2" / "l1" it is FGM: one normalised step of size eps (norms.steepest_step);
  start="none" steps from x itself (the classic FGSM / FGM).
  """
  x, y = engine.check_images_and_labels(x, y)
  return pgd(model_fn, x, y, eps=eps, steps=1, key=key, step_size=eps, loss=loss, beta=beta,
             norm=norm, start=start)


@engine.compiled_attack("steps", "loss", "beta", "keep_misclassified", "norm")
def cw_inf(model_fn, x: Array, y: Array, *, eps=8 / 255, steps: int = 20, key: Array,
           step_size=None, loss="cw", beta: float = 2.0, keep_misclassified: bool = True,
           norm: str = "linf") -> Array:
  """CW-inf: PGD on the margin loss max_{k != y} z_k - z_y ("joint_cw" for CAS models); the
  same margin attack in another ball with norm="l2" / "l1"."""
  x, y = engine.check_images_and_labels(x, y)
  return pgd(model_fn, x, y, eps=eps, steps=steps, key=key, step_size=step_size, loss=loss,
             beta=beta, keep_misclassified=keep_misclassified, norm=norm)


# ---------------------------------------------------------------- per-example best so far


def init_best(x: Array, logits: Array, y: Array):
  """Best-so-far state (x_best, margin, broken) seeded with candidate x and its logits."""
  return x, losses.margin(logits, y), jnp.argmax(logits, axis=-1) != y


def keep_best(best, x_candidate: Array, logits: Array, y: Array):
  """Per example, keep the candidate if it breaks the model and the best does not, else the larger margin.

  So the returned example misclassifies whenever any candidate seen did.
  """
  x_best, best_margin, best_broken = best
  margin = losses.margin(logits, y)
  broken = jnp.argmax(logits, axis=-1) != y
  better = (broken & ~best_broken) | ((broken == best_broken) & (margin > best_margin))
  return (jnp.where(engine.per_image(better, x_best), x_candidate, x_best),
          jnp.where(better, margin, best_margin), best_broken | broken)


# ---------------------------------------------------------------- Margin Decomposition


def _label_logit(logits: Array, y: Array) -> Array:
  return jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0]


def _other_max_logit(logits: Array, y: Array) -> Array:
  is_label = jax.nn.one_hot(y, logits.shape[-1], dtype=bool)
  return jnp.max(jnp.where(is_label, -jnp.inf, logits), axis=-1)


@engine.compiled_attack("steps", "restarts", "change_point", "beta", "norm")
def margin_decomposition(model_fn, x: Array, y: Array, *, eps=8 / 255, steps: int = 40,
                         key: Array, restarts: int = 1, change_point=None,
                         first_step_size=None, step_size=None, beta: float = 0.0,
                         norm: str = "linf") -> Array:
  """The MD attack (Ma et al., "Imbalanced Gradients"): one margin term first, then the margin.

  Each restart runs twice from a uniform random start: once ascending -z_y, once
  max_{k != y} z_k, for the first `change_point` steps (default steps // 2, step
  `first_step_size`, default 2 eps), then the full margin (step `step_size`, default eps / 4).
  As in the authors' released code, step 0 ascends z_y with a 2 eps step. Defaults are that
  code's evaluation setting (40 steps, change point 20, 16/255 then 2/255 at eps = 8/255).
  Every iterate is checked: an example counts as broken if any run breaks it, and the
  breaking iterate is returned (else the one with the largest margin).
  beta > 0 adds beta * (the mean over CAS heads of the same term): an adaptive MD.
  norm: the ball, start and steps (the same step sizes, of normalised steps under l2 / l1).
  """
  x, y = engine.check_images_and_labels(x, y)
  engine.check_eps(eps, norm)
  change_point = steps // 2 if change_point is None else change_point
  if not 0 <= change_point <= steps:
    raise errors.UserError(f"change_point={change_point} must lie in [0, steps={steps}]")
  if restarts < 1:
    raise errors.UserError(f"restarts={restarts} must be >= 1 (each restart is two runs)")
  first_step_size = 2 * eps if first_step_size is None else first_step_size
  step_size = eps / 4 if step_size is None else step_size
  keys = engine.example_keys(key, x.shape[0])

  def joint(term, outputs):
    logits, cas_logits = engine.split_outputs(outputs)
    value = term(logits, y)
    if beta and cas_logits:
      value = value + beta * sum(term(c, y) for c in cas_logits) / len(cas_logits)
    return value

  def run_body(run, best):
    def objective(z, i):
      outputs = model_fn(z)
      label = joint(_label_logit, outputs)
      other = joint(_other_max_logit, outputs)
      first_stage = jnp.where(run % 2 == 0, -label, other)
      value = jnp.where(i == 0, label, jnp.where(i < change_point, first_stage, other - label))
      return value, engine.split_outputs(outputs)[0]

    step_size_at = lambda i: jnp.where(i == 0, 2 * eps, jnp.where(i < change_point,
                                                                  first_step_size, step_size))
    track = (best, lambda state, x_adv, logits: keep_best(state, x_adv, logits, y))
    x_adv, best = engine.ascend(objective, x, eps=eps, step_size=step_size_at, steps=steps,
                                key=engine.fold_keys(keys, run), with_step=True, track=track,
                                norm=norm)
    return keep_best(best, x_adv, engine.main_logits(model_fn, x_adv), y)

  best = init_best(x, engine.main_logits(model_fn, x), y)
  x_best, _, _ = jax.lax.fori_loop(0, 2 * restarts, run_body, best)
  return jax.lax.stop_gradient(x_best)
