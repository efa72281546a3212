"""Every config file loads, validates, and builds its network with the paper's CAS heads."""
import glob
import importlib
import os

import jax
import jax.numpy as jnp
import pytest

from cas_jax import train

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
SETTINGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(CONFIG_DIR, "*.py"))
                  if not os.path.basename(p).startswith(("_", "default")))
# REFERENCE.md: S = 2 for ResNet-18 (stage 4) and WRN-34-10, S = 3 for VGG16.
HEADS = {"resnet18": 2, "wrn34_10": 2, "vgg16": 3}


@pytest.mark.parametrize("name", SETTINGS)
def test_config_builds_its_network(name):
  config = importlib.import_module(f"configs.{name}").get_config()
  train.validate_config(config)
  model = train.create_model(config, config.data.num_classes)
  x = jnp.zeros((2, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(lambda k: model.init(k, x, train=False), jax.random.key(0))
  logits, cas_logits = jax.eval_shape(  # rngs: a SAP network draws its pruning
      lambda v: model.apply(v, x, train=False, rngs={"sap": jax.random.key(1)}), variables)
  assert logits.shape == (2, config.data.num_classes)
  with_cas = config.model.cas_stages != "none"
  assert len(cas_logits) == (HEADS[config.model.name] if with_cas else 0)
  assert name.endswith("_cas") == with_cas or name in ("smoke", "cifar_subset")


def test_paper_settings_follow_the_reference():
  trades = importlib.import_module("configs.cifar10_trades_cas").get_config()
  assert (trades.attack.start, trades.attack.eps, trades.attack.step_size) == ("normal", 0.031,
                                                                              0.007)
  assert tuple(trades.schedule.milestones) == (75, 90, 100)
  at = importlib.import_module("configs.cifar10_at_cas").get_config()
  assert (at.attack.start, at.attack.steps, at.optim.weight_decay, at.loss.beta) == (
      "uniform", 10, 2e-4, 2.0)
  assert abs(at.attack.eps - 8 / 255) < 1e-12 and abs(at.attack.step_size - 2 / 255) < 1e-12
  assert importlib.import_module("configs.vgg16_at_cas").get_config().loss.beta == 3.0
  assert importlib.import_module("configs.wrn34_10_mart_cas").get_config().optim.weight_decay == 5e-4
