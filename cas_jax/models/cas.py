"""The CAS module (Channel-wise Activation Suppressing, paper section 4.1) and the layers shared by
the networks (torch-default initialisers, a BatchNorm with torch semantics, the activations by
name, the per-channel input standardisation some published networks do first).

    cas = CAS(num_classes=10)
    variables = cas.init(key, features, train=False)
    suppressed, cas_logits = cas.apply(variables, features, labels=y, train=True)

The auxiliary classifier is the Dense layer `fc` (params `.../fc/kernel` of shape (K, C) and
`.../fc/bias`), so a torch `fc.weight` is `kernel.T`. The suppression mask is the kernel column of
the true class (train=True) or of the module's own predicted class (train=False).
"""
import math
from typing import Any, Callable, Optional, Tuple

import jax
import jax.numpy as jnp
from flax import linen as nn

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]

# torch's default Conv2d/Linear weight init, kaiming_uniform(a=sqrt(5)), is U(+-1/sqrt(fan_in)).
torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


# A network's `activation` field names one of these; swish is SiLU, x * sigmoid(x).
ACTIVATIONS = {"relu": nn.relu, "swish": nn.swish}


def standardize(x: Array, mean_std: Optional[Tuple[Tuple[float, ...], Tuple[float, ...]]]) -> Array:
  """(x - mean) / std over the last (channel) axis; x itself when mean_std is None."""
  if mean_std is None:
    return x
  mean, std = (jnp.asarray(values, jnp.float32) for values in mean_std)
  return (x - mean) / std


def torch_bias_init(fan_in: int) -> Initializer:
  """torch's default Conv2d/Linear bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def classify(features: Array, cas_logits: Tuple[Array, ...], num_classes: int, dtype: Dtype,
             bias_init: Initializer, name: str) -> Tuple[Array, Tuple[Array, ...]]:
  """A network's outputs: its final Dense on the pooled `features`, and every head as float32.

  Called inside the network's compact __call__, so the Dense (torch-default kernel init) is
  the network's submodule `name`.
  """
  logits = nn.Dense(num_classes, dtype=dtype, kernel_init=torch_kernel_init, bias_init=bias_init,
                    name=name)(features)
  return logits.astype(jnp.float32), tuple(c.astype(jnp.float32) for c in cas_logits)


class BatchNorm(nn.Module):
  """BatchNorm over all axes but the last, as torch computes it (same variable names as flax's).

  Normalises with the biased batch variance but, like torch, updates the running variance with the
  unbiased one (flax's nn.BatchNorm uses the biased one). `momentum` is flax's (torch 0.1 = 0.9).
  """
  use_running_average: bool
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
    running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
    running_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
    if self.use_running_average:
      mean, var = running_mean.value, running_var.value
    else:
      axes = tuple(range(x.ndim - 1))
      x32 = x.astype(jnp.float32)
      mean = jnp.mean(x32, axes)
      var = jnp.mean(jnp.square(x32 - mean), axes)
      if not self.is_initializing():
        count = x.size // features
        unbiased_var = var * (count / max(count - 1, 1))
        running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
        running_var.value = self.momentum * running_var.value + (1 - self.momentum) * unbiased_var
    multiplier = scale * jax.lax.rsqrt(var + self.epsilon)
    y = (x.astype(jnp.float32) - mean) * multiplier + bias
    return y.astype(self.dtype)


class CAS(nn.Module):
  """Channel-wise Activation Suppressing on NHWC features: returns (suppressed features, logits).

  Attributes:
    num_classes: C, the outputs of the auxiliary classifier.
    suppress: False keeps the classifier (and its logits) but passes the features on unchanged
      (the paper's "without channel suppressing" ablation).
    kernel_init / bias_init: the classifier's initialisers; None for torch's defaults.
    dtype: computation dtype (parameters stay float32).
  """
  num_classes: int
  suppress: bool = True
  kernel_init: Initializer = torch_kernel_init
  bias_init: Optional[Initializer] = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: Array, labels: Optional[Array] = None,
               train: bool = False) -> Tuple[Array, Array]:
    channels = features.shape[-1]
    bias_init = self.bias_init or torch_bias_init(channels)
    classifier = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=self.kernel_init,
                          bias_init=bias_init, name="fc")
    cas_logits = classifier(jnp.mean(features, axis=(1, 2)))
    if train:
      if labels is None:
        raise ValueError("CAS in training mode (train=True) needs the true labels: pass labels=y, "
                         "or use train=False to mask with the predicted class.")
      classes = labels
    else:
      classes = jnp.argmax(cas_logits, axis=-1)
    if not self.suppress:
      return features, cas_logits
    # Not detached: the loss reaches the kernel through the suppressed features as well.
    kernel = classifier.variables["params"]["kernel"]  # (K, C)
    mask = jnp.take(kernel, classes, axis=1).T.astype(features.dtype)  # (N, K)
    return features * mask[:, None, None, :], cas_logits
