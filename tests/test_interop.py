"""Tests for cas_jax.models.interop: torch models with the official key layout -> identical Flax outputs.

The torch networks below follow the module structure (and so the state_dict keys) of the
authors' ResNet-18, WideResNet and VGG16 CAS models, with configurable small widths.
"""
import copy

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from cas_jax import models
from cas_jax.models import interop

torch = pytest.importorskip("torch")
tnn = torch.nn
F = torch.nn.functional

NUM_CLASSES = 10  # the official CAS layers hard-code 10 outputs


def _suppress(out, fc, fc_out, label, training):
  """The official CAS step on NCHW `out`: mask with the label's (train) or predicted (eval) row."""
  classes = label if training else fc_out.argmax(dim=1)
  return out * fc.weight[classes][:, :, None, None]


def _cas_logits(out, fc):
  return fc(out.mean(dim=(2, 3)))


# ------------------------------------------------------------------------- torch ResNet-18


class TorchBasicBlock(tnn.Module):

  def __init__(self, in_planes, planes, stride, with_cas):
    super().__init__()
    self.conv1 = tnn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
    self.bn1 = tnn.BatchNorm2d(planes)
    self.conv2 = tnn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = tnn.BatchNorm2d(planes)
    self.shortcut = tnn.Sequential()
    if stride != 1 or in_planes != planes:
      self.shortcut = tnn.Sequential(tnn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                     tnn.BatchNorm2d(planes))
    self.with_cas = with_cas
    if with_cas:
      self.fc = tnn.Linear(planes, NUM_CLASSES)

  def forward(self, x, label=None):
    out = F.relu(self.bn1(self.conv1(x)))
    out = F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))
    if not self.with_cas:
      return out, None
    fc_out = _cas_logits(out, self.fc)
    return _suppress(out, self.fc, fc_out, label, self.training), fc_out


class TorchResNet18(tnn.Module):

  def __init__(self, width):
    super().__init__()
    self.conv1 = tnn.Conv2d(3, width, 3, 1, 1, bias=False)
    self.bn1 = tnn.BatchNorm2d(width)
    in_planes = width
    for stage in (1, 2, 3, 4):
      planes, blocks = width * 2**(stage - 1), []
      for index in range(2):
        blocks.append(TorchBasicBlock(in_planes, planes, 2 if stage > 1 and index == 0 else 1,
                                      with_cas=stage == 4))
        in_planes = planes
      stage_module = tnn.ModuleList(blocks) if stage == 4 else tnn.Sequential(*blocks)
      setattr(self, f"layer{stage}", stage_module)
    self.linear = tnn.Linear(8 * width, NUM_CLASSES)

  def forward(self, x, y=None):
    out = F.relu(self.bn1(self.conv1(x)))
    for block in (*self.layer1, *self.layer2, *self.layer3):
      out, _ = block(out)
    cas_outputs = []
    for block in self.layer4:
      out, fc_out = block(out, y)
      cas_outputs.append(fc_out)
    return self.linear(out.mean(dim=(2, 3))), cas_outputs


# ------------------------------------------------------------------------- torch WideResNet


class TorchWideBlock(tnn.Module):

  def __init__(self, in_planes, out_planes, stride, with_cas=False):
    super().__init__()
    self.bn1 = tnn.BatchNorm2d(in_planes)
    self.conv1 = tnn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
    self.bn2 = tnn.BatchNorm2d(out_planes)
    self.conv2 = tnn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
    self.equal_in_out = in_planes == out_planes
    if not self.equal_in_out:  # the official attribute name, hence the key `convShortcut`
      self.convShortcut = tnn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)
    self.with_cas = with_cas
    if with_cas:
      self.fc = tnn.Linear(in_planes, NUM_CLASSES)

  def forward(self, x, label=None):
    activated = F.relu(self.bn1(x))
    shortcut = x if self.equal_in_out else self.convShortcut(activated)
    if not self.with_cas:
      return shortcut + self.conv2(F.relu(self.bn2(self.conv1(activated))))
    fc_out = _cas_logits(activated, self.fc)
    branch = _suppress(activated, self.fc, fc_out, label, self.training)
    return shortcut + self.conv2(F.relu(self.bn2(self.conv1(branch)))), fc_out


