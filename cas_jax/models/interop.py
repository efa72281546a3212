"""PyTorch checkpoints (the CAS authors' and RobustBench's) -> Flax variables for `models.create`.

    from cas_jax import models
    from cas_jax.models import interop
    variables = interop.load_torch_checkpoint("resnet18", "model-res-last.pt")
    model = models.create("resnet18")
    logits, cas_logits = model.apply(variables, x, train=False)   # x NHWC in [0, 1]

    # A RobustBench checkpoint, with the options of its entry's constructor:
    variables = interop.load_torch_checkpoint("dm_wide_resnet", "Gowal2020Uncovering_70_16.pt",
                                              depth=70, width=16)

    # Or from a state_dict already in memory (name -> array or torch tensor):
    variables = interop.from_torch_state_dict("wrn34_10", state_dict)

    # And back, for the PyTorch network of that layout (numpy arrays; torch.tensor them):
    state_dict = interop.to_torch_state_dict("wrn34_10", variables)

Key layouts (models/torch_layouts.py): the CAS authors' released models
(github.com/bymavis/CAS_ICLR2021): ResNet-18 with CAS blocks in `layer4` (`layer4.0.fc.weight`,
`layer2.0.shortcut.0.weight`, `linear.weight`, ...), their WideResNet
(`block3.layer.4.fc.weight`, `convShortcut`, `extra_fc`) and their VGG16 (`layer5.0.conv/bn/fc`,
`layer6.0`, `layer6.1`, `layer8`); and RobustBench's classes (robustbench.model_zoo.
architectures): WideResNet ("wide_resnet"), PreActResNet ("preact_resnet18" / "34"), ResNet
("resnet18" / "34" / "50" with cas_stages=()), DMWideResNet ("dm_wide_resnet") and
DMPreActResNet ("dm_preact_resnet"). Options such as `width=8` or `depth=16, widen_factor=2`
are forwarded to `models.create`; the defaults are the full-size networks. Keys lose every
leading `module.` / `model.`; `num_batches_tracked` and the WRN's unused `sub_block1.*` are
ignored; RobustBench's input statistics `mu` / `sigma` (Wong2020Fast and the like) must agree
with the network's `normalization` (e.g. normalization="cifar10"). A state dict that does not fit raises a UserError naming the first keys that differ
and the architecture (with options) the keys look like.
"""
from typing import Any, Dict, List, Mapping, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from cas_jax import errors
from cas_jax import models
from cas_jax.models import dm_networks
from cas_jax.models import torch_layouts

_TORCH_LEAF_NAMES = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
_SHOWN = 5  # how many offending keys an error message lists
_PREFIXES = ("module.", "model.")  # DataParallel's and wrappers' (RobustBench strips both)


# Flax -> torch axes: conv kernels HWIO -> OIHW, dense kernels (in, out) -> (out, in).
_TORCH_AXES = {4: (3, 2, 0, 1), 2: (1, 0)}


def _to_torch_layout(shape: Tuple[int, ...]) -> Tuple[int, ...]:
  return tuple(shape[i] for i in _TORCH_AXES.get(len(shape), range(len(shape))))


def _to_flax_layout(array: np.ndarray) -> np.ndarray:
  axes = _TORCH_AXES.get(array.ndim)
  return array if axes is None else np.transpose(array, np.argsort(axes))


def _from_flax_layout(array: np.ndarray) -> np.ndarray:
  axes = _TORCH_AXES.get(array.ndim)
  return array if axes is None else np.transpose(array, axes)


def _as_numpy(value: Any) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor, without importing torch
    value = value.detach().cpu().numpy()
  return np.asarray(value, dtype=np.float32)


def _strip_prefixes(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
  """The state dict with every leading 'module.' and 'model.' dropped from its keys."""
  stripped = {}
  for key, value in state_dict.items():
    while key.startswith(_PREFIXES):
      key = key.split(".", 1)[1]
    stripped[key] = value
  return stripped


def _listed(keys) -> str:
  keys = list(keys)
  more = f", ... ({len(keys)} in all)" if len(keys) > _SHOWN else ""
  return ", ".join(keys[:_SHOWN]) + more


def _torch_keyed_leaves(name: str, tree) -> List[Tuple[str, Any]]:
  """(authors'-layout key, leaf) for every leaf of a {'params', 'batch_stats'} tree of `name`."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  paths = [tuple(k.key for k in keys) for keys, _ in flat]
  torch_module = torch_layouts.torch_module_fn(name, [p[1:-1] for p in paths])
  return [(f"{torch_module(path[1:-1])}.{_TORCH_LEAF_NAMES[(path[0], path[-1])]}", leaf)
          for path, (_, leaf) in zip(paths, flat)]


def _without_input_statistics(model, state_dict: Dict[str, Any]) -> Dict[str, Any]:
  """The state dict less RobustBench's input standardisation buffers (`mu`, `sigma`: Wong2020Fast
  and the like), once they agree with the network's `normalization` (UserError otherwise)."""
  if "mu" not in state_dict and "sigma" not in state_dict:
    return state_dict
  # float32 values in their shortest decimals (torch standardises in float32 too).
  found = tuple(tuple(float(np.format_float_positional(v)) for v in
                      _as_numpy(state_dict.get(k, np.ones(3))).ravel()) for k in ("mu", "sigma"))
  ours = getattr(model, "mean_std", None)
  if ours is not None and np.allclose(found, ours, rtol=0, atol=1e-6):
    return {k: v for k, v in state_dict.items() if k not in ("mu", "sigma")}
  named = [n for n, v in dm_networks.NORMALIZATIONS.items()
           if v is not None and np.allclose(found, v, rtol=0, atol=1e-6)]
  if not hasattr(model, "mean_std"):
    fix = f"{type(model).__name__} has no normalization option"
  else:
    fix = f"pass normalization={named[0] if named else found!r}"
  raise errors.UserError(f"the checkpoint standardises its input with mu={found[0]}, "
                         f"sigma={found[1]} (its keys mu, sigma); {fix}")


