"""CIFAR ResNet-18/34 (BasicBlocks) with CAS modules after the blocks of chosen stages.

    model = ResNet18(num_classes=10, cas_stages=(4,))   # the paper's placement, S = 2
    variables = model.init(key, x, train=False)
    logits, cas_logits = model.apply(variables, x, train=False)

Layout of the official PyTorch code: 3x3 stem (stride 1, no max-pool), stages of widths
(w, 2w, 4w, 8w), global mean pool, linear. A CAS module follows the final ReLU of every block of
each stage in `cas_stages` (params `layer{stage}_{block}/cas/fc`). Inits are torch's defaults.
"""
import functools
from typing import Callable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from cas_jax import errors
from cas_jax.models import baselines
from cas_jax.models import cas as cas_lib
from cas_jax.models import conv

Array = jax.Array
STAGES = (1, 2, 3, 4)


def check_cas_stages(cas_stages, model_name: str = "resnet") -> Tuple[int, ...]:
  """The sorted tuple of stages carrying CAS; ValueError unless a subset of (1, 2, 3, 4)."""
  try:
    stages = tuple(cas_stages)
  except TypeError:
    stages = None
  if (stages is None or len(set(stages)) != len(stages)
      or any(isinstance(s, bool) or s not in STAGES for s in stages)):
    raise errors.UserError(
        f"cas_stages {cas_stages!r} invalid for {model_name}; choose any subset of "
        f"{STAGES}, e.g. (4,) (the paper's placement) or () for a plain network.")
  return tuple(sorted(int(s) for s in stages))


def _conv3x3(features: int, strides: int, dtype, name: str) -> nn.Conv:
  # Explicit (1, 1) padding: flax "SAME" pads (0, 1) at stride 2, torch's padding=1 pads (1, 1).
  return nn.Conv(features, (3, 3), (strides, strides), padding=((1, 1), (1, 1)), use_bias=False,
                 kernel_init=cas_lib.torch_kernel_init, dtype=dtype, name=name,
                 conv_general_dilated=conv.conv_general_dilated)


class BasicBlock(nn.Module):
  """conv-BN-ReLU-conv-BN + shortcut, ReLU; then, if `with_cas`, a CAS module."""
  features: int
  strides: int
  num_classes: int
  with_cas: bool
  cas_suppress: bool = True
  dtype: cas_lib.Dtype = jnp.float32
  activation: Callable[[], nn.Module] = baselines.Activation

  @nn.compact
  def __call__(self, x: Array, labels: Optional[Array], train: bool,
               bn_train: bool) -> Tuple[Array, Tuple[Array, ...]]:
    norm = functools.partial(cas_lib.BatchNorm, use_running_average=not bn_train, dtype=self.dtype)
    y = norm(name="bn1")(_conv3x3(self.features, self.strides, self.dtype, "conv1")(x))
    y = self.activation()(y)
    y = norm(name="bn2")(_conv3x3(self.features, 1, self.dtype, "conv2")(y))
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.features:
      shortcut = nn.Conv(self.features, (1, 1), (self.strides, self.strides), use_bias=False,
                         kernel_init=cas_lib.torch_kernel_init, dtype=self.dtype,
                         conv_general_dilated=conv.conv_general_dilated,
                         name="shortcut_conv")(x)
      shortcut = norm(name="shortcut_bn")(shortcut)
    y = self.activation()(y + shortcut)
    if not self.with_cas:
      return y, ()
    y, cas_logits = cas_lib.CAS(self.num_classes, suppress=self.cas_suppress, dtype=self.dtype,
                                name="cas")(y, labels, train)
    return y, (cas_logits,)


class ResNet(nn.Module):
  """CIFAR ResNet with BasicBlocks; `__call__` returns (logits, cas_logits tuple)."""
  stage_sizes: Sequence[int]
  num_classes: int = 10
  width: int = 64
  cas_stages: Sequence[int] = (4,)
  cas_suppress: bool = True
  dtype: cas_lib.Dtype = jnp.float32
  # Table 1 baselines (models/baselines.py): "none" | "kwta" | "sap" | "pcl".
  baseline: str = "none"
  kwta_ratio: float = 0.2
  sap_ratio: float = 1.0
  sap_deterministic: bool = False
  pcl_dim: int = 256

  @nn.compact
  def __call__(self, x: Array, labels: Optional[Array] = None, train: bool = False,
               bn_train: Optional[bool] = None) -> Tuple[Array, Tuple[Array, ...]]:
    cas_stages = check_cas_stages(self.cas_stages)
    bn_train = train if bn_train is None else bn_train
    kind = baselines.activation_kind(self.baseline)
    activation = functools.partial(
        baselines.Activation, kind, self.kwta_ratio if kind == "kwta" else self.sap_ratio,
        self.sap_deterministic)
    y = _conv3x3(self.width, 1, self.dtype, "conv1")(x)
    y = activation()(cas_lib.BatchNorm(not bn_train, dtype=self.dtype, name="bn1")(y))
    all_cas_logits = ()
    for stage, num_blocks in enumerate(self.stage_sizes, start=1):
      for index in range(num_blocks):
        strides = 2 if stage > 1 and index == 0 else 1
        block = BasicBlock(self.width * 2**(stage - 1), strides=strides,
                           num_classes=self.num_classes, with_cas=stage in cas_stages,
                           cas_suppress=self.cas_suppress, dtype=self.dtype,
                           activation=activation, name=f"layer{stage}_{index}")
        y, cas_logits = block(y, labels, train, bn_train)
        all_cas_logits += cas_logits
      if self.baseline == "pcl" and stage == 3:
        baselines.PrototypeBranch(self.num_classes, self.pcl_dim, self.dtype, name="pcl3")(y)
    y = jnp.mean(y, axis=(1, 2))
    self.sow("intermediates", "features", y)  # the classifier's input (cas_jax.analysis)
    if self.baseline == "pcl":
      baselines.PrototypeBranch(self.num_classes, 0, self.dtype, name="pcl4")(y)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=cas_lib.torch_kernel_init,
                      bias_init=cas_lib.torch_bias_init(y.shape[-1]), name="linear")(y)
    return (logits.astype(jnp.float32),
            tuple(c.astype(jnp.float32) for c in all_cas_logits))


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2))
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3))
