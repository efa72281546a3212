"""Table 1's channel-suppressing baselines: kWTA, SAP and PCL's prototype branches.

    y = kwta(x, ratio=0.2)          # per example, the ceil(0.2 * H*W*C) largest entries; others 0
    y = sap(x, key, ratio=1.0)      # stochastic activation pruning, E[y] = x
    model = models.create("resnet18", baseline="sap", cas_stages=())
    logits, _ = model.apply(variables, x, train=False, rngs={"sap": key})   # one random draw
    random_apply_fn = bind_random(model, variables)   # (x, keys) -> outputs, one key per image

Choices the CAS paper leaves open (taken from the baselines' papers):
- kWTA (Xiao et al. 2020) replaces every ReLU of the network (stem and both of each block);
  it keeps the k largest values, negative ones included, as their kWTA does. Ties: exactly k
  entries are kept, the lower flat (H, W, C) index first (the order of `lax.top_k`).
- SAP (Dhillon et al. 2018) follows every ReLU; `ratio` sets the number of samples drawn with
  replacement, r = ceil(ratio * D) per example and layer (ratio 1.0: as many samples as
  activations). Entry j, drawn with probability p_j = |x_j| / sum|x|, survives with
  q_j = 1 - (1 - p_j)^r and is scaled by 1 / q_j. SAP draws in training too (the network
  trains as it runs); `sap_deterministic=True` builds its expectation (a plain ReLU network).
  Gradients treat 1 / q_j as a constant, so the mean of per-draw gradients is an unbiased
  estimate of the gradient of the expected output (the attacker's best case for EOT).
- PCL (Mustafa et al. 2019): prototype branches on the global-average-pooled output of stage 3
  (through a Dense G_phi to `pcl_dim` features) and on the penultimate features (no
  projection), each with C learned prototypes; `losses.prototype_conformity` is their loss.
"""
import functools
import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from cas_jax.models import cas as cas_lib

Array = jax.Array
BASELINES = ("none", "kwta", "sap", "pcl")


def _count(ratio: float, size: int) -> int:
  # round() first: 0.3 * 10 is 3.0000000000000004 in floating point, which is 3 entries, not 4.
  return max(1, math.ceil(round(ratio * size, 9)))


def kwta(x: Array, ratio: float = 0.2) -> Array:
  """k-winners-take-all: per example, keep the k = ceil(ratio * D) largest of D entries."""
  if not 0.0 < ratio <= 1.0:
    raise ValueError(f"kwta ratio={ratio} must lie in (0, 1], e.g. 0.2 (keep the top 20%)")
  n = x.shape[0]
  flat = x.reshape(n, -1)
  _, winners = jax.lax.top_k(flat, _count(ratio, flat.shape[1]))
  mask = jnp.zeros(flat.shape, x.dtype).at[jnp.arange(n)[:, None], winners].set(1)
  return (flat * jax.lax.stop_gradient(mask)).reshape(x.shape)


def sap_keep_probabilities(x: Array, ratio: float = 1.0) -> Array:
  """SAP's keep probability per entry, 1 - (1 - |x_j| / sum|x|)^r with r = ceil(ratio * D)."""
  flat = jnp.abs(x.reshape(x.shape[0], -1))
  total = jnp.sum(flat, axis=1, keepdims=True)
  p = flat / jnp.where(total > 0, total, 1)
  samples = _count(ratio, flat.shape[1])
  return (-jnp.expm1(samples * jnp.log1p(-p))).reshape(x.shape)


def _sap_one(h: Array, key: Array, keep: Array, samples: int) -> Array:
  """One example: draw `samples` indices with replacement in proportion to |h|; keep those."""
  magnitude = jnp.abs(h)
  cumulative = jnp.cumsum(magnitude)
  u = jax.random.uniform(key, (samples,)) * cumulative[-1]
  drawn = jnp.clip(jnp.searchsorted(cumulative, u, side="right"), 0, h.size - 1)
  kept = jnp.zeros(h.shape, bool).at[drawn].set(True) & (keep > 0)
  # The scale 1/q is a constant to gradients: a draw's gradient is then 1[kept] / q per entry,
  # whose mean over draws is the gradient of E[output] = h (what EOT needs to estimate).
  scale = jax.lax.stop_gradient(1.0 / jnp.where(keep > 0, keep, 1))
  return jnp.where(kept, h * scale, 0)


