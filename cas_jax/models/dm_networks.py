"""DeepMind's WideResNet and PreActResNet (Gowal et al. 2020; Rebuffi et al. 2021) as RobustBench
ships them (model_zoo/architectures/dm_wide_resnet.py: DMWideResNet, DMPreActResNet).

    model = DMWideResNet(depth=28, widen_factor=10, num_classes=10)   # Swish, CIFAR-10 mean/std
    model = models.create("dm_wide_resnet", depth=70, width=16)        # the same, by name

Both are our WideResNet (models/wrn.py) and PreActResNet (models/preact_resnet.py) with
DeepMind's choices: the input standardised by the dataset's mean and std inside the network,
the strided 3x3 convs padded (0, 1) (TensorFlow's SAME; torch pads (1, 1)), Swish (SiLU)
wherever the others have ReLU (every RobustBench entry of these classes uses Swish), and for
the PreActResNet a strided 3x3 projection shortcut of the raw block input and a final bn-Swish
before the pool. No CAS by default; `cas_stages` places it as in the parent module.
"""
import functools

from cas_jax import errors
from cas_jax.models import preact_resnet
from cas_jax.models import wrn

# RobustBench's constants (dm_wide_resnet.py), used by every one of its DeepMind entries.
NORMALIZATIONS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "none": None,
}
ACTIVATION_NAMES = ("relu", "swish")
PREACT_STAGES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}

DMWideResNet = functools.partial(wrn.WideResNet, depth=28, widen_factor=10, cas_stages=(),
                                 activation="swish", same_padding=True,
                                 mean_std=NORMALIZATIONS["cifar10"])


def DMPreActResNet(depth: int = 18, **fields) -> preact_resnet.PreActResNet:  # pylint: disable=invalid-name
  """DeepMind's pre-activation ResNet-18 or -34 (`fields` override the module's defaults)."""
  check_preact_depth(depth)
  defaults = dict(activation="swish", mean_std=NORMALIZATIONS["cifar10"], shortcut_kernel=3,
                  same_padding=True, final_norm=True)
  return preact_resnet.PreActResNet(stage_sizes=PREACT_STAGES[depth], **{**defaults, **fields})


def check_preact_depth(depth, model_name: str = "dm_preact_resnet") -> None:
  """UserError unless depth is 18 or 34."""
  if isinstance(depth, bool) or depth not in PREACT_STAGES:
    raise errors.UserError(f"depth={depth!r} invalid for {model_name}; choose 18 or 34.")


def check_activation(activation, model_name: str) -> str:
  """`activation` if it is 'relu' or 'swish'; UserError otherwise."""
  if activation not in ACTIVATION_NAMES:
    raise errors.UserError(f"activation={activation!r} invalid for {model_name}; choose 'swish' "
                           "(every RobustBench DeepMind entry; SiLU is the same) or 'relu'.")
  return activation


def mean_std(normalization, num_classes: int, model_name: str):
  """The (mean, std) of `normalization`: a name (None: CIFAR-100's for 100 classes, else
  CIFAR-10's) or the pair ((3 means), (3 stds)) itself."""
  if normalization is None:
    normalization = "cifar100" if num_classes == 100 else "cifar10"
  if isinstance(normalization, str) and normalization in NORMALIZATIONS:
    return NORMALIZATIONS[normalization]
  try:
    mean, std = (tuple(float(v) for v in values) for values in normalization)
  except (TypeError, ValueError):
    mean = std = ()
  if isinstance(normalization, str) or len(mean) != 3 or len(std) != 3 or min(std) <= 0:
    raise errors.UserError(f"normalization={normalization!r} invalid for {model_name}; choose "
                           f"{', '.join(map(repr, NORMALIZATIONS))} or ((3 means), (3 stds > 0)).")
  return mean, std
