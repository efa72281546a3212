"""Every config loads, validates, and builds its network with the paper's CAS heads."""
import glob
import importlib
import os

import jax
import jax.numpy as jnp
import pytest

from cas_jax import configs
from cas_jax.training import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = [name for name in configs.names() if name != "default"]
# The paper: S = 2 for ResNet-18 (stage 4) and WRN-34-10, S = 3 for VGG16.
HEADS = {"resnet18": 2, "wrn34_10": 2, "vgg16": 3}


def test_the_top_level_configs_are_the_packaged_ones():
  files = glob.glob(os.path.join(ROOT, "configs", "*.py"))
  top_level = sorted(os.path.basename(p)[:-3] for p in files if "__" not in p)
  assert top_level == configs.names()
  for name in top_level:
    packaged = configs.get_config(name).to_dict()
    assert configs.get_config(os.path.join(ROOT, "configs", f"{name}.py")).to_dict() == packaged
  assert importlib.import_module("configs.default").setting is configs.default.setting


def test_a_config_is_a_packaged_name_or_a_file():
  assert configs.path("smoke") == os.path.join(configs.CONFIG_DIR, "smoke.py")
  assert configs.path(os.path.join(ROOT, "configs", "smoke.py")).startswith(ROOT)
  with pytest.raises(ValueError, match="config file nosuch does not exist .* one of: cifar10_at,"):
    configs.path("nosuch")


@pytest.mark.parametrize("name", SETTINGS)
def test_config_builds_its_network(name):
  config = configs.get_config(name)
  train.validate_config(config)
  model = train.create_model(config, config.data.num_classes)
  x = jnp.zeros((2, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(lambda k: model.init(k, x, train=False), jax.random.key(0))
  logits, cas_logits = jax.eval_shape(  # rngs: a SAP network draws its pruning
      lambda v: model.apply(v, x, train=False, rngs={"sap": jax.random.key(1)}), variables)
  assert logits.shape == (2, config.data.num_classes)
  with_cas = config.model.cas_stages != "none"
  assert len(cas_logits) == (HEADS[config.model.name] if with_cas else 0)
  assert name.removesuffix("_l2").endswith("_cas") == with_cas or name in ("smoke", "cifar_subset")


@pytest.mark.parametrize("name, drops", [
    ("cifar10_at_cas", (75, 90)), ("cifar10_trades_cas", (75, 90, 100)),
    ("wrn34_10_mart_cas", (75, 90, 100)), ("svhn_at_cas", (75, 90))])
def test_learning_rate_is_divided_by_ten_from_the_paper_epochs(name, drops):
  # Paper section 5.1: lr 0.1 (SVHN 0.01), divided by 10 at epochs 75 and 90 (and 100 for
  # TRADES / MART); epoch e (1-indexed) runs steps (e - 1) * steps_per_epoch onwards.
  config = configs.get_config(name)
  steps_per_epoch = 7
  lr_fn = train.create_learning_rate_fn(config, steps_per_epoch)
  first = 0.01 if name.startswith("svhn") else 0.1
  for epoch in range(1, config.schedule.num_epochs + 1):
    expected = first * 0.1 ** sum(epoch >= d for d in drops)
    for step in ((epoch - 1) * steps_per_epoch, epoch * steps_per_epoch - 1):
      assert float(lr_fn(step)) == pytest.approx(expected, rel=1e-6), (epoch, step)
