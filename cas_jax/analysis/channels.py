"""The paper's channel analyses: penultimate features -> statistics (pure) -> figures and numbers.

    from cas_jax.analysis import channels as analysis
    f = analysis.features(model, variables, x)               # (N, C) classifier inputs, eval mode
    analysis.channel_magnitude(f)                            # (C,) mean |f| (Fig. 1)
    analysis.channel_frequency(f[y == 0], threshold=0.01)    # (C,) activation counts (Fig. 2)
    analysis.tsne(f)                                         # (N, 2) embedding (Fig. 9)
    analysis.class_separation(f, y)                          # silhouette by true class

    python main.py --config=configs/cifar_subset.py --workdir=W --mode=analyze \
      --config.analysis.compare=W2 --config.analysis.compare_cas_stages=none

`analyze_workdir` writes W/analysis/: Fig. 1 (magnitude.png/.json), Fig. 2 with Fig. 10's
thresholds (frequency_class<k>.png/.json), Fig. 9 (tsne.png/.npz), the features
(features.npz) and summary.md/.json, for natural test images and their adaptive PGD adversaries.
"""
import functools
import os
import re
import time
from typing import Any, Dict, List

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from cas_jax import errors
from cas_jax import input_pipeline
from cas_jax.models import loading
from cas_jax import models
from cas_jax.attacks import engine
from cas_jax.attacks.white_box import pgd

# ----------------------------------------------------------------------------- statistics


def channel_magnitude(features) -> np.ndarray:
  """(C,) mean over examples of |feature| per channel (Fig. 1)."""
  return np.mean(np.abs(np.asarray(features, np.float64)), axis=0)


def channel_frequency(features, threshold: float = 0.01) -> np.ndarray:
  """(C,) per channel, how many examples exceed `threshold` x their own largest channel value."""
  features = np.asarray(features, np.float64)
  largest = features.max(axis=1, keepdims=True)
  return np.sum(features > threshold * largest, axis=0).astype(np.int64)


def class_separation(features, labels) -> float:
  """Silhouette score of the features grouped by true class, Euclidean (-1..1; Fig. 9's claim).

  High when each class is compact and far from the others: the paper's t-SNE claim for CAS,
  measured on the features themselves rather than on their 2-D embedding.
  """
  from sklearn.metrics import silhouette_score  # pylint: disable=g-import-not-at-top
  labels = np.asarray(labels)
  if len(np.unique(labels)) < 2:
    return float("nan")  # undefined for one class
  return float(silhouette_score(np.asarray(features, np.float64), labels, metric="euclidean"))


def tsne(features, *, perplexity: float = 30.0, max_iter: int = 1000, seed: int = 0) -> np.ndarray:
  """(N, 2) t-SNE embedding of the features (scikit-learn, PCA init; Fig. 9)."""
  from sklearn.manifold import TSNE  # pylint: disable=g-import-not-at-top
  features = np.asarray(features, np.float32)
  if not 0 < perplexity < len(features):
    raise errors.UserError(
        f"t-SNE perplexity {perplexity} must lie in (0, {len(features)}), the number "
        "of points: lower analysis.tsne_perplexity or use more images")
  return TSNE(perplexity=perplexity, max_iter=max_iter, init="pca", learning_rate="auto",
              random_state=seed).fit_transform(features)


# ----------------------------------------------------------------------------- the model's side


