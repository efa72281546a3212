"""PyTorch state-dict key layouts of our networks, and which architecture a state dict fits.

    module_fn = torch_module_fn("dm_wide_resnet", flax_module_paths)
    module_fn(("block2_0", "bn1"))   # -> "layer.1.block.0.batchnorm_0"
    describe(state_dict)             # -> "preact_resnet18 (num_classes=10, width=64)" or None

A layout is a list of (regex, replacement) rewrites applied in turn to a Flax module path
joined by "/" (without the collection and the leaf), whose "/" then become ".":
  "resnet"     the CAS authors' ResNets, kuangliu's / RobustBench's ResNet and PreActResNet
               (`layer2.0.shortcut.0`, `linear`; a CAS head is the block's `fc`)
  "wrn"        the CAS authors' and TRADES' / RobustBench's WideResNet (`block1.layer.0.bn1`,
               `convShortcut`, `fc`; CAS heads `block3.layer.4.fc` and `extra_fc`)
  "dm_wrn"     DeepMind's WideResNet (`init_conv`, `layer.0.block.0.batchnorm_0`, `conv_0`,
               `shortcut`, `batchnorm`, `logits`)
  "dm_preact"  DeepMind's PreActResNet (`conv_2d`, `layer_0.0.batchnorm_0`, `conv_2d_1`,
               `shortcut`, `batchnorm`, `logits`)
  "vgg"        the CAS authors' VGG16 (names that depend on whether a layer has CAS)
"""
import re
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np

_CAS = (r"/cas/", "/")  # a CAS head's Dense is its block's `fc`
_LAYOUTS = {
    "resnet": [(r"^layer(\d)_(\d+)", r"layer\1.\2"), (r"/(shortcut_conv|conv_shortcut)$",
                                                           "/shortcut.0"),
               (r"/shortcut_bn$", "/shortcut.1"), _CAS],
    "wrn": [(r"^extra_cas/fc$", "extra_fc"), (r"^block(\d)_(\d+)", r"block\1.layer.\2"),
            (r"/conv_shortcut$", "/convShortcut"), _CAS],
    "dm_wrn": [(r"^conv1$", "init_conv"), (r"^bn1$", "batchnorm"), (r"^fc$", "logits"),
               (r"^extra_cas/fc$", "extra_fc"),
               (r"^block(\d)_(\d+)", lambda m: f"layer.{int(m[1]) - 1}.block.{m[2]}"),
               (r"/bn1$", "/batchnorm_0"), (r"/bn2$", "/batchnorm_1"), (r"/conv1$", "/conv_0"),
               (r"/conv2$", "/conv_1"), (r"/conv_shortcut$", "/shortcut"), _CAS],
    "dm_preact": [(r"^conv1$", "conv_2d"), (r"^bn$", "batchnorm"), (r"^linear$", "logits"),
                  (r"^layer(\d)_(\d+)", lambda m: f"layer_{int(m[1]) - 1}.{m[2]}"),
                  (r"/bn1$", "/batchnorm_0"), (r"/bn2$", "/batchnorm_1"),
                  (r"/conv1$", "/conv_2d_1"), (r"/conv2$", "/conv_2d_2"),
                  (r"/conv_shortcut$", "/shortcut"), _CAS],
}
LAYOUT_OF = {"resnet18": "resnet", "resnet34": "resnet", "resnet50": "resnet", "wrn34_10": "wrn",
             "wrn": "wrn", "vgg16": "vgg", "wide_resnet": "wrn", "preact_resnet18": "resnet",
             "preact_resnet34": "resnet", "dm_wide_resnet": "dm_wrn",
             "dm_preact_resnet": "dm_preact"}
# Keys a checkpoint may hold that no network of ours reads: BN step counts, and the WRN's
# `sub_block1` (built, never called, by the CAS authors and by RobustBench's sub_block1=True).
IGNORED_SUFFIXES = ("num_batches_tracked",)
IGNORED_PREFIXES = {"wrn": ("sub_block1.",)}


def _rewrite(layout: str, path: Tuple[str, ...]) -> str:
  joined = "/".join(path)
  for pattern, replacement in _LAYOUTS[layout]:
    joined = re.sub(pattern, replacement, joined)
  return joined.replace("/", ".")


def _vgg_module(path: Tuple[str, ...], has_cas: bool) -> str:
  """Torch module name of a flax module path in models.vgg."""
  head = path[0]
  layer = re.fullmatch(r"layer(\d)_(\d+)", head)
  if layer:
    prefix = f"layer{layer[1]}.{layer[2]}"
    if has_cas:  # the official Conv_FC_Block names its parts
      return prefix + {"conv": ".conv", "bn": ".bn", "cas": ".fc"}[path[1]]
    return prefix + {"conv": ".0", "bn": ".1"}[path[1]]
  classifier = re.fullmatch(r"(layer\d)_(linear|bn)", head)
  if classifier:
    return classifier[1] + (".0" if classifier[2] == "linear" else ".1")
  return head


