"""Adversarial training with CAS: the train state, one compiled `train_step`, and the training loop.

    state, metrics = train_step(state, batch, rng, model=model, config=config)

`train_step` crafts the adversaries with the model in evaluation mode (a `lax.fori_loop`
in `attacks.engine.ascend`), computes the objective of `config.loss` in training mode and
applies one SGD update. `train_and_evaluate(config, workdir)` runs it data-parallel over
every device (a 1-D mesh, batch sharded on "data"), evaluates, logs and checkpoints.
"""
import functools
import math
import time
from typing import Any, Dict, Optional, Tuple

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax.training import train_state
from jax.sharding import NamedSharding, PartitionSpec as P
import tqdm

from cas_jax import checkpointing
from cas_jax import errors
from cas_jax.evaluation import evaluate
from cas_jax import input_pipeline
from cas_jax import losses
from cas_jax.training import metric_writers
from cas_jax import models
from cas_jax import preemption
from cas_jax import provenance
from cas_jax.models import baselines
from cas_jax.attacks import engine

OBJECTIVES = ("natural", "at", "trades", "mart")
BATCH_NORM_MODES = ("running", "batch")
FINITE = "state_finite"  # train_step's flag: every parameter and statistic is finite
DTYPES = models.DTYPES


class TrainState(train_state.TrainState):
  """Flax TrainState that also carries the BatchNorm running averages."""
  batch_stats: Any = None


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raise one UserError naming the fix for a config that cannot train."""
  def check(ok, message):
    if not ok:
      raise errors.UserError(message)
  for name, value, low in [
      ("batch_size", config.batch_size, 1), ("eval_batch_size", config.eval_batch_size, 1),
      ("schedule.num_epochs", config.schedule.num_epochs, 1),
      ("eval.every_epochs", config.eval.every_epochs, 1),
      ("ckpt.every_epochs", config.ckpt.every_epochs, 1),
      ("ckpt.every_steps", config.ckpt.every_steps, 0),
      ("log_every_steps", config.log_every_steps, 1), ("attack.steps", config.attack.steps, 0),
      ("eval.steps", config.eval.steps, 0), ("eval.num_images", config.eval.num_images, 0)]:
    check(value >= low, f"{name}={value}; use an integer >= {low}"
          + (" (0 = off)" if name == "ckpt.every_steps" else ""))
  check(math.isfinite(config.optim.lr) and config.optim.lr > 0,
        f"optim.lr={config.optim.lr}; use a learning rate > 0 (the paper: 0.1)")
  check(0 <= config.optim.momentum < 1, f"optim.momentum={config.optim.momentum}; use [0, 1)")
  check(config.optim.weight_decay >= 0,
        f"optim.weight_decay={config.optim.weight_decay}; use a value >= 0")
  check(config.schedule.gamma > 0, f"schedule.gamma={config.schedule.gamma}; use a value > 0")
  check(all(int(m) >= 1 for m in config.schedule.milestones),
        f"schedule.milestones={config.schedule.milestones}; use epochs >= 1")
  check(config.loss.objective in OBJECTIVES,
        f"loss.objective={config.loss.objective!r}; valid: {', '.join(OBJECTIVES)}")
  check(config.attack.batch_norm in BATCH_NORM_MODES,
        f"attack.batch_norm={config.attack.batch_norm!r}; valid: {', '.join(BATCH_NORM_MODES)}")
  check(config.attack.start in engine.STARTS,
        f"attack.start={config.attack.start!r}; valid: {', '.join(engine.STARTS)}")
  baseline = config.get("baseline", "none")
  check(baseline in baselines.BASELINES,
        f"baseline={baseline!r}; valid: {', '.join(baselines.BASELINES)}")
  check(baseline != "pcl" or config.loss.objective in ("natural", "at"),
        f"baseline='pcl' trains with loss.objective 'at' or 'natural', not "
        f"{config.loss.objective!r}")
  check(config.model.dtype in DTYPES,
        f"model.dtype={config.model.dtype!r}; valid: {', '.join(DTYPES)}")
  models.from_config(config, config.data.num_classes)  # name, width, CAS stages: before any data
  for name in ("attack", "eval"):
    try:
      engine.check_eps(config[name].eps, engine.check_norm(config[name].get("norm", "linf")))
    except ValueError as error:  # engine (cas_jax/attacks) raises plain ValueErrors
      raise errors.UserError(f"config.{name}.{error}") from None
  devices = jax.device_count()
  for name in ("batch_size", "eval_batch_size"):
    check(config[name] % devices == 0,
          f"{name}={config[name]} must be a multiple of the {devices} devices")


# The network of config.model; kept under this name for callers of earlier versions.
create_model = models.from_config


def pcl_start_step(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  """The first step with the PCL term: after loss.pcl_warmup_epochs epochs of CE (the warm-up)."""
  return int(config.loss.get("pcl_warmup_epochs", 0)) * steps_per_epoch


def create_learning_rate_fn(config: ml_collections.ConfigDict, steps_per_epoch: int):
  """lr times gamma from each milestone on: milestone m is the first (1-indexed) epoch at the
  lower rate, as in the authors' scripts (75 -> 74 epochs at lr 0.1)."""
  boundaries = {(int(m) - 1) * steps_per_epoch: config.schedule.gamma
                for m in config.schedule.milestones}
  return optax.piecewise_constant_schedule(config.optim.lr, boundaries)


