"""A briefly trained network of each RobustBench family, PyTorch against our import of it.

Each family's RobustBench class (tiny widths, tests/test_zoo.py) trains for a few hundred steps
in PyTorch on CIFAR-10 images read by cas_jax's input pipeline from CAS_JAX_CIFAR_DIR (else on
its synthetic images); we import the weights and show (1) our clean predictions equal
PyTorch's on 500 test images, image by image, and (2) on 32 images both classify correctly,
at an eps where AutoAttack breaks some of them (_calibrated_eps), our report's AutoAttack
at reduced budgets (tests/test_autoattack_official.py's BUDGET, its
official adversary and our report side) leaves at most one more image robust than the
official AutoAttack (pyautoattack 0.2.0) on the PyTorch network.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cas_jax import errors
from cas_jax import input_pipeline
from cas_jax import models
from cas_jax.models import interop

torch = pytest.importorskip("torch", reason="the RobustBench classes are PyTorch modules")
official = pytest.importorskip("pyautoattack", reason="the official AutoAttack (pyautoattack)")
import test_autoattack_official as parity  # pylint: disable=g-import-not-at-top,wrong-import-position
import test_zoo  # pylint: disable=g-import-not-at-top,wrong-import-position

NUM_TRAIN, NUM_TEST, NUM_ATTACKED = 4000, 500, 32
# The L-inf eps of the comparison: the first of these (in 1/255) at which the official APGD-CE
# breaks an eighth of the images, so that AutoAttack breaks some but not all (no fixed value
# serves every family: at 10/255 on the synthetic images one net keeps 32 of 32, another 1).
EPS_LADDER_255 = (1, 2, 3, 4, 6, 8, 10, 12, 14, 16, 20, 24, 32)


def _tiny_network(name: str):
  """(torch network, create() options) of the smallest useful member of each family."""
  if name == "wide_resnet":
    return (test_zoo.robustbench_architecture("wide_resnet").WideResNet(depth=10, widen_factor=1),
            dict(depth=10, widen_factor=1))
  if name == "preact_resnet18":
    return test_zoo.narrow_preact_resnet(8), dict(width=8)
  if name == "dm_wide_resnet":
    return test_zoo._dm_wide_resnet(depth=10, width=1), dict(depth=10, width=1)  # pylint: disable=protected-access
  return test_zoo.narrow_dm_preact_resnet(8), dict(width=8)


@pytest.fixture(scope="module")
def images():
  """(train x, train y, test x, test y, source): NCHW float32 in [0, 1], int64 labels."""
  try:
    (train_x, train_y), (test_x, test_y) = input_pipeline.load_cifar_dir(
        os.environ.get("CAS_JAX_CIFAR_DIR", ""))
    source = "cifar"
  except (FileNotFoundError, errors.UserError):
    (train_x, train_y), (test_x, test_y) = input_pipeline.synthetic_data(0, NUM_TRAIN, NUM_TEST)
    source = "synthetic"

  def prepare(x, y, n):
    return (np.ascontiguousarray(x[:n].transpose(0, 3, 1, 2), np.float32) / 255,
            np.asarray(y[:n], np.int64))

  return (*prepare(train_x, train_y, NUM_TRAIN), *prepare(test_x, test_y, NUM_TEST), source)


def _calibrated_eps(net, x, y) -> float:
  """The first eps of EPS_LADDER_255 at which the official APGD-CE breaks >= 1/8 of (x, y)."""
  for eps_255 in EPS_LADDER_255:
    broken = parity._official_broken(  # pylint: disable=protected-access
        torch, official.AutoAttack, net, x, y, eps_255 / 255, ["apgd-ce"], 0)
    if 8 * np.sum(broken) >= len(y):
      break
  return eps_255 / 255


def _train(net, x, y, epochs: int = 2, batch_size: int = 64):
  """`net` after a few epochs of Adam on (x, y), in eval mode."""
  torch.manual_seed(0)
  optimizer = torch.optim.Adam(net.parameters(), 3e-3)
  x, y = torch.from_numpy(x), torch.from_numpy(y)
  net.train()
  for _ in range(epochs):
    for batch in torch.randperm(len(y)).split(batch_size):
      loss = torch.nn.functional.cross_entropy(net(x[batch]), y[batch])
      optimizer.zero_grad()
      loss.backward()
      optimizer.step()
  return net.eval()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["wide_resnet", "preact_resnet18", "dm_wide_resnet",
                                  "dm_preact_resnet"])
def test_trained_network_clean_accuracy_and_autoattack_match_pytorch(images, name):
  train_x, train_y, test_x, test_y, source = images
  threads = torch.get_num_threads()
  torch.set_num_threads(1)  # as the official parity tests: these small networks' ops
  try:
    torch.manual_seed(0)
    net, options = _tiny_network(name)
    net = _train(net, train_x, train_y)
    variables = interop.from_torch_state_dict(name, net.state_dict(), **options)
    model = models.create(name, **options)
    apply_fn = jax.tree_util.Partial(lambda v, x: model.apply(v, x, train=False)[0], variables)

    # (1) Clean predictions, image by image.
    nhwc = np.ascontiguousarray(test_x.transpose(0, 2, 3, 1))
    ours = np.asarray(jnp.argmax(jax.jit(apply_fn)(nhwc), -1))
    theirs = test_zoo.torch_logits(net, nhwc).argmax(-1)
    accuracy = (float(np.mean(ours == test_y)), float(np.mean(theirs == test_y)))
    assert accuracy[1] > 0.2  # trained: better than chance (10%)
    np.testing.assert_array_equal(ours, theirs)

    # (2) AutoAttack on 32 images both classify correctly.
    chosen = np.flatnonzero(theirs == test_y)[:NUM_ATTACKED]
    x, y = test_x[chosen], test_y[chosen]
    eps = _calibrated_eps(net, x, y)
    broken_official = parity._official_broken(  # pylint: disable=protected-access
        torch, official.AutoAttack, net, x, y, eps, None, 0)
    broken_ours = parity._ours_broken(apply_fn, x, y, eps, "aa", 0)  # pylint: disable=protected-access
  finally:
    torch.set_num_threads(threads)
  robust = (int(np.sum(~broken_ours)), int(np.sum(~broken_official)))
  print("\n" + json.dumps({"family": name, "options": options, "source": source,
                           "clean_accuracy_ours_pytorch": accuracy, "images": len(y),
                           "eps_255": round(eps * 255, 3), "robust_ours_official": robust,
                           "missed_by_ours": np.flatnonzero(broken_official
                                                            & ~broken_ours).tolist()}))
  assert 0 < robust[1] < len(y)  # the budget breaks some images, not all
  assert robust[0] <= robust[1] + 1
