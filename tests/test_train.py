"""train_step, optimiser, data parallelism, resume and the end-to-end loop."""
import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
from jax.extend import core as jax_core
import numpy as np
import pytest

from cas_jax import checkpointing
from cas_jax import input_pipeline
from cas_jax.training import train
from configs import default
from tests import fake_devices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(objective="at", cas=True, image_size=8):
  """A tiny ResNet-18(+CAS) setting on small synthetic images."""
  config = default.setting(objective=objective, cas=cas)
  config.data.source = "synthetic"
  config.data.image_size = image_size
  config.data.synthetic_num_train = 64
  config.data.synthetic_num_test = 16
  config.model.width = 4
  config.batch_size = 16
  config.eval_batch_size = 16
  config.attack.steps = 2
  config.eval.steps = 2
  config.eval.num_images = 16
  config.schedule.num_epochs = 2
  config.schedule.milestones = (2,)
  config.ckpt.async_save = False
  config.log_every_steps = 2
  return config


def init_state(config, steps_per_epoch=4):
  model = train.create_model(config, 10)
  size = config.data.image_size
  return train.create_train_state(0, model, config, steps_per_epoch,
                                  (size, size, 3))


def random_batch(config, n=None, seed=0):
  rng = np.random.default_rng(seed)
  n = n or config.batch_size
  size = config.data.image_size
  return {"image": jnp.asarray(rng.random((n, size, size, 3), dtype=np.float32)),
          "label": jnp.asarray(rng.integers(0, 10, n), jnp.int32)}


def count_loops(jaxpr):
  """Loop primitives (scan, while) in a jaxpr, sub-jaxprs included."""
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name in ("scan", "while")
    for sub in jax_core.jaxprs_in_params(eqn.params):
      count += count_loops(sub)
  return count


@pytest.mark.parametrize("objective", ["at", "trades", "mart"])
def test_attack_is_one_compiled_loop(objective):
  config = tiny_config(objective)
  state = init_state(config)
  jaxpr = jax.make_jaxpr(lambda s, b: train.train_step(s, b, jax.random.PRNGKey(0),
                                                       config=config))(state, random_batch(config))
  assert count_loops(jaxpr.jaxpr) == 1


def test_natural_objective_has_no_attack_loop():
  config = tiny_config("natural")
  state = init_state(config)
  jaxpr = jax.make_jaxpr(lambda s, b: train.train_step(s, b, jax.random.PRNGKey(0),
                                                       config=config))(state, random_batch(config))
  assert count_loops(jaxpr.jaxpr) == 0


@pytest.mark.parametrize("objective,batch_norm", [("at", "running"), ("trades", "batch"),
                                                  ("mart", "running")])
def test_training_adversaries_stay_in_ball_and_box(objective, batch_norm):
  config = tiny_config(objective)
  config.attack.batch_norm = batch_norm
  state = init_state(config)
  batch = random_batch(config)
  x = batch["image"].at[0].set(0.0).at[1].set(1.0)  # pixels on both edges of [0, 1]
  x_adv = jax.jit(lambda s, x, y: train.craft_training_adversaries(
      s, x, y, jax.random.PRNGKey(3), config))(state, x, batch["label"])
  assert float(jnp.max(jnp.abs(x_adv - x))) <= config.attack.eps + 1e-6
  assert float(jnp.min(x_adv)) >= 0.0 and float(jnp.max(x_adv)) <= 1.0
  assert float(jnp.max(jnp.abs(x_adv - x))) > 0.5 * config.attack.eps  # it did move


def test_attack_with_batch_statistics_leaves_the_running_averages_to_the_objective():
  config = tiny_config()
  config.attack.batch_norm = "batch"
  state = init_state(config)
  batch = random_batch(config)
  logits_batch, _ = train.attack_model_fn(state, "batch")(batch["image"])
  logits_running, _ = train.attack_model_fn(state, "running")(batch["image"])
  assert not np.allclose(logits_batch, logits_running)  # the modes really differ
  # The attack's batch-statistics passes feed nothing into the running averages: after the
  # step they are those of the objective's one training pass on the adversaries.
  key = jax.random.PRNGKey(3)
  new_state, _ = jax.jit(lambda s, b: train.train_step(s, b, key, config=config))(state, batch)

  @jax.jit
  def one_training_pass(state, x, y):
    x_adv = train.craft_training_adversaries(state, x, y, train.step_keys(key, 0)["attack"],
                                             config)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    return state.apply_fn(variables, x_adv, labels=y, train=True,
                          mutable=["batch_stats"])[1]["batch_stats"]

  chex.assert_trees_all_close(new_state.batch_stats,
                              one_training_pass(state, batch["image"], batch["label"]),
                              rtol=1e-5, atol=1e-6)