class TorchGroup(tnn.Module):

  def __init__(self, blocks, in_planes, out_planes, stride, cas_last):
    super().__init__()
    layers = [TorchWideBlock(in_planes if i == 0 else out_planes, out_planes,
                             stride if i == 0 else 1, with_cas=cas_last and i == blocks - 1)
              for i in range(blocks)]
    self.layer = tnn.ModuleList(layers) if cas_last else tnn.Sequential(*layers)


class TorchWideResNet(tnn.Module):

  def __init__(self, depth, widen_factor):
    super().__init__()
    blocks = (depth - 4) // 6
    widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
    self.conv1 = tnn.Conv2d(3, 16, 3, 1, 1, bias=False)
    self.block1 = TorchGroup(blocks, widths[0], widths[1], 1, False)
    self.sub_block1 = TorchGroup(blocks, widths[0], widths[1], 1, False)  # unused, as officially
    self.block2 = TorchGroup(blocks, widths[1], widths[2], 2, False)
    self.block3 = TorchGroup(blocks, widths[2], widths[3], 2, True)
    self.bn1 = tnn.BatchNorm2d(widths[3])
    self.fc = tnn.Linear(widths[3], NUM_CLASSES)
    self.extra_fc = tnn.Linear(widths[3], NUM_CLASSES)

  def forward(self, x, y=None):
    out = self.block2.layer(self.block1.layer(self.conv1(x)))
    cas_outputs = []
    for block in self.block3.layer:
      if block.with_cas:
        out, fc_out = block(out, y)
        cas_outputs.append(fc_out)
      else:
        out = block(out)
    out = F.relu(self.bn1(out))
    fc_out = _cas_logits(out, self.extra_fc)
    cas_outputs.append(fc_out)
    out = _suppress(out, self.extra_fc, fc_out, y, self.training)
    return self.fc(out.mean(dim=(2, 3))), cas_outputs


# ------------------------------------------------------------------------- torch VGG16


class TorchConvCAS(tnn.Module):

  def __init__(self, in_planes, planes):
    super().__init__()
    self.conv = tnn.Conv2d(in_planes, planes, 3, padding=1)
    self.bn = tnn.BatchNorm2d(planes)
    self.fc = tnn.Linear(planes, NUM_CLASSES)

  def forward(self, x, label=None):
    out = F.relu(self.bn(self.conv(x)))
    fc_out = _cas_logits(out, self.fc)
    return _suppress(out, self.fc, fc_out, label, self.training), fc_out


class TorchVGG16(tnn.Module):

  def __init__(self, width):
    super().__init__()
    widths = [[width] * 2, [2 * width] * 2, [4 * width] * 3, [8 * width] * 3]
    in_planes = 3
    for group, planes_list in enumerate(widths, start=1):
      layers = []
      for planes in planes_list:
        layers.append(tnn.Sequential(tnn.Conv2d(in_planes, planes, 3, padding=1),
                                     tnn.BatchNorm2d(planes), tnn.ReLU()))
        in_planes = planes
      setattr(self, f"layer{group}", tnn.Sequential(*layers, tnn.MaxPool2d(2, 2)))
    self.layer5 = tnn.ModuleList([TorchConvCAS(8 * width, 8 * width) for _ in range(3)])
    self.max_pooling = tnn.MaxPool2d(2, 2)
    hidden = 8 * width
    self.layer6 = tnn.Sequential(tnn.Linear(hidden, hidden), tnn.BatchNorm1d(hidden), tnn.ReLU())
    self.layer7 = tnn.Sequential(tnn.Linear(hidden, hidden), tnn.BatchNorm1d(hidden), tnn.ReLU())
    self.layer8 = tnn.Linear(hidden, NUM_CLASSES)

  def forward(self, x, y=None):
    out = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    cas_outputs = []
    for layer in self.layer5:
      out, fc_out = layer(out, y)
      cas_outputs.append(fc_out)
    out = self.max_pooling(out).flatten(1)
    return self.layer8(self.layer7(self.layer6(out))), cas_outputs


