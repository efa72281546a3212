"""Pre-activation ResNet-18/34 (RobustBench's PreActResNet and DeepMind's DMPreActResNet).

    model = PreActResNet18(num_classes=10)                 # no CAS by default
    variables = model.init(key, x, train=False)
    logits, cas_logits = model.apply(variables, x, train=False)

RobustBench's layout (model_zoo/architectures/resnet.py, PreActBlock): a 3x3 stem (stride 1),
stages of widths (w, 2w, 4w, 8w) of blocks bn-ReLU-conv3x3-bn-ReLU-conv3x3 plus the shortcut
(the input itself, or a strided 1x1 conv of the raw input when the shape changes), no BN-ReLU
before the global mean pool unless `final_norm` (its bn_before_fc), then a linear layer.
`shortcut_from_activation` takes the projection from the bn1-ReLU output instead (its
out_shortcut / PreActBlockV2). DeepMind's network (dm_networks.py) is the same with
`shortcut_kernel=3` (a strided 3x3 projection of the raw input), `same_padding` (strided 3x3
convs pad (0, 1)), `final_norm`, Swish and the CIFAR standardisation first.

CAS: a module follows every block of each stage in `cas_stages` (any subset of (1, 2, 3, 4),
default none), on the block's output, the residual sum (params `layer{stage}_{block}/cas/fc`).
The WideResNets (models/wrn.py) are built of the same block.
Inits are torch's defaults.
"""
import functools
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from cas_jax.models import cas as cas_lib
from cas_jax.models import conv
from cas_jax.models import resnet

Array = jax.Array


class PreActBlock(resnet.BlockBase):
  """bn-act-conv-bn-act-conv + shortcut, with a CAS module on the sum if `with_cas`.

  The WideResNet's block (models/wrn.py) is this one with the projection taken from the
  bn1-act output (`shortcut_from_activation`) and, as the CAS authors place it, the CAS mask
  on that output where it enters the residual branch (`cas_on_input`; the shortcut keeps it
  unmasked), He-normal convs and zero-bias CAS heads.
  """
  activation: str = "relu"
  same_padding: bool = False
  shortcut_kernel: int = 1
  shortcut_from_activation: bool = False
  cas_on_input: bool = False
  kernel_init: cas_lib.Initializer = cas_lib.torch_kernel_init

  def _conv(self, features: int, size: int, strides: int, name: str) -> nn.Conv:
    return conv.conv2d(features, size, strides, kernel_init=self.kernel_init, dtype=self.dtype,
                       name=name, same=self.same_padding)

  @nn.compact
  def __call__(self, x: Array, labels: Optional[Array], train: bool,
               bn_train: bool) -> Tuple[Array, Tuple[Array, ...]]:
    norm = self.norm(bn_train)
    activation = cas_lib.ACTIVATIONS[self.activation]
    activated = activation(norm(name="bn1")(x))
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.features:
      shortcut = self._conv(self.features, self.shortcut_kernel, self.strides, "conv_shortcut")(
          activated if self.shortcut_from_activation else x)
    branch, cas_logits = activated, ()
    if self.with_cas and self.cas_on_input:
      branch, cas_logits = self.cas(activated, labels, train)
    y = self._conv(self.features, 3, self.strides, "conv1")(branch)
    y = activation(norm(name="bn2")(y))
    y = self._conv(self.features, 3, 1, "conv2")(y) + shortcut
    if self.with_cas and not self.cas_on_input:
      y, cas_logits = self.cas(y, labels, train)
    return y, cas_logits


class PreActResNet(nn.Module):
  """Pre-activation CIFAR ResNet; `__call__` returns (logits, cas_logits tuple)."""
  stage_sizes: Sequence[int]
  num_classes: int = 10
  width: int = 64
  cas_stages: Sequence[int] = ()
  cas_suppress: bool = True
  dtype: cas_lib.Dtype = jnp.float32
  activation: str = "relu"  # a key of cas_lib.ACTIVATIONS
  mean_std: Optional[Tuple[Tuple[float, ...], Tuple[float, ...]]] = None  # input standardisation
  shortcut_kernel: int = 1
  shortcut_from_activation: bool = False
  same_padding: bool = False
  final_norm: bool = False  # bn-act before the pool

  @nn.compact
  def __call__(self, x: Array, labels: Optional[Array] = None, train: bool = False,
               bn_train: Optional[bool] = None) -> Tuple[Array, Tuple[Array, ...]]:
    cas_stages = resnet.check_cas_stages(self.cas_stages, "preact_resnet")
    bn_train = train if bn_train is None else bn_train
    y = conv.conv2d(self.width, 3, 1, kernel_init=cas_lib.torch_kernel_init, dtype=self.dtype,
                    name="conv1")(cas_lib.standardize(x, self.mean_std))
    all_cas_logits = ()
    for stage, num_blocks in enumerate(self.stage_sizes, start=1):
      for index in range(num_blocks):
        block = PreActBlock(
            self.width * 2**(stage - 1), strides=2 if stage > 1 and index == 0 else 1,
            num_classes=self.num_classes, with_cas=stage in cas_stages,
            cas_suppress=self.cas_suppress, dtype=self.dtype, activation=self.activation,
            shortcut_kernel=self.shortcut_kernel,
            shortcut_from_activation=self.shortcut_from_activation,
            same_padding=self.same_padding, name=f"layer{stage}_{index}")
        y, cas_logits = block(y, labels, train, bn_train)
        all_cas_logits += cas_logits
    if self.final_norm:
      y = cas_lib.ACTIVATIONS[self.activation](
          cas_lib.BatchNorm(not bn_train, dtype=self.dtype, name="bn")(y))
    y = jnp.mean(y, axis=(1, 2))
    self.sow("intermediates", "features", y)  # the classifier's input (cas_jax.analysis.channels)
    return cas_lib.classify(y, all_cas_logits, self.num_classes, self.dtype,
                            cas_lib.torch_bias_init(y.shape[-1]), "linear")


PreActResNet18 = functools.partial(PreActResNet, stage_sizes=(2, 2, 2, 2))
PreActResNet34 = functools.partial(PreActResNet, stage_sizes=(3, 4, 6, 3))