def is_ignored_key(name: str, key: str) -> bool:
  """Whether a checkpoint key of `name` carries nothing our models hold (BN step counts, the
  WRN's unused sub_block1)."""
  return torch_layouts.is_ignored(name, key)


def from_torch_state_dict(name: str, state_dict: Mapping[str, Any], num_classes: int = 10,
                          **options) -> Dict[str, Any]:
  """Flax {'params', 'batch_stats'} for models.create(name, num_classes, **options)."""
  model = models.create(name, num_classes=num_classes, **options)
  state_dict = _without_input_statistics(model, _strip_prefixes(state_dict))
  abstract = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
  missing, mismatched, used, leaves = [], [], set(), []
  for key, leaf in _torch_keyed_leaves(name, abstract):
    expected = _to_torch_layout(leaf.shape)
    if key not in state_dict:
      missing.append(key)
      leaves.append(None)
      continue
    used.add(key)
    array = _as_numpy(state_dict[key])
    if array.shape != expected:
      mismatched.append((key, f"{key}: got {array.shape}, expected {expected}"))
    leaves.append(_to_flax_layout(array))
  order = {key: index for index, key in enumerate(state_dict)}
  mismatched = [text for _, text in sorted(mismatched, key=lambda item: order[item[0]])]
  unexpected = [k for k in state_dict if k not in used and not is_ignored_key(name, k)]

  if missing or unexpected or mismatched:
    problems = []
    if missing:
      problems.append(f"missing keys: {_listed(missing)}")
    if unexpected:
      problems.append(f"unexpected keys: {_listed(unexpected)}")
    if mismatched:
      problems.append(f"shape mismatches: {_listed(mismatched)}")
    shown = ", ".join(f"{k}={v!r}" for k, v in options.items())
    raise errors.UserError(
               f"state_dict does not match {name} (num_classes={num_classes}"
               f"{', ' + shown if shown else ''}): {'; '.join(problems)}. "
               f"{_hint(name, state_dict)}")
  treedef = jax.tree_util.tree_structure(abstract)
  # device_put, not jnp.asarray: the latter compiles a staging program per distinct shape.
  return jax.tree_util.tree_unflatten(treedef, [jax.device_put(a) for a in leaves])


def _hint(name: str, state_dict: Mapping[str, Any]) -> str:
  """What to do instead: the architecture (and options) the keys look like, if any."""
  looks_like = torch_layouts.describe(state_dict)
  if looks_like is None:
    return ("Pass the options (width, depth, widen_factor, cas_stages) the checkpoint was "
            f"trained with, or another architecture of {', '.join(models.NAMES)}.")
  if looks_like.split(" ")[0] == name:
    return f"The keys look like {looks_like}: pass those options."
  return f"The keys look like {looks_like}: load it under that name, with those options."


def to_torch_state_dict(name: str, variables: Mapping[str, Any]) -> Dict[str, np.ndarray]:
  """The torch-layout state_dict (numpy float32) of models.create(name) Flax variables.

  It has no `num_batches_tracked`: torch's BatchNorm fills them in (0) when it loads a plain
  dict, so the network of the layout loads it with strict=True.
  """
  tree = {k: variables[k] for k in ("params", "batch_stats") if k in variables}
  return {key: np.array(_from_flax_layout(np.asarray(leaf, np.float32)), order="C")  # writable
          for key, leaf in _torch_keyed_leaves(name, tree)}


def load_torch_checkpoint(name: str, path: str, num_classes: int = 10,
                          **options) -> Dict[str, Any]:
  """Flax variables from a .pth/.pt file holding a state_dict (or one under 'state_dict' etc.)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise ImportError("load_torch_checkpoint needs PyTorch (pip install torch); or convert the "
                      "checkpoint elsewhere and call from_torch_state_dict with numpy arrays."
                      ) from error
  checkpoint = torch.load(path, map_location="cpu", weights_only=True)
  for wrapper in ("state_dict", "model", "net", "last"):  # 'last': RobustBench's PreActResNets
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get(wrapper), Mapping):
      checkpoint = checkpoint[wrapper]
      break
  if not isinstance(checkpoint, Mapping):
    raise errors.UserError(f"{path} holds a {type(checkpoint).__name__}, not a state_dict; save "
                            "model.state_dict() (a whole pickled module is not supported).")
  return from_torch_state_dict(name, checkpoint, num_classes=num_classes, **options)
