"""CIFAR ResNet-18/34 (BasicBlocks) and ResNet-50 (Bottlenecks), CAS after chosen stages' blocks.

    model = ResNet18(num_classes=10, cas_stages=(4,))   # the paper's placement, S = 2
    variables = model.init(key, x, train=False)
    logits, cas_logits = model.apply(variables, x, train=False)

Layout of the official PyTorch code: 3x3 stem (stride 1, no max-pool), stages of widths
(w, 2w, 4w, 8w) (ResNet-50: bottleneck blocks 1x1-3x3-1x1, stride on the 3x3, outputs 4x those
widths; kuangliu/pytorch-cifar's layout), global mean pool, linear. A CAS module follows the
final ReLU of every block of each stage in `cas_stages` (params `layer{stage}_{block}/cas/fc`).
Inits are torch's defaults.
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
  # torch's padding=1, (1, 1) also at stride 2 (flax "SAME" would pad (0, 1)).
  return conv.conv2d(features, 3, strides, kernel_init=cas_lib.torch_kernel_init, dtype=dtype,
                     name=name)


def _conv1x1(features: int, dtype, name: str, strides: int = 1) -> nn.Conv:
  return conv.conv2d(features, 1, strides, kernel_init=cas_lib.torch_kernel_init, dtype=dtype,
                     name=name)


class BlockBase(nn.Module):
  """What every residual block shares (ours and the pre-activation ones): its fields, its
  BatchNorm and its CAS module."""
  features: int
  strides: int
  num_classes: int
  with_cas: bool
  cas_suppress: bool = True
  dtype: cas_lib.Dtype = jnp.float32
  cas_bias_init: Optional[cas_lib.Initializer] = None  # None: torch's default

  def norm(self, bn_train: bool) -> Callable[..., nn.Module]:
    """BatchNorm with batch statistics when bn_train, running averages otherwise."""
    return functools.partial(cas_lib.BatchNorm, use_running_average=not bn_train, dtype=self.dtype)

  def cas(self, y: Array, labels: Optional[Array], train: bool) -> Tuple[Array, Tuple[Array, ...]]:
    """y through the block's CAS module and its CAS logits (y and none without one)."""
    if not self.with_cas:
      return y, ()
    y, cas_logits = cas_lib.CAS(self.num_classes, suppress=self.cas_suppress,
                                bias_init=self.cas_bias_init, dtype=self.dtype,
                                name="cas")(y, labels, train)
    return y, (cas_logits,)


class _Block(BlockBase):
  """The ResNet blocks: an activation module factory, a 1x1 projection shortcut, CAS after the
  final activation."""
  activation: Callable[[], nn.Module] = baselines.Activation

  def shortcut(self, x: Array, features: int, norm) -> Array:
    """x itself, or a 1x1 strided projection + BN when the block changes shape."""
    if self.strides == 1 and x.shape[-1] == features:
      return x
    y = _conv1x1(features, self.dtype, "shortcut_conv", self.strides)(x)
    return norm(name="shortcut_bn")(y)


class BasicBlock(_Block):
  """conv-BN-ReLU-conv-BN + shortcut, ReLU; then, if `with_cas`, a CAS module."""

  @nn.compact
  def __call__(self, x: Array, labels: Optional[Array], train: bool,
               bn_train: bool) -> Tuple[Array, Tuple[Array, ...]]:
    norm = self.norm(bn_train)
    y = norm(name="bn1")(_conv3x3(self.features, self.strides, self.dtype, "conv1")(x))
    y = self.activation()(y)
    y = norm(name="bn2")(_conv3x3(self.features, 1, self.dtype, "conv2")(y))
    return self.cas(self.activation()(y + self.shortcut(x, self.features, norm)), labels, train)


class Bottleneck(_Block):
  """1x1-BN-ReLU, 3x3 (strided)-BN-ReLU, 1x1 (4x features)-BN + shortcut, ReLU; then CAS."""
  expansion = 4

  @nn.compact
  def __call__(self, x: Array, labels: Optional[Array], train: bool,
               bn_train: bool) -> Tuple[Array, Tuple[Array, ...]]:
    norm = self.norm(bn_train)
    y = self.activation()(norm(name="bn1")(_conv1x1(self.features, self.dtype, "conv1")(x)))
    y = self.activation()(norm(name="bn2")(
        _conv3x3(self.features, self.strides, self.dtype, "conv2")(y)))
    out = self.features * self.expansion
    y = norm(name="bn3")(_conv1x1(out, self.dtype, "conv3")(y))
    return self.cas(self.activation()(y + self.shortcut(x, out, norm)), labels, train)


class ResNet(nn.Module):
  """CIFAR ResNet (BasicBlocks or Bottlenecks); `__call__` returns (logits, cas_logits tuple)."""
  stage_sizes: Sequence[int]
  block: Callable[..., nn.Module] = BasicBlock
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
        block = self.block(self.width * 2**(stage - 1), strides=strides,
                           num_classes=self.num_classes, with_cas=stage in cas_stages,
                           cas_suppress=self.cas_suppress, dtype=self.dtype,
                           activation=activation, name=f"layer{stage}_{index}")
        y, cas_logits = block(y, labels, train, bn_train)
        all_cas_logits += cas_logits
      if self.baseline == "pcl" and stage == 3:
        baselines.PrototypeBranch(self.num_classes, self.pcl_dim, self.dtype, name="pcl3")(y)
    y = jnp.mean(y, axis=(1, 2))
    self.sow("intermediates", "features", y)  # the classifier's input (cas_jax.analysis.channels)
    if self.baseline == "pcl":
      baselines.PrototypeBranch(self.num_classes, 0, self.dtype, name="pcl4")(y)
    return cas_lib.classify(y, all_cas_logits, self.num_classes, self.dtype,
                            cas_lib.torch_bias_init(y.shape[-1]), "linear")


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2))
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3))
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block=Bottleneck)