def test_weight_decay_and_momentum_match_torch_sgd():
  torch = pytest.importorskip("torch")
  config = tiny_config()
  config.optim.lr, config.optim.weight_decay = 0.1, 0.05
  tx = train.create_optimizer(config, steps_per_epoch=2)  # milestone 2: lr / 10 from step 2
  w0 = np.array([1.0, -2.0, 0.5], np.float32)
  grads = [np.array([0.3, 0.1, -0.2], np.float32) * (i + 1) for i in range(4)]
  params, opt_state = jnp.asarray(w0), tx.init(jnp.asarray(w0))
  for g in grads:
    updates, opt_state = tx.update(jnp.asarray(g), opt_state, params)
    params = params + updates
  w = torch.nn.Parameter(torch.tensor(w0))
  sgd = torch.optim.SGD([w], lr=0.1, momentum=0.9, weight_decay=0.05)
  sched = torch.optim.lr_scheduler.MultiStepLR(sgd, milestones=[2], gamma=0.1)
  for g in grads:
    w.grad = torch.tensor(g)
    sgd.step()
    sched.step()
  chex.assert_trees_all_close(np.asarray(params), w.detach().numpy(), rtol=1e-6, atol=1e-6)


def test_steps_on_real_images_lower_the_loss(tmp_path):
  config = tiny_config("at", image_size=32)
  cifar_dir = os.environ.get("CAS_JAX_CIFAR_DIR")
  if cifar_dir:
    config.data.source, config.data.cifar_dir = "cifar_dir", cifar_dir
  config.data.num_train = 64
  config.batch_size = 64
  config.data.augment = False
  config.optim.lr = 0.05
  dataset = input_pipeline.create_dataset(config)
  state = init_state(config)
  step = jax.jit(lambda s, b: train.train_step(s, b, jax.random.PRNGKey(0), config=config))
  batch = jax.tree.map(jnp.asarray, next(dataset.train_batches(0)))
  first = None
  for _ in range(8):  # the same batch: the training loss on it must fall
    state, metrics = step(state, batch)
    first = float(metrics["train_loss"]) if first is None else first
  _, metrics = step(state, batch)
  assert float(metrics["train_loss"]) < 0.9 * first


def test_bad_config_gives_one_clear_error():
  config = tiny_config()
  config.attack.eps = 8.0
  with pytest.raises(ValueError, match="config.attack.eps=8.0 is outside"):
    train.validate_config(config)
  config = tiny_config()
  config.loss.objective = "pgd"
  with pytest.raises(ValueError, match="valid: natural, at, trades, mart"):
    train.validate_config(config)
  config = tiny_config()
  config.model.cas_stages = "5"
  with pytest.raises(ValueError, match="cas_stages"):
    train.create_model(config, 10)


def run_training(config, workdir):
  state = train.train_and_evaluate(config, str(workdir))
  return jax.device_get(state)


def test_resume_matches_an_uninterrupted_run(tmp_path):
  config = tiny_config()
  full = run_training(config, tmp_path / "full")
  config.schedule.num_epochs = 1
  run_training(config, tmp_path / "resumed")
  config.schedule.num_epochs = 2
  resumed = run_training(config, tmp_path / "resumed")  # the same command again, longer
  assert int(resumed.step) == int(full.step) == 8
  chex.assert_trees_all_close(resumed.params, full.params, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(resumed.batch_stats, full.batch_stats, rtol=1e-5, atol=1e-6)


def test_end_to_end_writes_metrics_and_checkpoints(tmp_path):
  config = tiny_config()
  run_training(config, tmp_path)
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  epochs = [l for l in lines if "epoch" in l]
  assert [l["epoch"] for l in epochs] == [1, 2]
  # Not pgd_acc <= natural_acc: the in-training check counts images correct under PGD whether
  # or not they are correct on x (evaluate.natural_and_pgd_accuracy), and the joint loss can
  # turn a wrong image right on a near-random network (seen: 0.0625 natural, 0.125 PGD).
  assert all(0.0 <= l[k] <= 1.0 for l in epochs for k in ("pgd_acc", "natural_acc"))
  assert any("train_loss" in l for l in lines)
  assert os.listdir(tmp_path / "tensorboard")
  manager = checkpointing.create_manager(str(tmp_path))
  assert manager.latest_step() == 8
  assert checkpointing.best_step(manager) in manager.all_steps()


def test_eight_devices_compute_what_one_device_computes():
  one, eight = (fake_devices.run_script("data_parallel_check.py", n) for n in (1, 8))
  for name in one.files:
    if name != "devices":
      np.testing.assert_allclose(one[name], eight[name], rtol=2e-4, atol=2e-5, err_msg=name)


@pytest.mark.parametrize("override,message", [
    ("--config.model.name=resnet101", "error: unknown model 'resnet101'; valid: resnet18"),
    ("--config.attack.eps=3.0", "error: config.attack.eps=3.0 is outside (0, 1]"),
    ("--config.data.source=cifar_dir", "error: "),
])
def test_main_reports_bad_input_in_one_line(tmp_path, override, message):
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, "main.py"), "--config=configs/smoke.py",
       f"--workdir={tmp_path}", override, f"--config.data.cifar_dir={tmp_path}/missing"],
      cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode != 0
  last_line = result.stderr.strip().splitlines()[-1]
  assert last_line.startswith(message) and "Traceback" not in result.stderr