def create_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int):
  """torch-style SGD: weight decay added to the gradient of every parameter, then momentum."""
  return optax.chain(
      optax.add_decayed_weights(config.optim.weight_decay),
      optax.sgd(create_learning_rate_fn(config, steps_per_epoch),
                momentum=config.optim.momentum, nesterov=config.optim.nesterov))


def create_train_state(seed: int, model, config: ml_collections.ConfigDict,
                       steps_per_epoch: int, image_shape: Tuple[int, ...]) -> TrainState:
  """Initial parameters (drawn from `seed`), BatchNorm statistics and optimiser state."""
  # An "rbg" key: compiling threefry for every parameter tensor takes ~30 s on a CPU.
  key = jax.random.key(seed, impl="rbg")
  images = jnp.zeros((1, *image_shape), jnp.float32)
  variables = jax.jit(lambda k: model.init(k, images, train=False))(key)
  return TrainState.create(apply_fn=model.apply, params=variables["params"],
                           batch_stats=variables["batch_stats"],
                           tx=create_optimizer(config, steps_per_epoch))


def attack_model_fn(state: TrainState, batch_norm: str = "running", sap_key=None):
  """model_fn(x) -> (logits, cas_logits) in evaluation mode, as attacks see the model.

  batch_norm="batch" normalises with the batch's own statistics and discards their update.
  sap_key: the draw of a SAP network (unused by the others).
  """
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  rngs = {} if sap_key is None else {"sap": sap_key}
  if batch_norm == "running":
    return lambda x: state.apply_fn(variables, x, train=False, rngs=rngs)
  return lambda x: state.apply_fn(variables, x, train=False, bn_train=True,
                                  mutable=["batch_stats"], rngs=rngs)[0]


def step_keys(rng: jax.Array, step) -> Dict[str, jax.Array]:
  """The step's three independent streams: the attack's, and the SAP draws of the attack and update.

  The attack folds its key with each example's index 0..n-1, so no other stream may be a
  fold_in of that same key: split(k)[i] IS fold_in(k, i) under JAX's partitionable threefry.
  """
  attack, sap_attack, sap_update = jax.random.split(jax.random.fold_in(rng, step), 3)
  return {"attack": attack, "sap_attack": sap_attack, "sap_update": sap_update}