# ------------------------------------------------------------------------- tests

SMALL = {"resnet18": dict(width=8), "wrn": dict(depth=16, widen_factor=2), "vgg16": dict(width=4)}


def build_torch_network(name: str, options: dict) -> tnn.Module:
  """The authors'-layout torch network for models.create(name, **options), default CAS placement."""
  if name == "resnet18":
    return TorchResNet18(width=options.get("width") or 64)
  if name in ("wrn34_10", "wrn"):
    return TorchWideResNet(options.get("depth", 34), options.get("widen_factor", 10))
  if name == "vgg16":
    return TorchVGG16(width=options.get("width") or 64)
  raise ValueError(f"no torch reference network for {name!r}: use resnet18, wrn34_10, wrn or vgg16")


def _randomised(net):
  """`net` with random BN affine params and running stats, and nonzero biases everywhere."""
  generator = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for module in net.modules():
      if isinstance(module, (tnn.BatchNorm1d, tnn.BatchNorm2d)):
        for tensor, low, high in ((module.weight, 0.5, 1.5), (module.bias, -0.2, 0.2),
                                  (module.running_mean, -0.2, 0.2),
                                  (module.running_var, 0.5, 1.5)):
          tensor.copy_(torch.rand(tensor.shape, generator=generator) * (high - low) + low)
      elif isinstance(module, tnn.Linear):
        module.bias.copy_(torch.rand(module.bias.shape, generator=generator) * 0.2 - 0.1)
  return net


def _state_dict(net):
  return {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}


@pytest.fixture(scope="module", params=sorted(SMALL))
def case(request):
  torch.manual_seed(0)
  options = SMALL[request.param]
  net = _randomised(build_torch_network(request.param, options))
  images = np.random.default_rng(0).uniform(size=(4, 32, 32, 3)).astype(np.float32)
  return request.param, net, options, images


def _torch_outputs(net, images, labels=None, training=False):
  net.train(training)
  with torch.no_grad():
    logits, cas_logits = net(torch.from_numpy(images.transpose(0, 3, 1, 2)),
                             None if labels is None else torch.from_numpy(labels))
  return logits.numpy(), tuple(c.numpy() for c in cas_logits)


def test_evaluation_outputs_match_torch(case):
  name, net, options, images = case
  variables = interop.from_torch_state_dict(name, _state_dict(net), **options)
  model = models.create(name, NUM_CLASSES, **options)
  logits, cas_logits = model.apply(variables, jnp.asarray(images), train=False)
  expected_logits, expected_cas = _torch_outputs(net, images)
  assert len(cas_logits) == len(expected_cas)
  chex.assert_trees_all_close((logits, cas_logits), (expected_logits, expected_cas),
                              atol=1e-4, rtol=1e-4)


def test_training_outputs_and_running_stats_match_torch(case):
  name, net, options, images = case
  net = copy.deepcopy(net)  # its forward in training mode updates the running stats
  variables = interop.from_torch_state_dict(name, _state_dict(net), **options)
  model = models.create(name, NUM_CLASSES, **options)
  labels = np.array([3, 1, 4, 1], dtype=np.int64)
  (logits, cas_logits), updates = model.apply(variables, jnp.asarray(images), labels=labels,
                                              train=True, mutable=["batch_stats"])
  expected_logits, expected_cas = _torch_outputs(net, images, labels, training=True)
  chex.assert_trees_all_close((logits, cas_logits), (expected_logits, expected_cas),
                              atol=1e-4, rtol=1e-4)
  updated = interop.from_torch_state_dict(name, _state_dict(net), **options)  # torch's new stats
  chex.assert_trees_all_close(updates["batch_stats"], updated["batch_stats"], atol=1e-5)


