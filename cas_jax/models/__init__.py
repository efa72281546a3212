"""Flax CAS networks (CIFAR ResNet-18/34/50, WideResNet, VGG16-BN) and RobustBench's CIFAR
families (WideResNet, PreActResNet, DeepMind's WideResNet and PreActResNet), built by name.

    from cas_jax import models
    model = models.create("resnet18", num_classes=10)           # CAS after both stage-4 blocks
    variables = model.init(jax.random.key(0), x, train=False)   # {'params', 'batch_stats'}
    logits, cas_logits = model.apply(variables, x, train=False)            # eval: argmax masks
    (logits, cas_logits), updates = model.apply(
        variables, x, labels=y, train=True, mutable=["batch_stats"])       # train: label masks
    # Adversaries with batch statistics but predicted-class masks:
    (logits, cas_logits), _ = model.apply(
        variables, x, train=False, bn_train=True, mutable=["batch_stats"])

Options (all keyword): `cas_stages` (ResNet: any subset of (1, 2, 3, 4), default (4,); WRN/VGG:
None = the official placement, () = none), `cas_suppress` (False: keep the CAS heads but do not
mask), `dtype` (computation dtype, e.g. jnp.bfloat16; params stay float32), `width` (ResNet
first-stage width / VGG first conv width, default 64), `depth` and `widen_factor` ("wrn" only,
default 34 and 10). `cas_logits` is a tuple with one (N, C) array per CAS module.
ResNets also take the Table 1 baselines (models/baselines.py): `baseline` ("none", "kwta",
"sap", "pcl"), `kwta_ratio` (0.2), `sap_ratio` (1.0), `sap_deterministic`, `pcl_dim` (256).

RobustBench's CIFAR architectures (robustbench.model_zoo.architectures; no CAS unless
`cas_stages` asks for it; their PyTorch checkpoints load with `models.interop`):
  "wide_resnet"       WideResNet (TRADES): `depth` (28), `widen_factor` (10); the module of
                      "wrn" with cas_stages=() by default (None: the CAS paper's placement)
  "preact_resnet18"   PreActResNet18 / PreActResNet(PreActBlock, [2, 2, 2, 2]); "preact_resnet34"
                      the [3, 4, 6, 3] one: `width` (64), `bn_before_fc`, `out_shortcut` (False;
                      True with PreActBlockV2), `cas_stages` (a subset of (1, 2, 3, 4))
  "dm_wide_resnet"    DMWideResNet: `depth` (28), `width` (10), `activation` ("swish", as every
                      RobustBench entry, or "relu"), `cas_stages` as "wide_resnet"
  "dm_preact_resnet"  DMPreActResNet: `depth` (18 | 34), `activation`, `width` (64; RobustBench's
                      class has only 64), `cas_stages` as "preact_resnet18"
  "resnet18" / "resnet34" / "resnet50" with cas_stages=()   its ResNet18 / 34 / 50
Those four families take `normalization` ("cifar10", "cifar100", "none" or ((3 means),
(3 stds))): the per-channel standardisation inside the network; default "none", and for the
two DeepMind ones the dataset's (CIFAR-100's for num_classes=100, else CIFAR-10's) as
RobustBench builds them.

From a config (config.model: name, width, cas_stages, cas_suppress, dtype):
    model = models.from_config(config, num_classes=10)

Every network sows the input of its final classifier (after any CAS suppression):
    _, state = model.apply(variables, x, train=False, mutable=["intermediates"])
    features = state["intermediates"]["features"][0]   # (N, C); sow keeps a tuple of one

The folder owns the networks and their weights: the CAS module (cas.py), the families, the
baselines, PyTorch state-dict import and export (`models.interop`) and restoring a trained
workdir's network (`models.loading`). It may import only the shared top-level modules
(errors, checkpointing, provenance); every other folder may import it.
"""
import operator
import re
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from cas_jax import errors
from cas_jax.models import baselines, cas, dm_networks, preact_resnet, resnet, vgg, wrn
from cas_jax.models.cas import CAS
from cas_jax.models.dm_networks import DMPreActResNet, DMWideResNet
from cas_jax.models.preact_resnet import PreActResNet, PreActResNet18, PreActResNet34
from cas_jax.models.resnet import ResNet, ResNet18, ResNet34, ResNet50
from cas_jax.models.vgg import VGG16
from cas_jax.models.wrn import WideResNet

NAMES = ("resnet18", "resnet34", "resnet50", "wrn34_10", "wrn", "vgg16", "wide_resnet",
         "preact_resnet18", "preact_resnet34", "dm_wide_resnet", "dm_preact_resnet")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