def craft_training_adversaries(state: TrainState, x: jax.Array, y: jax.Array, key: jax.Array,
                               config: ml_collections.ConfigDict,
                               sap_key: Optional[jax.Array] = None) -> jax.Array:
  """The objective's training adversaries (joint CE for AT / MART, joint KL for TRADES).

  key: the per-example start keys' parent; sap_key: the one draw a SAP network is attacked
  through (the whole attack sees the same pruning; needed by SAP networks only).
  """
  model_fn = attack_model_fn(state, config.attack.batch_norm, sap_key)
  beta = config.loss.beta
  if config.loss.objective == "trades":
    nat_logits, nat_cas = jax.lax.stop_gradient(model_fn(x))
    loss_fn = lambda z: losses.joint_kl(*model_fn(z), nat_logits, nat_cas, beta)
  else:
    loss_fn = lambda z: losses.joint_ce(*model_fn(z), y, beta)
  return engine.ascend(loss_fn, x, eps=config.attack.eps, step_size=config.attack.step_size,
                       steps=config.attack.steps, key=key, start=config.attack.start,
                       norm=config.attack.get("norm", "linf"))


def _pcl_branches(updates) -> list:
  """The (features, prototypes) pairs PrototypeBranch modules sowed, in module order."""
  return [updates["pcl"][name]["branch"][-1] for name in sorted(updates.get("pcl", {}))]


