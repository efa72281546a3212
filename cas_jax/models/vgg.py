"""VGG16-BN with CAS after each of its last three conv layers, as in the official code.

    model = VGG16(num_classes=10)                # cas_stages=None: official placement, S = 3
    variables = model.init(key, x, train=False)
    logits, cas_logits = model.apply(variables, x, train=False)

13 conv+BN+ReLU layers (convs with bias) in 5 groups of widths (w, 2w, 4w, 8w, 8w), a 2x2
max-pool after each group; with `cas_stages=None` the three layers of group 5 each carry a CAS
module (params `layer5_{i}/cas/fc`) and the 5th max-pool runs on the masked output. Classifier:
(Linear + BatchNorm1d + ReLU) twice with 8w hidden units, then Linear; no dropout. w = 64 is
the standard VGG16. Inits are torch's defaults.
"""
import functools
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from cas_jax import errors
from cas_jax.models import cas as cas_lib
from cas_jax.models import conv

Array = jax.Array
GROUP_SIZES = (2, 2, 3, 3, 3)
GROUP_WIDTH_MULTIPLIERS = (1, 2, 4, 8, 8)


def check_cas_stages(cas_stages, model_name: str = "vgg16") -> Optional[tuple]:
  """None (official placement) or () (no CAS); ValueError for anything else."""
  if cas_stages is None:
    return None
  if isinstance(cas_stages, (tuple, list)) and not cas_stages:
    return ()
  raise errors.UserError(
      f"cas_stages {cas_stages!r} invalid for {model_name}; choose None (the "
      "official placement: after each of the last three conv layers) or () (no CAS).")


def _dense(features: int, fan_in: int, dtype, name: str) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, kernel_init=cas_lib.torch_kernel_init,
                  bias_init=cas_lib.torch_bias_init(fan_in), name=name)


class ConvLayer(nn.Module):
  """3x3 conv (with bias) - BN - ReLU, then a CAS module if `with_cas`."""
  features: int
  num_classes: int
  with_cas: bool
  cas_suppress: bool = True
  dtype: cas_lib.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, labels: Optional[Array], train: bool,
               bn_train: bool) -> Tuple[Array, Tuple[Array, ...]]:
    y = nn.Conv(self.features, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                kernel_init=cas_lib.torch_kernel_init,
                bias_init=cas_lib.torch_bias_init(9 * x.shape[-1]),
                conv_general_dilated=conv.conv_general_dilated, name="conv")(x)
    y = nn.relu(cas_lib.BatchNorm(not bn_train, dtype=self.dtype, name="bn")(y))
    if not self.with_cas:
      return y, ()
    y, cas_logits = cas_lib.CAS(self.num_classes, suppress=self.cas_suppress, dtype=self.dtype,
                                name="cas")(y, labels, train)
    return y, (cas_logits,)


class VGG16(nn.Module):
  """VGG16-BN for 32x32 inputs; `__call__` returns (logits, cas_logits tuple)."""
  num_classes: int = 10
  width: int = 64
  cas_stages: Optional[tuple] = None
  cas_suppress: bool = True
  dtype: cas_lib.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, labels: Optional[Array] = None, train: bool = False,
               bn_train: Optional[bool] = None) -> Tuple[Array, Tuple[Array, ...]]:
    official = check_cas_stages(self.cas_stages) is None
    bn_train = train if bn_train is None else bn_train
    y, all_cas_logits = x, ()
    groups = enumerate(zip(GROUP_SIZES, GROUP_WIDTH_MULTIPLIERS), start=1)
    for group, (num_layers, multiplier) in groups:
      for index in range(num_layers):
        layer = ConvLayer(self.width * multiplier, self.num_classes,
                          with_cas=official and group == 5, cas_suppress=self.cas_suppress,
                          dtype=self.dtype, name=f"layer{group}_{index}")
        y, cas_logits = layer(y, labels, train, bn_train)
        all_cas_logits += cas_logits
      y = nn.max_pool(y, (2, 2), strides=(2, 2))
    # Flatten in torch's NCHW order so the first Linear matches torch at any input size.
    y = jnp.transpose(y, (0, 3, 1, 2)).reshape(y.shape[0], -1)
    hidden = 8 * self.width
    norm = functools.partial(cas_lib.BatchNorm, use_running_average=not bn_train, dtype=self.dtype)
    for name in ("layer6", "layer7"):
      y = _dense(hidden, y.shape[-1], self.dtype, f"{name}_linear")(y)
      y = nn.relu(norm(name=f"{name}_bn")(y))
    self.sow("intermediates", "features", y)  # the classifier's input (cas_jax.analysis.channels)
    logits = _dense(self.num_classes, hidden, self.dtype, "layer8")(y)
    return (logits.astype(jnp.float32),
            tuple(c.astype(jnp.float32) for c in all_cas_logits))