_COMMON_OPTIONS = ("cas_stages", "cas_suppress", "dtype")
_BASELINE_OPTIONS = ("baseline", "kwta_ratio", "sap_ratio", "sap_deterministic", "pcl_dim")
_PREACT_OPTIONS = ("width", "bn_before_fc", "out_shortcut", "normalization")
_OPTIONS = {
    "resnet18": ("width",) + _COMMON_OPTIONS + _BASELINE_OPTIONS,
    "resnet34": ("width",) + _COMMON_OPTIONS + _BASELINE_OPTIONS,
    "resnet50": ("width",) + _COMMON_OPTIONS + _BASELINE_OPTIONS,
    "wrn34_10": _COMMON_OPTIONS,
    "wrn": ("depth", "widen_factor") + _COMMON_OPTIONS,
    "vgg16": ("width",) + _COMMON_OPTIONS,
    "wide_resnet": ("depth", "widen_factor", "normalization") + _COMMON_OPTIONS,
    "preact_resnet18": _PREACT_OPTIONS + _COMMON_OPTIONS,
    "preact_resnet34": _PREACT_OPTIONS + _COMMON_OPTIONS,
    "dm_wide_resnet": ("depth", "width", "activation", "normalization") + _COMMON_OPTIONS,
    "dm_preact_resnet": ("depth", "width", "activation", "normalization") + _COMMON_OPTIONS,
}
# Each family's cas_stages check: ResNets take stage subsets, the WRNs and VGG None or ().
_CAS_STAGES_CHECKS = {"resnet": resnet.check_cas_stages, "preact_resnet": resnet.check_cas_stages,
                      "dm_preact_resnet": resnet.check_cas_stages, "wrn": wrn.check_cas_stages,
                      "wide_resnet": wrn.check_cas_stages, "dm_wide_resnet": wrn.check_cas_stages,
                      "vgg": vgg.check_cas_stages}


def _family(name: str) -> str:
  """The family of a model name: resnet18 -> resnet, wrn34_10 -> wrn, preact_resnet18 -> ..."""
  return re.sub(r"[\d_]+$", "", name)


def accepts(name: str, option: str) -> bool:
  """Whether create(name, ...) takes the keyword `option` (e.g. wrn34_10 takes no width)."""
  return option in _OPTIONS.get(name, ())


def _positive_int(value: Any, what: str) -> int:
  """`value` as an int; ValueError unless it is a positive integer."""
  try:
    if isinstance(value, bool):
      raise TypeError
    number = operator.index(value)
  except TypeError:
    number = 0
  if number < 1:
    raise errors.UserError(f"{what}={value!r} invalid; choose a positive integer.")
  return number


def _floating_dtype(value: Any) -> Any:
  """`value` as a floating jnp dtype; ValueError otherwise."""
  try:
    dtype = jnp.dtype(value)
  except TypeError:
    dtype = None
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise errors.UserError(
        f"dtype={value!r} invalid; choose a floating dtype such as jnp.float32 or "
        "jnp.bfloat16.")
  return dtype


def _checked_options(name: str, options: Dict[str, Any]) -> Dict[str, Any]:
  """Validated, normalised options for model `name`."""
  unknown = sorted(set(options) - set(_OPTIONS[name]))
  if options.get("baseline", "none") != "none" and not name.startswith("resnet"):
    raise errors.UserError(f"baseline={options['baseline']!r}: the Table 1 baselines are built for "
                            "the ResNets only; use one of them or baseline='none'")
  if unknown:
    hint = " (use 'wrn' to choose depth/widen_factor)" if name == "wrn34_10" else ""
    raise errors.UserError(f"unknown option(s) {', '.join(unknown)} for {name}; valid: "
                            f"{', '.join(_OPTIONS[name])}{hint}")
  checked = dict(options)
  for key in ("width", "depth", "widen_factor"):
    if key in checked:
      checked[key] = _positive_int(checked[key], key)
  if "dtype" in checked:
    checked["dtype"] = _floating_dtype(checked["dtype"])
  _check_baseline(checked)
  for key in ("cas_suppress", "bn_before_fc", "out_shortcut"):
    if key in checked and not isinstance(checked[key], bool):
      raise errors.UserError(f"{key}={checked[key]!r} invalid; choose True or False.")
  if "cas_stages" in checked:
    checked["cas_stages"] = _CAS_STAGES_CHECKS[_family(name)](checked["cas_stages"], name)
  if "activation" in checked:
    checked["activation"] = dm_networks.check_activation(checked["activation"], name)
  if name in ("wrn", "wide_resnet"):
    wrn.check_depth_and_width(checked.get("depth", 34 if name == "wrn" else 28),
                              checked.get("widen_factor", 10), name)
  if name == "dm_wide_resnet":
    wrn.check_depth_and_width(checked.get("depth", 28), checked.get("width", 10), name, "width")
  if name == "dm_preact_resnet":
    dm_networks.check_preact_depth(checked.get("depth", 18))
  return checked