def _sharded_map(fn, arrays: List[np.ndarray], batch_size: int):
  """fn over batches of `arrays` (split on axis 0, sharded over every device), numpy outputs."""
  devices, count = jax.device_count(), len(arrays[0])
  batch_size = -(-min(batch_size, count) // devices) * devices
  mesh = input_pipeline.data_mesh()
  parts = []
  for start in range(0, count, batch_size):
    take = np.arange(start, min(start + batch_size, count))
    rows = np.concatenate([take, np.full(batch_size - take.size, take[0])])  # pad with row 0
    outputs = fn(*input_pipeline.to_global_array([a[rows] for a in arrays], mesh))
    parts.append(jax.tree_util.tree_map(lambda o, n=take.size: np.asarray(o)[:n], outputs))
  return jax.tree_util.tree_map(lambda *p: np.concatenate(p), *parts)


def _replicated(variables):
  return jax.device_put(variables, NamedSharding(input_pipeline.data_mesh(), P()))


@functools.partial(jax.jit, static_argnums=0)
def _features_and_predictions(model, variables, x):
  outputs, state = model.apply(variables, x, train=False, mutable=["intermediates"])
  sown = state["intermediates"]["features"]  # sow appends to a tuple: one entry per call
  return sown[-1].astype(jnp.float32), jnp.argmax(engine.split_outputs(outputs)[0], -1)


def features_and_predictions(model, variables, x, batch_size: int = 256):
  """(features (N, C), predicted classes (N,)) of `model` in evaluation mode."""
  x = np.asarray(x, np.float32)
  run = functools.partial(_features_and_predictions, model, _replicated(variables))
  return _sharded_map(run, [x], batch_size)


def features(model, variables, x, batch_size: int = 256) -> np.ndarray:
  """(N, C) input of the final classifier (after CAS suppression), evaluation mode, batched."""
  return features_and_predictions(model, variables, x, batch_size)[0]


@functools.partial(jax.jit, static_argnames=("model", "eps", "steps", "step_size", "loss", "beta"))
def _pgd_batch(variables, x, y, index, key, *, model, eps, steps, step_size, loss, beta):
  apply_fn = lambda z: model.apply(variables, z, train=False)
  return pgd(apply_fn, x, y, eps=eps, steps=steps, step_size=step_size, loss=loss, beta=beta,
             key=engine.index_keys(key, index))


def adversarial_examples(model, variables, x, y, *, key, eps: float = 8 / 255, steps: int = 20,
                         step_size=None, loss: str = "joint_ce", beta: float = 2.0,
                         batch_size: int = 256) -> np.ndarray:
  """PGD adversaries (default adaptive PGD-20, step eps/10); image i starts from fold_in(key, i)."""
  x, y = np.asarray(x, np.float32), np.asarray(y, np.int32)
  run = functools.partial(_pgd_batch, _replicated(variables), model=model, eps=float(eps),
                          steps=int(steps), step_size=step_size, loss=loss, beta=float(beta))
  return _sharded_map(lambda *a: run(*a, key), [x, y, np.arange(len(y), dtype=np.int32)],
                      batch_size)


# ----------------------------------------------------------------------------- one model


def _load(config, source: str, cas_stages: str, num_classes: int, image_shape) -> Dict[str, Any]:
  """{'label', 'model', 'variables', 'where'} of a workdir's last checkpoint or a .pth file."""
  config = config.copy_and_resolve_references()
  if cas_stages:
    config.model.cas_stages = cas_stages
  loaded = loading.load(config, source, num_classes, image_shape)
  label = loaded.label
  if loaded.step is not None:  # a workdir: its name (with its setting's, for a seed folder)
    parent, name = os.path.split(os.path.normpath(source))
    label = f"{os.path.basename(parent)}/{name}" if re.fullmatch(r"seed\d+", name) else name
  return {"label": label, "model": loaded.model, "variables": loaded.variables,
          "where": f"{config.model.name} (width {config.model.width or 'full'}, CAS stages "
                   f"{config.model.cas_stages}), {loaded.where}"}


def analyze_model(model, variables, x, y, config, key) -> Dict[str, Any]:
  """Features, accuracies and every statistic of one model on x and its PGD adversaries."""
  settings, evaluation = config.analysis, config.eval
  batch = config.eval_batch_size
  start = time.perf_counter()
  x_adv = adversarial_examples(
      model, variables, x, y, key=key, eps=evaluation.eps, steps=evaluation.steps,
      step_size=evaluation.step_size or None, loss=evaluation.loss, beta=config.loss.beta,
      batch_size=batch)
  logging.info("PGD-%d on %d images: %.1f s", evaluation.steps, len(y), time.perf_counter() - start)
  result = {"labels": np.asarray(y)}
  for kind, images in (("natural", x), ("adversarial", x_adv)):
    feats, predicted = features_and_predictions(model, variables, images, batch)
    in_class = feats[np.asarray(y) == settings.class_index]
    tsne_count = settings.tsne_images or len(y)
    result[kind] = {
        "features": feats, "accuracy": float(np.mean(predicted == y)),
        "magnitude": channel_magnitude(feats),
        "frequency": {str(t): channel_frequency(in_class, t) for t in settings.thresholds},
        "separation": class_separation(feats, y),
        "tsne": tsne(feats[:tsne_count], perplexity=settings.tsne_perplexity,
                     max_iter=settings.tsne_max_iter, seed=config.seed)}
    logging.info("%s: accuracy %.3f, features and t-SNE done", kind, result[kind]["accuracy"])
  return result


# ----------------------------------------------------------------------------- the command


def _check_settings(settings, num_classes: int, count: int) -> None:
  """ValueError naming the fix for settings that cannot work, before any attack runs."""
  points = min(settings.tsne_images or count, count)
  if not 0 < settings.tsne_perplexity < points:
    raise errors.UserError(
        f"config.analysis.tsne_perplexity={settings.tsne_perplexity} must lie in "
        f"(0, {points}), the number of t-SNE points (analysis.tsne_images)")
  if not 0 <= settings.class_index < num_classes:
    raise errors.UserError(f"config.analysis.class_index={settings.class_index} is not a class; "
                            f"choose one in 0..{num_classes - 1}")
  if not settings.thresholds or any(not 0 <= t < 1 for t in settings.thresholds):
    raise errors.UserError(f"config.analysis.thresholds={settings.thresholds!r}; give fractions in "
                            "[0, 1), e.g. (0.005, 0.01, 0.05)")


def analyze_workdir(config, workdir: str) -> Dict[str, Dict[str, Any]]:
  """Write workdir/analysis/ (Figs. 1, 2/10 and 9 as PNG, their numbers, summary.md).

  The model is workdir's last checkpoint or config.eval.torch_checkpoint; config.analysis.compare
  (a workdir or .pth) adds a second model to every figure.
  """
  from cas_jax.analysis import figures as analysis_figures  # pylint: disable=g-import-not-at-top
  settings = config.analysis
  models.from_config(config, config.data.num_classes)  # a bad model.name before any data
  dataset = input_pipeline.create_dataset(config)
  count = min(settings.num_images or dataset.num_test, dataset.num_test)
  _check_settings(settings, dataset.num_classes, count)
  x = dataset.test_images[:count].astype(np.float32) / np.float32(255)
  y = dataset.test_labels[:count].astype(np.int32)
  shape = dataset.test_images.shape[1:]
  torch_path = config.eval.get("torch_checkpoint", "")
  if torch_path and not os.path.isfile(torch_path):
    raise FileNotFoundError(f"config.eval.torch_checkpoint={torch_path!r} is not a file")
  loaded = [_load(config, torch_path or workdir, "", dataset.num_classes, shape)]
  if settings.compare:
    if not os.path.exists(settings.compare):
      raise FileNotFoundError(f"config.analysis.compare={settings.compare!r} does not exist; "
                              "give another workdir or a .pth file")
    try:
      loaded.append(_load(config, settings.compare, settings.compare_cas_stages,
                          dataset.num_classes, shape))
    except errors.UserError as error:  # e.g. its checkpoint does not fit this config's network
      raise errors.UserError(f"{error}; for the compared model set config.analysis."
                              "compare_cas_stages (e.g. none for a model without CAS)") from None
    if loaded[1]["label"] == loaded[0]["label"]:
      loaded[1]["label"] += " (compare)"
  key = jax.random.fold_in(jax.random.key(config.seed), 2)
  results = {}
  for entry in loaded:
    results[entry["label"]] = analyze_model(entry["model"], entry["variables"], x, y, config, key)
    results[entry["label"]]["where"] = entry["where"]
  out_dir = os.path.join(workdir, "analysis")
  os.makedirs(out_dir, exist_ok=True)
  analysis_figures.write_all(out_dir, results, config, count,
                             f"{config.data.dataset} (source: {config.data.source})")
  print(f"Wrote the analyses to {out_dir}", flush=True)
  return results
