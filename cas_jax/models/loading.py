"""Trained weights from a workdir's Orbax checkpoints or a PyTorch .pth file, one way for all.

    loaded = loading.load(config, "runs/cifar10_at_cas", num_classes=10, image_shape=(32, 32, 3))
    logits, cas_logits = loaded.model.apply(loaded.variables, x, train=False)

The network is built from config.model and config.baseline (models.from_config); a .pth holds
the authors' PyTorch layout (interop.load_torch_checkpoint), a workdir its Orbax checkpoints
(checkpointing.restore_variables: 'last', 'best' or a step number).
"""
import dataclasses
import os
from typing import Any, Dict, List, Optional, Tuple

from absl import logging
import flax.linen as nn
import ml_collections

from cas_jax import checkpointing
from cas_jax import errors
from cas_jax.models import interop
from cas_jax import models
from cas_jax import provenance

CHECKPOINT_CHOICES = ("last", "best")


@dataclasses.dataclass
class Loaded:
  """A network and its weights: label ('last', 'best' or the .pth's stem), step (None: .pth)."""
  label: str
  step: Optional[int]
  model: nn.Module
  variables: Dict[str, Any]
  where: str  # in words, for reports and figures


def no_checkpoint_error(workdir: str) -> FileNotFoundError:
  """The error for a workdir without checkpoints, naming the two ways out."""
  return FileNotFoundError(
      f"no checkpoint in {os.path.join(workdir, 'checkpoints')}: train first with the same "
      f"command without --mode=eval (python main.py --config=... --workdir={workdir}), or "
      "evaluate a PyTorch file with --config.eval.torch_checkpoint=/path/to/model.pth")


def load(config, source: str, num_classes: int, image_shape: Tuple[int, ...],
         which: Any = "last") -> Loaded:
  """config's network with the weights of `source`: a .pth file or a workdir's `which` checkpoint."""
  model = models.from_config(config, num_classes)
  if os.path.isfile(source):
    variables = interop.load_torch_checkpoint(config.model.name, source, num_classes,
                                              **models.options_from_config(config.model))
    label = os.path.splitext(os.path.basename(source))[0]
    return Loaded(label, None, model, variables, f"PyTorch checkpoint {source}")
  if not os.path.isdir(os.path.join(source, "checkpoints")):
    raise no_checkpoint_error(source)
  step, variables = checkpointing.restore_variables(
      source, models.variable_shapes(model, image_shape), which)
  return Loaded(str(which), step, model, variables,
                f"workdir {source}, {which} checkpoint (step {step})")


def checkpoint_names(value: Any) -> List[str]:
  """The checkpoints named by config.eval.checkpoints ('last', 'best' or 'last,best')."""
  which = [w.strip() for w in str(value).split(",") if w.strip()]
  if not which or set(which) - set(CHECKPOINT_CHOICES):
    raise errors.UserError(f"config.eval.checkpoints={value!r}; use a comma-separated subset of "
                            f"{', '.join(CHECKPOINT_CHOICES)}, e.g. 'last,best'")
  return which


def load_evaluation_targets(config, workdir: str, num_classes: int,
                            image_shape: Tuple[int, ...]) -> List[Loaded]:
  """config.eval.torch_checkpoint if set, else workdir's config.eval.checkpoints (a missing
  best is skipped with a warning)."""
  path = config.eval.get("torch_checkpoint", "")
  if path:
    if not os.path.isfile(path):
      raise FileNotFoundError(f"config.eval.torch_checkpoint={path!r} is not a file")
    return [load(config, path, num_classes, image_shape)]
  found = []
  for label in checkpoint_names(config.eval.get("checkpoints", "last")):
    try:
      found.append(load(config, workdir, num_classes, image_shape, label))
    except FileNotFoundError:
      if label == "last":
        raise no_checkpoint_error(workdir) from None
      logging.warning("No best checkpoint in %s (no evaluation metrics saved); skipping it.",
                      workdir)
  if not found:
    raise FileNotFoundError(f"no best checkpoint in {workdir}: none was saved with evaluation "
                            "metrics; use --config.eval.checkpoints=last")
  return found


def load_transfer_source(config, num_classes: int,
                         image_shape: Tuple[int, ...]) -> Optional[Loaded]:
  """The transfer attacks' source (config.eval.transfer_checkpoint), or None when unset.

  A .pth is the network config.eval.transfer_model (default: config.model.name) at its own
  default width and CAS placement; a workdir is the network its config.json records (e.g. the
  naturally trained ResNet-50 of Table 6), or, without one, the evaluated model's.
  """
  path = config.eval.get("transfer_checkpoint", "")
  if not path:
    return None
  source_config = config.copy_and_resolve_references()
  if os.path.isfile(path):
    source_config.model.name = config.eval.get("transfer_model", "") or config.model.name
    source_config.model.width = 0
    source_config.model.cas_stages = "default"
    source_config.baseline = "none"
  else:
    recorded = provenance.read_config(path)
    if recorded is not None:
      source_config.model = ml_collections.ConfigDict(recorded["model"])
      source_config.baseline = recorded.get("baseline", "none")
  return load(source_config, path, num_classes, image_shape)
