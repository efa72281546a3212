"""PGD against randomized defenses: EOT and Avg-PGD (paper Table 1: kWTA, SAP, PCL vs CAS).

A randomized model is `random_model_fn(x, keys) -> outputs`, where `keys` holds one PRNG key
per example (shape (N,)): a model that draws example i's randomness from keys[i] gives each
image a result independent of its batch. Each step ascends the loss averaged over `draws`
fresh draws (Expectation over Transformation, Athalye et al. 2018): `engine.ascend` on the
loss `engine.mean_over_draws` builds. `noise_std` > 0 also evaluates every draw at
x_adv + N(0, noise_std^2), averaging the gradient over nearby points.

    x_adv = eot_pgd(random_model_fn, x, y, eps=8/255, steps=20, draws=10, key=key)
    x_adv = avg_pgd(random_model_fn, x, y, eps=8/255, key=key)     # Avg-PGD-100, margin loss
    x_adv = avg_pgd(lambda z, keys: model_fn(z), x, y, eps=8/255, key=key, noise_std=0.01)

`norm` ("linf", default, "l2" or "l1"; static) picks the ball as for `pgd`.
"""
import jax

from cas_jax import errors
from cas_jax.attacks import engine
from cas_jax.attacks.white_box import attack_loss

Array = jax.Array

# fold_in tags separating the per-example streams: the start uses the example key itself (as
# `pgd` does), the model's draws and the input noise get streams of their own.
_MODEL_STREAM, _NOISE_STREAM = 1, 2


@engine.compiled_attack("steps", "draws", "loss", "beta", "noise_std", "start",
                        "keep_misclassified", "norm")
def eot_pgd(random_model_fn, x: Array, y: Array, *, eps=8 / 255, steps: int = 20,
            draws: int = 10, key: Array, step_size=None, loss="ce", beta: float = 2.0,
            noise_std: float = 0.0, start: str = "uniform",
            keep_misclassified: bool = True, norm: str = "linf") -> Array:
  """PGD whose every step ascends the loss averaged over `draws` fresh random draws (EOT).

  keep_misclassified: as `pgd`'s, with an iterate misclassified when its draws' mean logits
  are (the last iterate's drawn at step index `steps`: `draws` more forward passes).
  """
  x, y = engine.check_images_and_labels(x, y)
  engine.check_eps(eps, norm)
  if draws < 1:
    raise errors.UserError(f"draws={draws} must be a positive number of random draws per step")
  loss_fn = attack_loss(loss, beta)
  step_size = eps / 10 if step_size is None else step_size
  keys = engine.example_keys(key, x.shape[0])

  def step_loss(z, step):  # (loss, logits), each the mean over the step's draws
    def draw_loss(z, draw):
      model_keys = engine.fold_keys(keys, _MODEL_STREAM, step, draw)
      if noise_std:
        noise_keys = engine.fold_keys(keys, _NOISE_STREAM, step, draw)
        z = z + noise_std * engine.per_example(
            lambda k, s: jax.random.normal(k, s, z.dtype), noise_keys, z.shape)
      outputs = random_model_fn(z, model_keys)
      return loss_fn(outputs, y), engine.split_outputs(outputs)[0]
    return engine.mean_over_draws(draw_loss, draws)(z)

  options = dict(eps=eps, step_size=step_size, steps=steps, key=keys, start=start, with_step=True,
                 norm=norm)
  if not keep_misclassified:
    return engine.ascend(lambda z, step: step_loss(z, step)[0], x, **options)
  x_last, tracked = engine.ascend(step_loss, x, track=engine.misclassified_tracker(x, y),
                                  **options)
  return engine.prefer_misclassified(x_last, step_loss(x_last, steps)[1], y, tracked)


@engine.compiled_attack("steps", "draws", "loss", "beta", "noise_std", "keep_misclassified",
                        "norm")
def avg_pgd(random_model_fn, x: Array, y: Array, *, eps=8 / 255, steps: int = 100,
            draws: int = 10, key: Array, step_size=None, loss="cw", beta: float = 2.0,
            noise_std: float = 0.0, keep_misclassified: bool = True, norm: str = "linf") -> Array:
  """Avg-PGD-100 (Tramer et al. 2020): PGD on the margin loss averaged over random draws."""
  x, y = engine.check_images_and_labels(x, y)
  return eot_pgd(random_model_fn, x, y, eps=eps, steps=steps, draws=draws, key=key,
                 step_size=step_size, loss=loss, beta=beta, noise_std=noise_std,
                 keep_misclassified=keep_misclassified, norm=norm)
