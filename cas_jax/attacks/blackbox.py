"""Black-box attacks (paper Table 6): transfer from a source model, and the query-based N-Attack.

    x_adv = transfer(source_fn, x, y, attack="pgd", eps=8/255, key=key)   # evaluate on the target
    x_adv = n_attack(model_fn, x, y, eps=8/255, key=key)                  # queries model_fn only

N-Attack (Li et al., ICML 2019) never differentiates the model: per example it searches a
Gaussian N(mu, sigma^2 I) over arctanh-space images with natural evolution strategies, each
candidate projected into the eps-ball, and stops as soon as the projected mean is misclassified.
"""
import jax
import jax.numpy as jnp

from cas_jax import errors
from cas_jax import losses
from cas_jax.attacks import engine
from cas_jax.attacks import white_box

Array = jax.Array

TRANSFER_ATTACKS = ("pgd", "cw")

# N-Attack's arctanh map shrinks [0, 1] by this factor so that 0 and 1 stay finite (as in the
# authors' code).
_ATANH_SHRINK = 0.999999


@engine.compiled_attack("attack", "steps", "loss", "beta", "norm")
def transfer(source_model_fn, x: Array, y: Array, *, attack: str = "pgd", eps=8 / 255,
             steps: int = 20, key: Array, step_size=None, loss=None, beta: float = 2.0,
             norm: str = "linf") -> Array:
  """Adversarial examples crafted on a source model (PGD-20 on CE, or CW-inf), for a target:
  the last iterate, the one that maximises the source's loss."""
  x, y = engine.check_images_and_labels(x, y)
  if attack not in TRANSFER_ATTACKS:
    raise errors.UserError(f"unknown transfer attack {attack!r}; valid: {', '.join(TRANSFER_ATTACKS)}")
  if attack == "pgd":
    return white_box.pgd(source_model_fn, x, y, eps=eps, steps=steps, key=key,
                         step_size=step_size, loss=loss or "ce", beta=beta,
                         keep_misclassified=False, norm=norm)
  return white_box.cw_inf(source_model_fn, x, y, eps=eps, steps=steps, key=key,
                          step_size=step_size, loss=loss or "cw", beta=beta,
                          keep_misclassified=False, norm=norm)


def _to_image(w: Array) -> Array:
  return 0.5 * jnp.tanh(w) + 0.5


def n_attack_loss(logits: Array, y: Array) -> Array:
  """N-Attack's loss clip(log p_y - log max_{k != y} p_k, 0, 1000) = clip(-margin, 0, 1000).

  The log-probability difference equals the logit difference (the log-normaliser cancels);
  computing it from logits avoids the authors' log(p + 1e-30) floor on saturated softmaxes.
  """
  return jnp.clip(-losses.margin(logits, y), 0.0, 1000.0)


@engine.compiled_attack("population", "sigma", "lr", "max_iters")
def n_attack(model_fn, x: Array, y: Array, *, eps=8 / 255, key: Array, population: int = 300,
             sigma: float = 0.1, lr: float = 0.02, max_iters: int = 500) -> Array:
  """N-Attack: NES on a Gaussian over arctanh(2x - 1) + mu; early stop per example on success.

  Defaults are the authors' CIFAR-10 setting (population 300, sigma 0.1, lr 0.02, 500
  iterations, mu initialised to 0.001 * N(0, I)). Each iteration queries the model on
  N * population candidates plus the N projected means; the success check runs every
  iteration (the authors' code checks every 10th). Returns the first projected mean that is
  misclassified, else the last projected mean.
  """
  x, y = engine.check_images_and_labels(x, y)
  engine.check_eps(eps)
  if population < 2:
    raise errors.UserError(f"population={population} must be >= 2 (NES standardises the losses)")
  x_adv, _ = n_attack_run(model_fn, x, y, eps, key, population=population, sigma=sigma, lr=lr,
                          max_iters=max_iters)
  return x_adv


@engine.jit_with_model("population", "sigma", "lr", "max_iters")
def n_attack_run(model_fn, x: Array, y: Array, eps, key: Array, *, population: int = 300,
                 sigma: float = 0.1, lr: float = 0.02, max_iters: int = 500):
  """N-Attack's search (see n_attack): (x_adv, iterations made); each iteration queries the
  model on population + 1 rows per image."""
  n = x.shape[0]
  keys = engine.example_keys(key, n)
  w = jnp.arctanh((2.0 * x - 1.0) * _ATANH_SHRINK)
  logits_of = lambda z: engine.main_logits(model_fn, z)

  def mean_image(mu):
    return engine.project(_to_image(w + mu), x, eps)

  def update(t, mu):
    noise_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, t + 1)
    noise = engine.per_example(
        lambda k, s: jax.random.normal(k, (population,) + s, x.dtype), noise_keys, x.shape)
    candidates = engine.project(_to_image(w[:, None] + mu[:, None] + sigma * noise),
                                x[:, None], eps)
    logits = logits_of(candidates.reshape((n * population,) + x.shape[1:]))
    loss = n_attack_loss(logits, jnp.repeat(y, population)).reshape(n, population)
    reward = -loss
    score = (reward - reward.mean(axis=1, keepdims=True)) / (reward.std(axis=1, keepdims=True)
                                                           + 1e-7)
    step = jnp.einsum("np,np...->n...", score, noise)
    return mu + (lr / (population * sigma)) * step

  def cond(state):
    t, _, done, _ = state
    return (t < max_iters) & ~jnp.all(done)

  def body(state):
    t, mu, done, x_adv = state
    x_mean = mean_image(mu)
    success = jnp.argmax(logits_of(x_mean), axis=-1) != y
    newly = success & ~done
    x_adv = jnp.where(newly.reshape((n,) + (1,) * (x.ndim - 1)), x_mean, x_adv)
    done = done | success
    mu = jnp.where(done.reshape((n,) + (1,) * (x.ndim - 1)), mu, update(t, mu))
    return t + 1, mu, done, x_adv

  mu0 = 0.001 * engine.per_example(
      lambda k, s: jax.random.normal(k, s, x.dtype),
      jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, 0), x.shape)
  state = (jnp.array(0, jnp.int32), mu0, jnp.zeros((n,), bool), x)
  made, mu, done, x_adv = jax.lax.while_loop(cond, body, state)
  x_adv = jnp.where(done.reshape((n,) + (1,) * (x.ndim - 1)), x_adv, mean_image(mu))
  return jax.lax.stop_gradient(x_adv), made
