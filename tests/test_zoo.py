"""RobustBench's CIFAR architectures in Flax against RobustBench's own PyTorch classes.

The classes come from robustbench 1.1.1 (installed with --no-deps; see robustbench_folder),
each architecture file loaded by its path: the package's __init__ imports its evaluation,
which fails against pyautoattack 0.2.0. Every family imports with random weights and after a few
SGD steps in training mode (so BatchNorm statistics are not the initial 0 / 1) and gives
RobustBench's eval-mode logits to 1e-4; exported back, the state dict loads into the class
with strict=True and gives the same logits.
"""
import dataclasses
import functools
import importlib.util
import os
import re
import sys
from typing import Callable, Dict

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cas_jax import errors
from cas_jax import models
from cas_jax.models import interop

torch = pytest.importorskip("torch", reason="the RobustBench classes are PyTorch modules")
from tests.test_interop import _randomised  # pylint: disable=g-import-not-at-top,wrong-import-position

TOLERANCE = 1e-4


def robustbench_folder() -> str:
  """The robustbench package folder: on the path, or where .ci/run installs it off the path
  (pip install --no-deps --target $VIRTUAL_ENV/robustbench; its wheel's own top-level `tests`
  package would shadow ours)."""
  spec = importlib.util.find_spec("robustbench")  # finds the package without importing it
  if spec is not None:
    return spec.submodule_search_locations[0]
  folder = os.path.join(sys.prefix, "robustbench", "robustbench")
  if not os.path.isdir(folder):
    pytest.skip("robustbench is not installed: pip install --no-deps --target "
                "$VIRTUAL_ENV/robustbench robustbench==1.1.1 (as .ci/run does)")
  return folder


@functools.lru_cache(maxsize=None)
def robustbench_architecture(stem: str):
  """robustbench/model_zoo/architectures/<stem>.py as a module, loaded by file path."""
  path = os.path.join(robustbench_folder(), "model_zoo", "architectures", f"{stem}.py")
  file_spec = importlib.util.spec_from_file_location(f"robustbench_architectures_{stem}", path)
  module = importlib.util.module_from_spec(file_spec)
  file_spec.loader.exec_module(module)
  return module


def narrow_preact_resnet(width: int, block_name: str = "PreActBlock", stages=(2, 2, 2, 2),
                         num_classes: int = 10, **options):
  """RobustBench's PreActResNet with first-stage width `width` (the class fixes 64): its own
  blocks, _make_layer and forward, on convs and a classifier of that width."""
  architecture = robustbench_architecture("resnet")
  block = getattr(architecture, block_name)
  net = architecture.PreActResNet(block, [1, 1, 1, 1], num_classes, **options)  # layers below
  net.in_planes = width
  net.conv1 = torch.nn.Conv2d(3, width, 3, 1, 1, bias=False)
  for stage, blocks in enumerate(stages):
    setattr(net, f"layer{stage + 1}",
            net._make_layer(block, width * 2**stage, blocks, 1 if stage == 0 else 2))  # pylint: disable=protected-access
  if options.get("bn_before_fc"):
    net.bn = torch.nn.BatchNorm2d(8 * width)
  net.linear = torch.nn.Linear(8 * width, num_classes)
  return net