def sap(x: Array, key: Array, ratio: float = 1.0) -> Array:
  """Stochastic activation pruning: entries drawn in proportion to |x|, survivors scaled by 1/q."""
  if ratio <= 0:
    raise ValueError(f"sap ratio={ratio} must be > 0 (samples per activation, e.g. 1.0)")
  n = x.shape[0]
  flat = x.reshape(n, -1)
  keep = sap_keep_probabilities(flat, ratio)
  one = functools.partial(_sap_one, samples=_count(ratio, flat.shape[1]))
  return jax.vmap(one)(flat, jax.random.split(key, n), keep).reshape(x.shape)


class Activation(nn.Module):
  """ReLU, kWTA (instead of ReLU) or ReLU then SAP (a fresh draw from the "sap" stream)."""
  kind: str = "relu"  # "relu" | "kwta" | "sap"
  ratio: float = 0.2
  deterministic: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.kind == "kwta":
      return kwta(x, self.ratio)
    y = nn.relu(x)
    if self.kind != "sap" or self.deterministic or self.is_initializing():
      return y
    if not self.has_rng("sap"):
      raise ValueError("this SAP network draws random pruning at every call: pass "
                       "rngs={'sap': key} to apply, or build it with sap_deterministic=True "
                       "for its expectation")
    return sap(y, self.make_rng("sap"), self.ratio)


def activation_kind(baseline: str) -> str:
  """The activation a baseline puts in place of ReLU ("relu" for none and pcl)."""
  return baseline if baseline in ("kwta", "sap") else "relu"


class PrototypeBranch(nn.Module):
  """A PCL branch: pooled features (through Dense(dim) unless dim is None) and C prototypes.

  Sows (features, prototypes) into the "pcl" collection: apply with mutable=["pcl"] to read
  them (losses.prototype_conformity); in evaluation they are not collected.
  """
  num_classes: int
  dim: int = 0  # 0: the pooled features themselves
  dtype: cas_lib.Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: Array) -> None:
    pooled = jnp.mean(features, axis=(1, 2)) if features.ndim == 4 else features
    if self.dim:
      pooled = nn.Dense(self.dim, dtype=self.dtype, kernel_init=cas_lib.torch_kernel_init,
                        bias_init=cas_lib.torch_bias_init(pooled.shape[-1]), name="g_phi")(pooled)
    # Mustafa et al. draw their centres from N(0, 1).
    prototypes = self.param("prototypes", nn.initializers.normal(1.0),
                            (self.num_classes, pooled.shape[-1]), jnp.float32)
    self.sow("pcl", "branch", (pooled.astype(jnp.float32), prototypes))


def is_randomized(model) -> bool:
  """Whether `model` draws fresh noise at every call (a SAP network not built deterministic)."""
  return (getattr(model, "baseline", "none") == "sap"
          and not getattr(model, "sap_deterministic", False))


def expectation_model(model):
  """`model` itself, or, for a SAP network, its deterministic expectation (SAP off)."""
  return model.clone(sap_deterministic=True) if is_randomized(model) else model


def _apply_random(model, variables, x: Array, keys: Array):
  def one(image, key):
    return model.apply(variables, image[None], train=False, rngs={"sap": key})
  return jax.tree.map(lambda o: o[:, 0], jax.vmap(one)(x, keys))


@functools.lru_cache(maxsize=None)
def _random_fn(model):
  # One function object per model: jit caches keyed on it hit across checkpoints.
  return functools.partial(_apply_random, model)


def bind_random(model, variables) -> jax.tree_util.Partial:
  """random_apply_fn(x, keys) -> (logits, cas_logits): image i's draw comes from keys[i] alone."""
  return jax.tree_util.Partial(_random_fn(model), variables)
