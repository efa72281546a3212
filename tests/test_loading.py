"""loading: one path from a workdir checkpoint (or a .pth, tested in test_evaluate/test_analysis)
to a network and its weights, with one error line naming the fix when it cannot."""
import logging

import chex
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
import pytest

from cas_jax import checkpointing
from cas_jax.models import loading
from cas_jax import models
from configs import smoke

SHAPE = (32, 32, 3)


def _config(width=4):
  config = smoke.get_config()
  config.model.width = width
  return config


@pytest.fixture(name="workdir")
def fixture_workdir(tmp_path):
  """A workdir with one checkpoint (step 5, no metrics) of the width-4 smoke network."""
  model = models.from_config(_config(), 10)
  variables = model.init(jax.random.key(3), jnp.zeros((1, *SHAPE)), train=False)
  manager = checkpointing.create_manager(str(tmp_path), async_save=False)
  manager.save(5, args=ocp.args.StandardSave({**variables, "step": jnp.int32(5)}))
  manager.wait_until_finished()
  return str(tmp_path), variables


def test_load_returns_the_saved_weights_in_the_configs_network(workdir):
  path, saved = workdir
  loaded = loading.load(_config(), path, 10, SHAPE)
  assert (loaded.label, loaded.step) == ("last", 5) and "step 5" in loaded.where
  chex.assert_trees_all_equal(jax.device_get(loaded.variables), jax.device_get(saved))
  x = jax.random.uniform(jax.random.key(0), (2, *SHAPE))
  logits, _ = loaded.model.apply(loaded.variables, x, train=False)
  chex.assert_shape(logits, (2, 10))


def test_a_network_other_than_the_trained_one_is_named_in_the_error(workdir):
  with pytest.raises(ValueError, match="set config.model"):
    loading.load(_config(width=8), workdir[0], 10, SHAPE)


def test_a_workdir_without_checkpoints_names_both_ways_out(tmp_path):
  with pytest.raises(FileNotFoundError, match="train first.*torch_checkpoint"):
    loading.load(_config(), str(tmp_path), 10, SHAPE)


def test_evaluation_targets_skip_a_missing_best_and_refuse_when_nothing_is_left(workdir, caplog):
  config = _config()
  config.eval.checkpoints = "last,best"
  with caplog.at_level(logging.WARNING):
    targets = loading.load_evaluation_targets(config, workdir[0], 10, SHAPE)
  assert [(t.label, t.step) for t in targets] == [("last", 5)]
  assert "No best checkpoint" in caplog.text
  config.eval.checkpoints = "best"
  with pytest.raises(FileNotFoundError, match="use --config.eval.checkpoints=last"):
    loading.load_evaluation_targets(config, workdir[0], 10, SHAPE)
  config.eval.checkpoints = "last,worst"
  with pytest.raises(ValueError, match="subset of last, best"):
    loading.load_evaluation_targets(config, workdir[0], 10, SHAPE)


def test_transfer_source_is_none_unless_set_and_a_workdir_loads_like_the_target(workdir):
  config = _config()
  assert loading.load_transfer_source(config, 10, SHAPE) is None
  config.eval.transfer_checkpoint = workdir[0]
  source = loading.load_transfer_source(config, 10, SHAPE)
  chex.assert_trees_all_equal(jax.device_get(source.variables), jax.device_get(workdir[1]))