def narrow_dm_preact_resnet(width: int, depth: int = 18, activation: str = "swish",
                            num_classes: int = 10):
  """RobustBench's DMPreActResNet with first-stage width `width` (the class fixes 64)."""
  architecture = robustbench_architecture("dm_wide_resnet")
  activation_fn = architecture.Swish if activation == "swish" else torch.nn.ReLU
  net = architecture.DMPreActResNet(num_classes, 18, activation_fn=activation_fn)  # layers below
  net.conv_2d = torch.nn.Conv2d(3, width, 3, 1, 1, bias=False)
  stages = (2, 2, 2, 2) if depth == 18 else (3, 4, 6, 3)
  for stage, blocks in enumerate(stages):
    planes = width * 2**stage
    setattr(net, f"layer_{stage}", net._make_layer(  # pylint: disable=protected-access
        planes // (1 if stage == 0 else 2), planes, blocks, 1 if stage == 0 else 2, activation_fn))
  net.batchnorm = torch.nn.BatchNorm2d(8 * width)
  net.logits = torch.nn.Linear(8 * width, num_classes)
  return net


@dataclasses.dataclass(frozen=True)
class Family:
  """One of our names, its create() options, and the RobustBench network it must equal."""
  name: str
  options: Dict
  build: Callable  # () -> a fresh torch network (RobustBench's class)
  num_classes: int = 10


def _wide_resnet():
  return robustbench_architecture("wide_resnet").WideResNet(depth=16, widen_factor=2)


def _dm_wide_resnet(num_classes=10, activation="swish", depth=10, width=2):
  architecture = robustbench_architecture("dm_wide_resnet")
  normalization = ({} if num_classes == 10 else
                   dict(mean=architecture.CIFAR100_MEAN, std=architecture.CIFAR100_STD))
  activation_fn = architecture.Swish if activation == "swish" else torch.nn.ReLU
  return architecture.DMWideResNet(num_classes, depth, width, activation_fn, **normalization)


# Narrow PreActResNets (the classes fix width 64) keep the tests quick; test_full_width_...
# checks the classes themselves.
FAMILIES = {
    "wide_resnet": Family("wide_resnet", dict(depth=16, widen_factor=2), _wide_resnet),
    "preact_resnet18": Family("preact_resnet18", dict(width=16),
                              lambda: narrow_preact_resnet(16)),
    "preact_resnet34-v2": Family(  # PreActBlockV2 (out_shortcut) and bn_before_fc
        "preact_resnet34", dict(width=8, bn_before_fc=True, out_shortcut=True),
        lambda: narrow_preact_resnet(8, "PreActBlockV2", (3, 4, 6, 3), bn_before_fc=True)),
    "dm_wide_resnet": Family("dm_wide_resnet", dict(depth=10, width=2), _dm_wide_resnet),
    "dm_wide_resnet-relu-cifar100": Family(
        "dm_wide_resnet", dict(depth=16, width=1, activation="relu"),
        lambda: _dm_wide_resnet(100, "relu", depth=16, width=1), num_classes=100),
    "dm_preact_resnet": Family("dm_preact_resnet", dict(width=16),
                               lambda: narrow_dm_preact_resnet(16)),
}


def train_briefly(net, num_classes: int, steps: int = 3, seed: int = 0, batch_size: int = 4):
  """`net` after `steps` SGD steps in training mode on random images (BN statistics move)."""
  generator = torch.Generator().manual_seed(seed)
  optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
  net.train()
  for _ in range(steps):
    x = torch.rand(batch_size, 3, 32, 32, generator=generator)
    y = torch.randint(0, num_classes, (batch_size,), generator=generator)
    loss = torch.nn.functional.cross_entropy(net(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
  return net.eval()


def torch_logits(net, images: np.ndarray) -> np.ndarray:
  """`net`'s eval-mode logits of NHWC images."""
  with torch.no_grad():
    return net.eval()(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()


def _images(n: int = 8, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).uniform(size=(n, 32, 32, 3)).astype(np.float32)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
  """(Family, its jitted eval-mode apply): one compilation for all of a family's tests."""
  case = FAMILIES[request.param]
  model = models.create(case.name, case.num_classes, **case.options)
  return case, jax.jit(lambda variables, x: model.apply(variables, x, train=False)[0])


def _state_dict(net) -> Dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("weights", ["random", "trained"])
def test_logits_match_robustbench(family, weights):
  case, apply_fn = family
  torch.manual_seed(0)
  net = case.build()
  if weights == "random":  # and random BatchNorm statistics and affine parameters
    net = _randomised(net)
  else:
    initial_var = _state_dict(net)
    net = train_briefly(net, case.num_classes)
    moved = [k for k, v in _state_dict(net).items()
             if k.endswith("running_var") and not np.allclose(v, initial_var[k])]
    assert moved  # the statistics are not the initial ones
  variables = interop.from_torch_state_dict(case.name, net.state_dict(), case.num_classes,
                                            **case.options)
  images = _images()
  ours, theirs = np.asarray(apply_fn(variables, jnp.asarray(images))), torch_logits(net, images)
  error = float(np.max(np.abs(ours - theirs)))
  print(f"\n{case.name} {case.options} {weights}: max |logit difference| {error:.2e} "
        f"(logits up to {np.max(np.abs(theirs)):.2f})")
  assert np.std(theirs) > 1e-3  # not a degenerate network
  assert error <= TOLERANCE


def test_exported_state_dict_loads_strictly_into_robustbench(family):
  case, _ = family
  torch.manual_seed(1)
  net = _randomised(case.build())
  variables = interop.from_torch_state_dict(case.name, net.state_dict(), case.num_classes,
                                            **case.options)
  exported = interop.to_torch_state_dict(case.name, variables)
  torch.manual_seed(2)
  fresh = case.build()  # other weights, then ours
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
  images = _images(4, seed=1)
  np.testing.assert_allclose(torch_logits(fresh, images), torch_logits(net, images), atol=1e-6)


def _dm_preact_resnet18():
  architecture = robustbench_architecture("dm_wide_resnet")
  return architecture.DMPreActResNet(depth=18, activation_fn=architecture.Swish)


# RobustBench's classes of a fixed width (64), as they are; its ResNets are our CAS ResNets
# without CAS.
FULL_WIDTH = {
    "preact_resnet18": (lambda: robustbench_architecture("resnet").PreActResNet18(), {}),
    "dm_preact_resnet": (_dm_preact_resnet18, {}),
    "resnet18": (lambda: robustbench_architecture("resnet").ResNet18(), dict(cas_stages=())),
    "resnet50": (lambda: robustbench_architecture("resnet").ResNet50(), dict(cas_stages=())),
}


@pytest.mark.parametrize("name", sorted(FULL_WIDTH))
def test_full_width_classes_import_and_match(name):
  build, options = FULL_WIDTH[name]
  torch.manual_seed(0)
  net = _randomised(build())
  variables = interop.from_torch_state_dict(name, net.state_dict(), **options)
  images = _images(2)
  logits, _ = models.create(name, **options).apply(variables, jnp.asarray(images), train=False)
  np.testing.assert_allclose(logits, torch_logits(net, images), atol=TOLERANCE)


# ------------------------------------------------------------------------- checkpoint files


@pytest.mark.parametrize("mean, std, normalization", [
    ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616), "cifar10"),  # Wong2020Fast's
    ((0.4913997551666284, 0.48215855929893703, 0.4465309133731618),  # Augustin2020's
     (0.24703225141799082, 0.24348516474564, 0.26158783926049628),
     ((0.49139977, 0.48215857, 0.4465309), (0.24703225, 0.24348517, 0.26158783))),
])
def test_input_statistics_in_a_state_dict_are_checked_and_used(mean, std, normalization):
  # RobustBench's wrappers of such entries keep the statistics as buffers `mu` and `sigma`.
  torch.manual_seed(0)
  net = _randomised(narrow_preact_resnet(8))
  state_dict = {**net.state_dict(), "mu": torch.tensor(mean).view(1, 3, 1, 1),
                "sigma": torch.tensor(std).view(1, 3, 1, 1)}
  expected = re.escape(f"the checkpoint standardises its input with mu={normalization[0]}, "
                       if isinstance(normalization, tuple) else "pass normalization='cifar10'")
  for wrong in ({}, dict(normalization="cifar100")):
    with pytest.raises(errors.UserError, match=expected):
      interop.from_torch_state_dict("preact_resnet18", state_dict, width=8, **wrong)
  variables = interop.from_torch_state_dict("preact_resnet18", state_dict, width=8,
                                            normalization=normalization)
  images = _images(4)
  model = models.create("preact_resnet18", width=8, normalization=normalization)
  standardised = (images - np.float32(mean)) / np.float32(std)
  np.testing.assert_allclose(model.apply(variables, jnp.asarray(images), train=False)[0],
                             torch_logits(net, standardised), atol=TOLERANCE)


def test_load_torch_checkpoint_reads_robustbench_files(tmp_path):
  torch.manual_seed(0)
  # Carmon2019Unlabeled's constructor: a sub_block1 never called, saved under 'state_dict'
  # with DataParallel's 'module.'; Chen2020Efficient's keys carry 'model.' (RobustBench
  # strips both); Andriushchenko2020Understanding's file holds {'last': ..., 'best': ...}.
  net = robustbench_architecture("wide_resnet").WideResNet(depth=10, widen_factor=1,
                                                           sub_block1=True)
  net = train_briefly(net, 10, steps=1)
  tensors = net.state_dict()
  assert any(k.startswith("sub_block1.") for k in tensors)
  files = {"carmon.pt": {"state_dict": {f"module.{k}": v for k, v in tensors.items()}},
           "chen.pt": {f"model.{k}": v for k, v in tensors.items()},
           "andriushchenko.pt": {"last": dict(tensors), "best": {}}}
  images = _images(4)
  model = models.create("wide_resnet", depth=10, widen_factor=1)
  for file_name, content in files.items():
    torch.save(content, tmp_path / file_name)
    variables = interop.load_torch_checkpoint("wide_resnet", str(tmp_path / file_name),
                                              depth=10, widen_factor=1)
    logits, _ = model.apply(variables, jnp.asarray(images), train=False)
    np.testing.assert_allclose(logits, torch_logits(net, images), atol=TOLERANCE)


def test_keys_of_another_architecture_are_named():
  state_dict = narrow_preact_resnet(8).state_dict()
  with pytest.raises(errors.UserError) as error:
    interop.from_torch_state_dict("wide_resnet", state_dict, depth=16, widen_factor=2)
  message = str(error.value)
  assert "\n" not in message
  assert message.startswith("state_dict does not match wide_resnet (num_classes=10, depth=16, "
                            "widen_factor=2): missing keys: block1.layer.0.bn1.running_mean, ")
  assert "unexpected keys: layer1.0.bn1.weight, layer1.0.bn1.bias, " in message
  assert message.endswith("The keys look like preact_resnet18 (num_classes=10, width=8): load "
                          "it under that name, with those options.")


@pytest.mark.parametrize("torch_net, name, options, looks_like", [
    (lambda: _dm_wide_resnet(depth=10, width=1), "dm_wide_resnet", {},
     "dm_wide_resnet (num_classes=10, depth=10, width=1): pass those options."),
    (lambda: _dm_wide_resnet(100, depth=16, width=1), "dm_wide_resnet", dict(depth=16, width=1),
     "dm_wide_resnet (num_classes=100, depth=16, width=1): pass those options."),
    (lambda: narrow_dm_preact_resnet(8, depth=34), "dm_preact_resnet", dict(width=8),
     "dm_preact_resnet (num_classes=10, depth=34, width=8): pass those options."),
    (lambda: _wide_resnet(), "preact_resnet18", {},
     "wide_resnet (num_classes=10, depth=16, widen_factor=2): load it under that name"),
    (lambda: narrow_preact_resnet(8, bn_before_fc=True), "resnet18", dict(width=8),
     "preact_resnet18 (num_classes=10, width=8, bn_before_fc=True): load it under that name"),
    (lambda: robustbench_architecture("resnet").ResNet18(), "resnet18", {},
     "resnet18 (num_classes=10, width=64, cas_stages=()): pass those options."),
], ids=["dm_wide_resnet-depth", "dm_wide_resnet-num_classes", "dm_preact_resnet-depth",
        "wide_resnet-as-preact", "preact-as-resnet", "robustbench-resnet18-without-cas"])
def test_wrong_options_or_architecture_are_named(torch_net, name, options, looks_like):
  with pytest.raises(errors.UserError, match="The keys look like " + re.escape(looks_like)):
    interop.from_torch_state_dict(name, torch_net().state_dict(), **options)