def _check_baseline(options: Dict[str, Any]) -> None:
  """ValueError naming the fix for a bad baseline option (kept in place otherwise)."""
  baseline = options.get("baseline", "none")
  if baseline not in baselines.BASELINES:
    raise errors.UserError(f"baseline={baseline!r}; valid: {', '.join(baselines.BASELINES)}")
  if not 0.0 < options.get("kwta_ratio", 0.2) <= 1.0:
    raise errors.UserError(f"kwta_ratio={options['kwta_ratio']!r} must lie in (0, 1], e.g. 0.2")
  if not options.get("sap_ratio", 1.0) > 0.0:
    raise errors.UserError(f"sap_ratio={options['sap_ratio']!r} must be > 0, e.g. 1.0")
  if "pcl_dim" in options:
    options["pcl_dim"] = _positive_int(options["pcl_dim"], "pcl_dim")


def create(name: str, num_classes: int = 10, **options) -> nn.Module:
  """The network `name` (one of NAMES) with `num_classes` outputs and CAS heads."""
  if name not in NAMES:
    raise errors.UserError(f"unknown model {name!r}; valid: {', '.join(NAMES)}")
  num_classes = _positive_int(num_classes, "num_classes")
  options = _checked_options(name, options)
  if name == "resnet18":
    return ResNet18(num_classes=num_classes, **options)
  if name == "resnet34":
    return ResNet34(num_classes=num_classes, **options)
  if name == "resnet50":
    return ResNet50(num_classes=num_classes, **options)
  if name == "wrn34_10":
    return WideResNet(depth=34, widen_factor=10, num_classes=num_classes, **options)
  if name == "wrn":
    return WideResNet(num_classes=num_classes, **options)
  if name == "vgg16":
    return VGG16(num_classes=num_classes, **options)
  return _robustbench_family(name, num_classes, options)


def _robustbench_family(name: str, num_classes: int, options: Dict[str, Any]) -> nn.Module:
  """One of RobustBench's architectures (options checked): no CAS unless asked for."""
  options = dict(options)
  normalization = options.pop("normalization", None if name.startswith("dm_") else "none")
  options["mean_std"] = dm_networks.mean_std(normalization, num_classes, name)
  options.setdefault("cas_stages", ())
  if name == "wide_resnet":
    return WideResNet(**{"depth": 28, "widen_factor": 10, **options}, num_classes=num_classes)
  if name.startswith("preact_resnet"):
    options["final_norm"] = options.pop("bn_before_fc", False)
    options["shortcut_from_activation"] = options.pop("out_shortcut", False)
    network = PreActResNet18 if name == "preact_resnet18" else PreActResNet34
    return network(num_classes=num_classes, **options)
  if name == "dm_wide_resnet":
    if "width" in options:
      options["widen_factor"] = options.pop("width")
    return DMWideResNet(num_classes=num_classes, **options)
  return DMPreActResNet(num_classes=num_classes, **options)


def options_from_config(model_config) -> Dict[str, Any]:
  """create() keyword arguments from config.model (width, cas_stages, cas_suppress, dtype)."""
  options = {"cas_suppress": model_config.cas_suppress, "dtype": DTYPES[model_config.dtype]}
  if model_config.width:
    options["width"] = model_config.width
  stages = str(model_config.cas_stages).strip()
  if stages == "none":
    options["cas_stages"] = ()
  elif stages != "default":
    try:
      options["cas_stages"] = tuple(int(s) for s in stages.strip("()").split(",") if s.strip())
    except ValueError:
      raise errors.UserError(f"model.cas_stages={stages!r}; use 'default', 'none' or stage numbers "
                              "such as '3,4'") from None
  return options


def baseline_options(config) -> Dict[str, Any]:
  """create() keyword arguments of config.baseline (Table 1: kwta, sap, pcl); {} for none."""
  baseline = config.get("baseline", "none")
  options = {"kwta": {"kwta_ratio": config.model.get("kwta_ratio", 0.2)},
             "sap": {"sap_ratio": config.model.get("sap_ratio", 1.0)},
             "pcl": {"pcl_dim": config.model.get("pcl_dim", 256)}}.get(baseline)
  return {} if options is None else {"baseline": baseline, **options}


def from_config(config, num_classes: int) -> nn.Module:
  """The network of config.model (name, width, CAS placement, dtype) and config.baseline."""
  return create(config.model.name, num_classes=num_classes, **options_from_config(config.model),
                **baseline_options(config))


def variable_shapes(model: nn.Module, image_shape: Tuple[int, ...]) -> Dict[str, Any]:
  """{'params', 'batch_stats'} of `model` as jax.ShapeDtypeStructs (nothing is computed)."""
  images = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)


__all__ = ["NAMES", "DTYPES", "accepts", "baselines", "baseline_options", "create", "from_config",
           "options_from_config", "variable_shapes",
           "CAS", "ResNet", "ResNet18", "ResNet34", "ResNet50", "WideResNet", "VGG16",
           "PreActResNet", "PreActResNet18", "PreActResNet34", "DMWideResNet", "DMPreActResNet",
           "cas", "dm_networks", "preact_resnet", "resnet", "vgg", "wrn"]