def train_step(state: TrainState, batch: Dict[str, jax.Array], rng: jax.Array, *,
               config: ml_collections.ConfigDict,
               pcl_start: int = 0) -> Tuple[TrainState, Dict[str, jax.Array]]:
  """One update: craft adversaries (eval mode), objective in training mode, SGD step.

  With config.baseline == "pcl", the PCL term (weight loss.pcl_weight) joins the objective
  from step `pcl_start` on (train_and_evaluate: after loss.pcl_warmup_epochs epochs).
  """
  x, y = batch["image"], batch["label"]
  objective, beta, lam = config.loss.objective, config.loss.beta, config.loss.lam
  keys = step_keys(rng, state.step)
  x_adv = None
  if objective != "natural":
    x_adv = craft_training_adversaries(state, x, y, keys["attack"], config, keys["sap_attack"])
  with_pcl = config.get("baseline", "none") == "pcl"
  collections = ["batch_stats", "pcl"] if with_pcl else ["batch_stats"]
  sap_rngs = {"sap": keys["sap_update"]}

  def forward(params, batch_stats, images):
    (logits, cas_logits), updates = state.apply_fn(
        {"params": params, "batch_stats": batch_stats}, images, labels=y, train=True,
        mutable=collections, rngs=sap_rngs)
    return logits, cas_logits, updates["batch_stats"], _pcl_branches(updates)

  def loss_fn(params):
    if objective in ("natural", "at"):
      images, objective_fn = (x, losses.natural_loss) if objective == "natural" else (
          x_adv, losses.at_loss)
      logits, cas_logits, batch_stats, branches = forward(params, state.batch_stats, images)
      if with_pcl:
        weight = jnp.where(state.step >= pcl_start, config.loss.pcl_weight, 0.0)
        loss = losses.pcl_loss(logits, cas_logits, branches, y, beta, weight)
      else:
        loss = objective_fn(logits, cas_logits, y, beta)
    else:  # TRADES / MART: natural and adversarial batches in two training-mode passes.
      nat_logits, nat_cas, batch_stats, _ = forward(params, state.batch_stats, x)
      logits, cas_logits, batch_stats, _ = forward(params, batch_stats, x_adv)
      objective_fn = losses.trades_loss if objective == "trades" else losses.mart_loss
      loss = objective_fn(nat_logits, nat_cas, logits, cas_logits, y, beta, lam)
    return loss, (batch_stats, logits)

  (loss, (batch_stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  # Training-mode CAS masks use the true labels, which leak into the main head's prediction:
  # this accuracy is far above any test accuracy and says nothing about robustness.
  metrics = {"train_loss": loss,
             "train_acc_label_masks": jnp.mean(jnp.argmax(logits, -1) == y),
             FINITE: jnp.all(jnp.stack([jnp.isfinite(v).all() for v in jax.tree.leaves(state)]))}
  return state, metrics


def _ranking(eval_metrics) -> Optional[Dict[str, float]]:
  """The accuracies a checkpoint is saved with (checkpointing ranks "best" by them), or None."""
  return {k: v for k, v in (eval_metrics or {}).items() if k.endswith("acc")} or None


class Diverged(errors.UserError):
  """Training produced a non-finite loss, parameter or statistic (the fix: a lower lr)."""


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Train (resuming from workdir's newest restorable checkpoint), evaluate, checkpoint, log.

  workdir gets config.json and provenance.json (cas_jax/provenance.py); a resume with a config
  that would train another model is refused unless config.allow_config_change is set.
  On SIGTERM / SIGINT the step in flight ends and is checkpointed and logged, then
  preemption.Stopped is raised; a non-finite state raises Diverged before it is checkpointed.
  """
  metric_writers.check_workdir(workdir)
  validate_config(config)
  config_changes = provenance.check_resume(workdir, config)  # before any data is loaded
  # --- Mesh: one data axis over every device of every host.
  mesh = input_pipeline.data_mesh()
  replicated = NamedSharding(mesh, P())

  # --- Input and model.
  dataset = input_pipeline.create_dataset(config)
  steps_per_epoch = dataset.steps_per_epoch
  model = create_model(config, dataset.num_classes)
  train_key, eval_key = jax.random.split(jax.random.PRNGKey(config.seed))
  state = create_train_state(config.seed, model, config, steps_per_epoch,
                             dataset.train_images.shape[1:])

  # --- Checkpoint: resume from the newest one that restores, if any.
  manager = checkpointing.create_manager(workdir, async_save=config.ckpt.async_save)
  state, restored_verified = checkpointing.restore_newest(manager, state)
  state = jax.device_put(state, replicated)
  start_step = int(state.step)
  if start_step:
    logging.info("Resumed from step %d in %s", start_step, workdir)
  provenance.record_run(workdir, config, start_step, config_changes)

  # --- Compiled steps.
  p_train_step = jax.jit(functools.partial(train_step, config=config,
                                           pcl_start=pcl_start_step(config, steps_per_epoch)),
                         donate_argnums=(0,),
                         out_shardings=(replicated, replicated))

  writer = metric_writers.MetricWriter(workdir, resume_step=start_step)
  num_epochs, every_steps = config.schedule.num_epochs, config.ckpt.every_steps
  lr_fn = create_learning_rate_fn(config, steps_per_epoch)
  step = checked_step = start_step  # checked_step: the last step whose state was finite

  def fetch_and_check(metrics) -> Dict[str, float]:
    """The step's metrics on the host; Diverged if the state or the loss is not finite."""
    nonlocal checked_step
    host = {k: float(v) for k, v in jax.device_get(metrics).items()}
    host["lr"] = float(lr_fn(step - 1))
    if not (host.pop(FINITE) and math.isfinite(host["train_loss"])):
      writer.write_scalars(step, host)
      checkpointing.wait_until_finished(manager)
      good = checkpointing.newest_verified_step(manager)
      where = (f"the newest verified checkpoint is step {good} in {manager.directory}"
               if good is not None else "no verified checkpoint was saved")
      if restored_verified:
        advice = f"; lower --config.optim.lr (now {config.optim.lr}) before rerunning"
      else:  # the weights it resumed from may not be the ones that were saved
        advice = (f"; the run resumed from step {start_step}, a checkpoint without an integrity "
                  "manifest whose weights may not be the saved ones: move it out of "
                  f"{manager.directory} and rerun")
      raise Diverged(f"training diverged: non-finite loss or parameters at step {step} (finite "
                     f"at step {checked_step}); {where}" + advice)
    checked_step = step
    return host

  def stop_here(signum, epoch_start=None, images=0, eval_metrics=None):
    """Checkpoint the current step (and the partial epoch's row), then raise Stopped."""
    if epoch_start is not None:
      elapsed = time.time() - epoch_start
      writer.write_scalars(step, {"epoch": step / steps_per_epoch, "epoch_time_s": elapsed,
                                  "train_images_per_s": images / elapsed})
    checkpointing.save(manager, state, metrics=_ranking(eval_metrics))
    raise preemption.Stopped(step, signum)

  def eval_due(epoch: int) -> bool:
    return (epoch + 1) % config.eval.every_epochs == 0 or epoch + 1 >= num_epochs

  def evaluate_epoch(epoch: int, summary: Dict[str, float], train_metrics) -> Dict[str, float]:
    """Evaluate after `epoch` (0-indexed) if it is due; log its summary; the accuracies."""
    eval_metrics = {}
    if eval_due(epoch):
      # A SAP network is checked on its expectation (SAP off); --mode=eval attacks its draws.
      eval_metrics = evaluate.natural_and_pgd_accuracy(
          evaluate.bind_model(baselines.expectation_model(model),
                              {"params": state.params, "batch_stats": state.batch_stats}),
          dataset, config, key=eval_key, mesh=mesh)
    summary = {"epoch": epoch + 1, **summary, **eval_metrics}
    writer.write_scalars(step, summary)
    logging.info("epoch %d/%d step %d: %s", epoch + 1, num_epochs, step, " ".join(
        f"{k}={v:.4g}" for k, v in {**train_metrics, **summary}.items() if k != "epoch"))
    return eval_metrics

  # A stop on an epoch's last step saved it before its evaluation: evaluate and rank it now.
  done = start_step // steps_per_epoch - 1  # the last epoch trained in full
  if (start_step and start_step % steps_per_epoch == 0 and eval_due(done)
      and start_step in manager.all_steps() and manager.metrics(start_step) is None):
    checkpointing.add_metrics(manager, start_step, _ranking(evaluate_epoch(done, {}, {})))

  signals = preemption.StopSignals().install()
  try:
    for epoch in range(start_step // steps_per_epoch, num_epochs):
      first = step - epoch * steps_per_epoch  # > 0 only when resuming mid-epoch
      progress = tqdm.tqdm(total=steps_per_epoch * config.batch_size, unit="img",
                           unit_scale=True, desc=f"epoch {epoch + 1}/{num_epochs}",
                           disable=jax.process_index() != 0, leave=False)
      epoch_start, train_metrics = time.time(), {}
      for i, batch in enumerate(dataset.train_batches(epoch)):
        if i < first:
          continue
        state, metrics = p_train_step(state, input_pipeline.to_global_array(batch, mesh),
                                      train_key)
        step += 1
        progress.update(config.batch_size)
        end_of_epoch = i == steps_per_epoch - 1
        signum = signals.requested(manager, step)
        save_now = every_steps > 0 and step % every_steps == 0
        if step % config.log_every_steps == 0 or end_of_epoch or signum or save_now:
          train_metrics = fetch_and_check(metrics)  # before any save: no non-finite one
          writer.write_scalars(step, train_metrics)
          progress.set_postfix(loss=f"{train_metrics['train_loss']:.3f}")
        if signum:
          progress.close()
          stop_here(signum, epoch_start, (i + 1 - first) * config.batch_size)
        if save_now and not end_of_epoch:
          checkpointing.save(manager, state)
      progress.close()
      epoch_time = time.time() - epoch_start
      eval_metrics = evaluate_epoch(epoch, {
          "epoch_time_s": epoch_time,
          "train_images_per_s": (steps_per_epoch - first) * config.batch_size / epoch_time},
          train_metrics)
      last = epoch + 1 == num_epochs
      if ((epoch + 1) % config.ckpt.every_epochs == 0 or last
          or (every_steps > 0 and step % every_steps == 0)):
        checkpointing.save(manager, state, metrics=_ranking(eval_metrics))
      signum = signals.requested(manager, step)
      if signum and not last:  # the signal came during the evaluation
        stop_here(signum, eval_metrics=eval_metrics)
  finally:
    signals.restore()
    checkpointing.wait_until_finished(manager)
    writer.close()
  return state
