"""Channel analyses: statistics by hand, sown features = classifier input, the analyze command."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cas_jax.analysis import channels as analysis
from cas_jax import checkpointing
from cas_jax import input_pipeline
from cas_jax import models
from cas_jax.training import train
from test_train import tiny_config

# ----------------------------------------------------------------------------- statistics


def test_channel_magnitude_is_the_mean_absolute_value():
  features = np.array([[1.0, -2.0, 0.0], [3.0, 0.0, 4.0]])
  np.testing.assert_allclose(analysis.channel_magnitude(features), [2.0, 1.0, 2.0])


def test_channel_frequency_counts_values_above_a_fraction_of_each_rows_maximum():
  features = np.array([[10.0, 0.05, 0.2, 1.0],     # max 10: 1% = 0.1, 5% = 0.5
                       [0.0, 2.0, 0.019, 0.03],    # max 2: 1% = 0.02, 5% = 0.1
                       [0.5, 1.0, 0.01, 0.05]])    # max 1: 1% = 0.01 (0.01 itself: not above)
  frequency = analysis.channel_frequency(features, threshold=0.01)
  assert frequency.dtype.kind == "i"
  np.testing.assert_array_equal(frequency, [2, 2, 1, 3])
  np.testing.assert_array_equal(analysis.channel_frequency(features, threshold=0.05), [2, 2, 0, 1])
  np.testing.assert_array_equal(analysis.channel_frequency(features[:1], threshold=0.0),
                                [1, 1, 1, 1])


def test_class_separation_is_the_silhouette_computed_by_hand():
  features, labels = np.array([[0.0], [1.0], [10.0], [11.0]]), [0, 0, 1, 1]
  # s = 1 - a / b: a = mean distance within the class, b = to the other class.
  by_hand = np.mean([1 - 1 / 10.5, 1 - 1 / 9.5, 1 - 1 / 9.5, 1 - 1 / 10.5])
  assert analysis.class_separation(features, labels) == pytest.approx(by_hand)
  mixed = np.array([[0.0], [10.0], [1.0], [11.0]])  # each class spans both clusters
  assert analysis.class_separation(mixed, labels) < 0 < analysis.class_separation(features, labels)
  assert np.isnan(analysis.class_separation(features, [0, 0, 0, 0]))


def test_tsne_keeps_two_separated_clusters_apart():
  rng = np.random.default_rng(0)
  points = np.concatenate([rng.normal(0, 1, (20, 8)), rng.normal(30, 1, (20, 8))])
  embedded = analysis.tsne(points, perplexity=5, max_iter=500)
  assert embedded.shape == (40, 2)
  distances = np.linalg.norm(embedded[:, None] - embedded[None], axis=-1)
  np.fill_diagonal(distances, np.inf)
  cluster = np.arange(40) // 20
  np.testing.assert_array_equal(cluster[distances.argmin(1)], cluster)  # neighbours stay
  with pytest.raises(ValueError, match="tsne_perplexity"):
    analysis.tsne(points, perplexity=40)


# ----------------------------------------------------------------------------- sown features


@pytest.mark.parametrize("name,options,classifier,size", [
    ("resnet18", dict(width=4), "linear", 8),
    ("wrn", dict(depth=10, widen_factor=1), "fc", 8),
    ("vgg16", dict(width=4), "layer8", 32),  # five 2x2 max-pools
])
def test_sown_features_are_the_final_classifiers_input(name, options, classifier, size):
  model = models.create(name, 10, **options)
  x = jax.random.uniform(jax.random.key(1), (7, size, size, 3))
  variables = model.init(jax.random.key(0), x[:1], train=False)
  # Nonzero BatchNorm statistics, so evaluation mode differs from a fresh network's.
  variables = jax.tree_util.tree_map(lambda v: v + 0.1, variables)
  logits, cas_logits = model.apply(variables, x, train=False)  # callers that do not ask: as before
  features = analysis.features(model, variables, x, batch_size=3)  # padded, three batches
  dense = variables["params"][classifier]
  np.testing.assert_allclose(features @ dense["kernel"] + dense["bias"], logits,
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(features, analysis.features(model, variables, x), rtol=1e-5, atol=1e-6)
  _, state = model.apply(variables, x, train=False, mutable=["intermediates"])
  assert len(state["intermediates"]["features"]) == 1


def test_resnet_features_are_the_pooled_output_of_the_last_cas_block():
  model = models.create("resnet18", 10, width=4)
  x = jax.random.uniform(jax.random.key(2), (5, 8, 8, 3))
  variables = model.init(jax.random.key(0), x[:1], train=False)
  _, captured = model.apply(variables, x, train=False, capture_intermediates=True,
                            mutable=["intermediates"])
  suppressed, _ = captured["intermediates"]["layer4_1"]["__call__"][0]  # after CAS masking
  np.testing.assert_allclose(analysis.features(model, variables, x),
                             jnp.mean(suppressed, axis=(1, 2)), rtol=1e-5, atol=1e-6)


def test_features_of_an_imported_torch_model_equal_torchs_classifier_input():
  torch = pytest.importorskip("torch")
  import test_interop  # pylint: disable=g-import-not-at-top  (needs torch)
  from cas_jax.models import interop  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  net = test_interop._randomised(test_interop.TorchResNet18(width=4)).eval()
  captured = []
  net.linear.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))
  x = np.random.default_rng(0).random((6, 32, 32, 3), dtype=np.float32)
  with torch.no_grad():
    net(torch.from_numpy(x.transpose(0, 3, 1, 2)))
  variables = interop.from_torch_state_dict("resnet18", net.state_dict(), num_classes=10, width=4)
  ours = analysis.features(models.create("resnet18", 10, width=4), variables, x)
  np.testing.assert_allclose(ours, captured[0].numpy(), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- the command


def _workdir(config, path):
  """A workdir holding one checkpoint of a freshly initialised network (no training needed)."""
  dataset = input_pipeline.create_dataset(config)
  model = models.from_config(config, dataset.num_classes)
  state = train.create_train_state(config.seed, model, config, 1, dataset.test_images.shape[1:])
  manager = checkpointing.create_manager(path, async_save=False)
  checkpointing.save(manager, state)
  manager.wait_until_finished()
  return dataset, model, {"params": state.params, "batch_stats": state.batch_stats}


def analysis_config():
  config = tiny_config()
  config.data.synthetic_num_test = 40
  config.analysis.num_images = 36
  config.analysis.class_index = 3
  config.analysis.tsne_images = 30
  config.analysis.tsne_perplexity = 5.0
  config.analysis.tsne_max_iter = 250
  return config


@pytest.mark.slow
def test_analyze_writes_every_file_with_the_values_of_the_functions(tmp_path):
  config = analysis_config()
  workdir, twin = str(tmp_path / "cas"), str(tmp_path / "twin")
  dataset, model, variables = _workdir(config, workdir)
  shutil.copytree(workdir, twin)
  config.analysis.compare = twin
  analysis.analyze_workdir(config, workdir)
  out = os.path.join(workdir, "analysis")
  assert sorted(os.listdir(out)) == sorted([
      "magnitude.png", "magnitude.json", "frequency_class3.png", "frequency_class3.json",
      "tsne.png", "tsne.npz", "features.npz", "summary.md", "summary.json"])
  x = dataset.test_images[:36].astype(np.float32) / 255
  y = dataset.test_labels[:36]
  key = jax.random.fold_in(jax.random.key(config.seed), 2)
  x_adv = analysis.adversarial_examples(model, variables, x, y, key=key, eps=8 / 255, steps=2,
                                        loss="joint_ce", beta=2.0)
  assert np.abs(x_adv - x).max() <= 8 / 255 + 1e-6 and np.abs(x_adv - x).max() > 0
  expected = {"natural": analysis.features(model, variables, x),
              "adversarial": analysis.features(model, variables, x_adv)}
  saved = np.load(os.path.join(out, "features.npz"))
  magnitude = json.load(open(os.path.join(out, "magnitude.json")))["models"]
  frequency = json.load(open(os.path.join(out, "frequency_class3.json")))
  assert frequency["class_images"] == int(np.sum(y == 3)) > 0
  assert set(magnitude) == {"cas", "twin"}
  for label in ("cas", "twin"):  # the twin holds the same checkpoint: the same numbers
    for kind, feats in expected.items():
      np.testing.assert_allclose(saved[f"{label}/{kind}"], feats, rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(magnitude[label][kind], analysis.channel_magnitude(feats),
                                 rtol=1e-5)
      for t in (0.005, 0.01, 0.05):
        np.testing.assert_array_equal(frequency["models"][label][str(t)][kind],
                                      analysis.channel_frequency(feats[y == 3], t))
  numbers = json.load(open(os.path.join(out, "summary.json")))["models"]
  for kind, feats in expected.items():
    assert numbers["cas"][kind]["separation"] == pytest.approx(
        analysis.class_separation(feats, y), abs=1e-5)
    assert numbers["twin"][kind]["mean_magnitude"] == pytest.approx(
        analysis.channel_magnitude(feats).mean(), rel=1e-5)
  tsne = np.load(os.path.join(out, "tsne.npz"))
  assert tsne["cas/natural"].shape == (30, 2) and tsne["twin/adversarial"].shape == (30, 2)
  np.testing.assert_array_equal(tsne["labels"], y[:30])
  summary = open(os.path.join(out, "summary.md")).read()
  for words in ("resnet18 (width 4", "last checkpoint (step 0)", "first 36 test images",
                "PGD-2 on `joint_ce`", "eps 8/255"):
    assert words in summary
  # A twin without CAS needs its placement: the error says which setting.
  config.analysis.compare_cas_stages = "none"
  with pytest.raises(ValueError, match="only in the checkpoint.*compare_cas_stages"):
    analysis.analyze_workdir(config, workdir)


def test_analyze_without_a_checkpoint_names_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match="train first"):
    analysis.analyze_workdir(analysis_config(), str(tmp_path))
  config = analysis_config()
  config.analysis.class_index = 10
  with pytest.raises(ValueError, match="class_index=10"):
    analysis.analyze_workdir(config, str(tmp_path))
  config = analysis_config()
  config.analysis.tsne_perplexity = 30.0  # with 30 t-SNE points
  with pytest.raises(ValueError, match="tsne_perplexity=30.0 must lie in"):
    analysis.analyze_workdir(config, str(tmp_path))


def test_a_pytorch_checkpoint_is_loaded_with_the_configs_architecture(tmp_path):
  torch = pytest.importorskip("torch")
  import test_interop  # pylint: disable=g-import-not-at-top  (needs torch)
  from cas_jax.models import interop  # pylint: disable=g-import-not-at-top
  net = test_interop.TorchResNet18(width=4)
  path = str(tmp_path / "resnet18_cas.pth")
  torch.save({"state_dict": net.state_dict()}, path)
  config = analysis_config()
  loaded = analysis._load(config, path, "", 10, (32, 32, 3))  # pylint: disable=protected-access
  assert loaded["label"] == "resnet18_cas" and "PyTorch checkpoint" in loaded["where"]
  expected = interop.from_torch_state_dict("resnet18", net.state_dict(), num_classes=10, width=4)
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded["variables"], expected)