def torch_module_fn(name: str, flax_paths: Iterable[Tuple[str, ...]]) -> Callable:
  """path -> torch module name for the Flax module paths of models.create(name)."""
  layout = LAYOUT_OF[name]
  if layout != "vgg":
    return lambda path: _rewrite(layout, path)
  with_cas = {path[0] for path in flax_paths if "cas" in path}
  return lambda path: _vgg_module(path, path[0] in with_cas)


def is_ignored(name: str, key: str) -> bool:
  """Whether a checkpoint key of `name`'s layout carries nothing our network holds."""
  return key.endswith(IGNORED_SUFFIXES) or key.startswith(
      IGNORED_PREFIXES.get(LAYOUT_OF.get(name, ""), ()))


# ----------------------------------------------------------------------------- which one?


def _blocks(keys: Iterable[str], pattern: str) -> Tuple[int, ...]:
  """Blocks per group: how many distinct second indices `pattern` finds for each first one."""
  found: Dict[int, set] = {}
  for key in keys:
    match = re.match(pattern, key)
    if match:
      found.setdefault(int(match[1]), set()).add(int(match[2]))
  return tuple(len(found[group]) for group in sorted(found))


def _shape(state_dict: Mapping[str, Any], key: str) -> Tuple[int, ...]:
  return tuple(np.shape(state_dict[key])) if key in state_dict else (0,)


_RESNET_DEPTHS = {(2, 2, 2, 2): 18, (3, 4, 6, 3): 34}


def _resnet_guess(state_dict: Mapping[str, Any], keys: List[str]) -> Tuple[str, Dict[str, Any]]:
  """(name, options) of a ResNet or PreActResNet state dict (RobustBench's or the authors')."""
  counts = _blocks(keys, r"layer(\d)\.(\d+)\.")
  depth = _RESNET_DEPTHS.get(counts)
  options: Dict[str, Any] = {"width": _shape(state_dict, "conv1.weight")[0]}
  if depth is None:
    options["blocks"] = counts
  cas_stages = tuple(stage for stage in range(1, 5) if f"layer{stage}.0.fc.weight" in state_dict)
  if "bn1.weight" not in state_dict:  # no BN after the stem: pre-activation
    if "bn.weight" in state_dict:
      options["bn_before_fc"] = True
    if cas_stages:
      options["cas_stages"] = cas_stages
    return f"preact_resnet{depth or ''}", options
  options["cas_stages"] = cas_stages  # the CAS ResNets' default is (4,)
  if "layer1.0.conv3.weight" in state_dict:
    return "resnet50", options
  return f"resnet{depth or ''}", options


def _guess(state_dict: Mapping[str, Any]) -> Optional[Tuple[str, str, Dict[str, Any]]]:
  """(name, classifier key, options) of the architecture whose layout the keys follow."""
  keys = list(state_dict)
  if "init_conv.weight" in state_dict:
    blocks = _blocks(keys, r"layer\.(\d+)\.block\.(\d+)\.")
    width = _shape(state_dict, "layer.0.block.0.conv_0.weight")[0] // 16
    return "dm_wide_resnet", "logits", {"depth": 6 * blocks[0] + 4, "width": width}
  if "conv_2d.weight" in state_dict:
    depth = _RESNET_DEPTHS.get(_blocks(keys, r"layer_(\d)\.(\d+)\."))
    width = _shape(state_dict, "conv_2d.weight")[0]
    return "dm_preact_resnet", "logits", {"depth": depth, "width": width}
  if "block1.layer.0.bn1.weight" in state_dict:
    name = "wrn" if "extra_fc.weight" in state_dict else "wide_resnet"
    blocks = _blocks(keys, r"block(\d)\.layer\.(\d+)\.")
    widen = _shape(state_dict, "block1.layer.0.conv1.weight")[0] // 16
    return name, "fc", {"depth": 6 * blocks[0] + 4, "widen_factor": widen}
  if "layer1.0.conv1.weight" in state_dict:
    name, options = _resnet_guess(state_dict, keys)
    return name, "linear", options
  if "layer8.weight" in state_dict:
    return "vgg16", "layer8", {"width": _shape(state_dict, "layer1.0.0.weight")[0]}
  return None


def describe(state_dict: Mapping[str, Any]) -> Optional[str]:
  """'name (num_classes=..., options)' of the architecture the keys fit, or None."""
  guess = _guess(state_dict)
  if guess is None:
    return None
  name, classifier, options = guess
  options = {"num_classes": _shape(state_dict, f"{classifier}.weight")[0], **options}
  shown: List[str] = [f"{key}={value}" for key, value in options.items()]
  return f"{name} ({', '.join(shown)})"