def test_export_is_the_inverse_of_import_and_torch_loads_it_strictly(case):
  name, net, options, images = case
  state_dict = _state_dict(net)
  exported = interop.to_torch_state_dict(name, interop.from_torch_state_dict(name, state_dict,
                                                                             **options))
  kept = {k: v for k, v in state_dict.items()
          if not k.endswith("num_batches_tracked") and not k.startswith("sub_block1.")}
  assert sorted(exported) == sorted(kept)
  chex.assert_trees_all_equal(exported, kept)
  fresh = build_torch_network(name, options)  # other random weights, then ours exported
  missing, unexpected = fresh.load_state_dict(
      {k: torch.from_numpy(v) for k, v in exported.items()}, strict=False)
  assert not unexpected
  assert all(k.endswith("num_batches_tracked") or k.startswith("sub_block1.") for k in missing)
  chex.assert_trees_all_close(_torch_outputs(fresh, images), _torch_outputs(net, images),
                              atol=1e-6)


def test_default_full_width_resnet18_layout_imports():
  torch.manual_seed(0)
  state_dict = _state_dict(TorchResNet18(width=64))
  variables = interop.from_torch_state_dict("resnet18", state_dict)
  kernel = variables["params"]["layer4_1"]["cas"]["fc"]["kernel"]
  np.testing.assert_array_equal(kernel, state_dict["layer4.1.fc.weight"].T)
  conv = variables["params"]["layer2_0"]["shortcut_conv"]["kernel"]
  torch_conv = state_dict["layer2.0.shortcut.0.weight"]
  np.testing.assert_array_equal(conv, torch_conv.transpose(2, 3, 1, 0))
  running_var = variables["batch_stats"]["bn1"]["var"]
  np.testing.assert_array_equal(running_var, state_dict["bn1.running_var"])


@pytest.fixture(scope="module")
def small_resnet_state_dict():
  torch.manual_seed(0)
  return _state_dict(TorchResNet18(width=4))


def test_missing_unexpected_and_misshapen_keys_are_named(small_resnet_state_dict):
  state_dict = dict(small_resnet_state_dict)
  del state_dict["layer4.0.fc.weight"]
  state_dict["layer3.1.fc.weight"] = np.zeros((10, 16), np.float32)
  state_dict["linear.weight"] = np.zeros((10, 7), np.float32)
  with pytest.raises(ValueError) as error:
    interop.from_torch_state_dict("resnet18", state_dict, width=4)
  message = str(error.value)
  assert "missing keys: layer4.0.fc.weight" in message
  assert "unexpected keys: layer3.1.fc.weight" in message
  assert "shape mismatches: linear.weight: got (10, 7), expected (10, 32)" in message


def test_wrong_width_is_reported_as_shape_mismatch(small_resnet_state_dict):
  with pytest.raises(ValueError, match=r"shape mismatches: conv1.weight: got \(4, 3, 3, 3\), "
                                       r"expected \(8, 3, 3, 3\).*\(\d+ in all\)"):
    interop.from_torch_state_dict("resnet18", small_resnet_state_dict, width=8)


def test_load_torch_checkpoint_unwraps_and_strips_module_prefix(small_resnet_state_dict, tmp_path):
  expected = interop.from_torch_state_dict("resnet18", small_resnet_state_dict, width=4)
  tensors = {k: torch.from_numpy(v) for k, v in small_resnet_state_dict.items()}
  plain, wrapped = tmp_path / "plain.pth", tmp_path / "wrapped.pth"
  torch.save(tensors, plain)
  torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in tensors.items()}}, wrapped)
  for path in (plain, wrapped):
    chex.assert_trees_all_equal(interop.load_torch_checkpoint("resnet18", str(path), width=4),
                                expected)
