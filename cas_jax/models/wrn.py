"""Pre-activation WideResNet (default WRN-34-10) with the official CAS placement.

    model = WideResNet(depth=34, widen_factor=10, num_classes=10)   # cas_stages=None: S = 2
    variables = model.init(key, x, train=False)
    logits, cas_logits = model.apply(variables, x, train=False)

Widths 16 / 16k / 32k / 64k, (depth - 4) / 6 blocks per group. With `cas_stages=None` (the
official code's placement) there are two CAS modules: one inside the last block of group 3, on
that block's input after bn1+ReLU (the mask scales only the residual branch; the identity
shortcut adds the raw input), and one after the final bn+ReLU, before pooling (`extra_cas`,
torch's `extra_fc`). `cas_stages=()` gives the plain network. Init as the official code:
He-normal (fan-out) convs, BN 1/0, torch-default linear kernels with zero biases.

The same module is RobustBench's / TRADES' WideResNet (`models.create("wide_resnet")`, no CAS
by default) and, with `activation="swish"`, `same_padding=True` (the strided 3x3 convs pad
(0, 1), not (1, 1)) and the CIFAR `mean_std` standardisation first, DeepMind's DMWideResNet
(`models.create("dm_wide_resnet")`, models/dm_networks.py).
"""
import functools
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from cas_jax import errors
from cas_jax.models import cas as cas_lib
from cas_jax.models import conv
from cas_jax.models import preact_resnet

Array = jax.Array
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
_zeros = nn.initializers.zeros


def check_cas_stages(cas_stages, model_name: str = "wrn") -> Optional[tuple]:
  """None (official placement) or () (no CAS); ValueError for anything else."""
  if cas_stages is None:
    return None
  if isinstance(cas_stages, (tuple, list)) and not cas_stages:
    return ()
  raise errors.UserError(
      f"cas_stages {cas_stages!r} invalid for {model_name}; choose None (the "
      "official placement: last block of group 3 + after the final bn-ReLU) or () "
      "(no CAS).")


def check_depth_and_width(depth, widen_factor, model_name: str = "wrn",
                          width_name: str = "widen_factor") -> None:
  """ValueError unless depth = 6n + 4 (n >= 1) and widen_factor is a positive integer."""
  if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
    raise errors.UserError(f"depth {depth!r} invalid for {model_name}; choose 6n + 4 with n >= 1 "
                            "(10, 16, 22, 28, 34, ...).")
  if isinstance(widen_factor, bool) or not isinstance(widen_factor, int) or widen_factor < 1:
    raise errors.UserError(
        f"{width_name} {widen_factor!r} invalid for {model_name}; choose a positive integer.")


def _conv(features: int, size: int, strides: int, dtype, name: str) -> nn.Conv:
  return conv.conv2d(features, size, strides, kernel_init=_conv_init, dtype=dtype, name=name)


def _cas(num_classes: int, suppress: bool, dtype, name: str) -> cas_lib.CAS:
  return cas_lib.CAS(num_classes, suppress=suppress, bias_init=_zeros, dtype=dtype, name=name)


# bn-act-conv-bn-act-conv + shortcut (a 1x1 projection of the bn1-act output when the width
# changes); with CAS, the bn1-act output is masked where it enters the residual branch.
WideBasicBlock = functools.partial(preact_resnet.PreActBlock, shortcut_from_activation=True,
                                   cas_on_input=True, kernel_init=_conv_init,
                                   cas_bias_init=_zeros)


class WideResNet(nn.Module):
  """Pre-activation WideResNet; `__call__` returns (logits, cas_logits tuple)."""
  depth: int = 34
  widen_factor: int = 10
  num_classes: int = 10
  cas_stages: Optional[tuple] = None
  cas_suppress: bool = True
  dtype: cas_lib.Dtype = jnp.float32
  activation: str = "relu"  # a key of cas_lib.ACTIVATIONS
  same_padding: bool = False  # DeepMind's (0, 1) padding of the strided 3x3 convs
  mean_std: Optional[Tuple[Tuple[float, ...], Tuple[float, ...]]] = None  # input standardisation

  @nn.compact
  def __call__(self, x: Array, labels: Optional[Array] = None, train: bool = False,
               bn_train: Optional[bool] = None) -> Tuple[Array, Tuple[Array, ...]]:
    check_depth_and_width(self.depth, self.widen_factor)
    official = check_cas_stages(self.cas_stages) is None
    bn_train = train if bn_train is None else bn_train
    blocks_per_group = (self.depth - 4) // 6
    widths = (16 * self.widen_factor, 32 * self.widen_factor, 64 * self.widen_factor)
    y = _conv(16, 3, 1, self.dtype, "conv1")(cas_lib.standardize(x, self.mean_std))
    all_cas_logits = ()
    for group, (features, strides) in enumerate(zip(widths, (1, 2, 2)), start=1):
      for index in range(blocks_per_group):
        with_cas = official and group == 3 and index == blocks_per_group - 1
        block = WideBasicBlock(features, strides if index == 0 else 1, self.num_classes,
                               with_cas=with_cas, cas_suppress=self.cas_suppress,
                               dtype=self.dtype, activation=self.activation,
                               same_padding=self.same_padding, name=f"block{group}_{index}")
        y, cas_logits = block(y, labels, train, bn_train)
        all_cas_logits += cas_logits
    y = cas_lib.ACTIVATIONS[self.activation](
        cas_lib.BatchNorm(not bn_train, dtype=self.dtype, name="bn1")(y))
    if official:
      y, cas_logits = _cas(self.num_classes, self.cas_suppress, self.dtype, "extra_cas")(
          y, labels, train)
      all_cas_logits += (cas_logits,)
    y = jnp.mean(y, axis=(1, 2))
    self.sow("intermediates", "features", y)  # the classifier's input (cas_jax.analysis.channels)
    return cas_lib.classify(y, all_cas_logits, self.num_classes, self.dtype, _zeros, "fc")
