"""Tests for cas_jax.models: the CAS module, the three networks, and models.create."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cas_jax import models
from cas_jax.models import cas as cas_lib

NUM_CLASSES = 5


def _images(n=4, seed=0):
  return jax.random.uniform(jax.random.key(seed), (n, 32, 32, 3))


def _init(model, x):
  # A jitted init with an "rbg" key compiles in seconds; threefry takes ~20 s on 2 CPU cores.
  init_fn = jax.jit(lambda key, x: model.init(key, x, train=False))
  return init_fn(jax.random.key(0, impl="rbg"), x)


# ------------------------------------------------------------------------- the CAS module


def _hand_cas_variables():
  # K = 3 channels, C = 2 classes. The bias makes class 0 win although column 1 is larger.
  kernel = jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
  bias = jnp.array([100.0, -100.0])
  return {"params": {"fc": {"kernel": kernel, "bias": bias}}}, kernel, bias


def _hand_features():
  # N = 2, H = 1, W = 2, K = 3.
  return jnp.array([[[[1.0, 0.0, 2.0], [3.0, 2.0, 0.0]]],
                    [[[0.5, 1.0, 1.0], [1.5, 1.0, 3.0]]]])


def test_cas_mask_uses_label_column_in_training():
  variables, kernel, _ = _hand_cas_variables()
  features = _hand_features()
  out, logits = cas_lib.CAS(2).apply(variables, features, labels=jnp.array([1, 0]), train=True)
  expected = jnp.stack([features[0] * jnp.array([2.0, 4.0, 6.0]),
                        features[1] * jnp.array([1.0, 3.0, 5.0])])
  chex.assert_trees_all_close(out, expected)
  pooled = jnp.array([[2.0, 1.0, 1.0], [1.0, 1.0, 2.0]])
  chex.assert_trees_all_close(logits, pooled @ kernel + jnp.array([100.0, -100.0]))


def test_cas_mask_uses_predicted_column_without_bias_in_evaluation():
  variables, _, _ = _hand_cas_variables()
  features = _hand_features()
  # Labels are ignored in evaluation mode; the bias (not the column sizes) makes class 0 the
  # prediction, and the mask is the bare column 0 (1, 3, 5), not column + bias.
  out, logits = cas_lib.CAS(2).apply(variables, features, labels=jnp.array([1, 1]), train=False)
  np.testing.assert_array_equal(np.argmax(logits, -1), [0, 0])
  chex.assert_trees_all_close(out, features * jnp.array([1.0, 3.0, 5.0]))


def test_cas_without_suppression_passes_features_through():
  variables, _, _ = _hand_cas_variables()
  features = _hand_features()
  module = cas_lib.CAS(2, suppress=False)
  for train in (True, False):
    out, logits = module.apply(variables, features, labels=jnp.array([1, 0]), train=train)
    chex.assert_trees_all_equal(out, features)
    _, suppressed_logits = cas_lib.CAS(2).apply(variables, features, labels=jnp.array([1, 0]),
                                                train=train)
    chex.assert_trees_all_close(logits, suppressed_logits)


def test_cas_training_mode_without_labels_raises():
  variables, _, _ = _hand_cas_variables()
  with pytest.raises(ValueError, match="labels"):
    cas_lib.CAS(2).apply(variables, _hand_features(), train=True)


def test_cas_param_names_and_torch_default_init():
  variables = cas_lib.CAS(7).init(jax.random.key(0), jnp.ones((2, 4, 4, 100)))
  fc = variables["params"]["fc"]
  chex.assert_shape(fc["kernel"], (100, 7))
  chex.assert_shape(fc["bias"], (7,))
  assert float(jnp.max(jnp.abs(fc["kernel"]))) <= 0.1 and float(jnp.max(jnp.abs(fc["bias"]))) <= 0.1


@pytest.mark.parametrize("train", [True, False])
def test_gradient_reaches_kernel_through_suppressed_features(train):
  variables, kernel, _ = _hand_cas_variables()
  features = _hand_features()
  labels = jnp.array([1, 0])

  def suppressed_sum(params, suppress=True):
    out, _ = cas_lib.CAS(2, suppress=suppress).apply({"params": params}, features, labels=labels,
                                                     train=train)
    return jnp.sum(out)

  grads = jax.grad(suppressed_sum)(variables["params"])
  # d sum(f * M[:, c_n]) / d M[k, c] = sum over examples with c_n = c of sum_{h,w} f[n, h, w, k].
  classes = labels if train else jnp.array([0, 0])
  per_example = jnp.sum(features, axis=(1, 2))  # (N, K)
  expected = per_example.T @ jax.nn.one_hot(classes, 2)
  chex.assert_trees_all_close(grads["fc"]["kernel"], expected)
  chex.assert_trees_all_close(grads["fc"]["bias"], jnp.zeros(2))
  # Without suppression only the logits depend on the kernel.
  no_suppress = jax.grad(lambda p: suppressed_sum(p, suppress=False))(variables["params"])
  chex.assert_trees_all_close(no_suppress["fc"]["kernel"], jnp.zeros_like(kernel))


def test_gradient_reaches_kernel_through_cas_logits():
  variables, _, _ = _hand_cas_variables()
  features = _hand_features()
  weights = jnp.array([[1.0, -2.0], [0.5, 3.0]])

  def weighted_logits(params):
    _, logits = cas_lib.CAS(2).apply({"params": params}, features, train=False)
    return jnp.sum(logits * weights)

  grads = jax.grad(weighted_logits)(variables["params"])
  pooled = jnp.mean(features, axis=(1, 2))
  chex.assert_trees_all_close(grads["fc"]["kernel"], pooled.T @ weights)
  chex.assert_trees_all_close(grads["fc"]["bias"], jnp.sum(weights, axis=0))


def test_batch_norm_updates_running_variance_like_torch():
  x = jax.random.normal(jax.random.key(1), (3, 2, 2, 4)) * 2.0 + 1.0
  module = cas_lib.BatchNorm(use_running_average=False)
  variables = module.init(jax.random.key(0), x)
  y, updates = module.apply(variables, x, mutable=["batch_stats"])
  flat = np.asarray(x).reshape(-1, 4)
  mean, biased, unbiased = flat.mean(0), flat.var(0), flat.var(0, ddof=1)
  chex.assert_trees_all_close(y, (x - mean) / np.sqrt(biased + 1e-5), atol=1e-5)
  chex.assert_trees_all_close(updates["batch_stats"]["mean"], 0.1 * mean, atol=1e-6)
  chex.assert_trees_all_close(updates["batch_stats"]["var"], 0.9 + 0.1 * unbiased, atol=1e-6)


# ------------------------------------------------------------------------- networks: shapes


def _abstract(model, n=2):
  x = jnp.zeros((n, 32, 32, 3))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  outputs = jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)
  return variables, outputs


@pytest.mark.parametrize("name, options, cas_modules", [
    ("resnet18", dict(width=4), {"layer4_0": 32, "layer4_1": 32}),
    ("resnet18", dict(width=8, cas_stages=(3,)), {"layer3_0": 32, "layer3_1": 32}),
    ("resnet18", dict(width=4, cas_stages=[4, 1, 2, 3]),
     {f"layer{s}_{b}": 4 * 2**(s - 1) for s in (1, 2, 3, 4) for b in (0, 1)}),
    ("resnet18", dict(width=4, cas_stages=()), {}),
    ("resnet34", dict(width=4, cas_stages=(3, 4)),
     {**{f"layer3_{b}": 16 for b in range(6)}, **{f"layer4_{b}": 32 for b in range(3)}}),
    # Bottlenecks: stage s outputs 4 * width * 2**(s - 1) channels.
    ("resnet50", dict(width=4), {f"layer4_{b}": 128 for b in range(3)}),
    ("resnet50", dict(width=4, cas_stages=(2,)), {f"layer2_{b}": 32 for b in range(4)}),
    ("wrn", dict(depth=10, widen_factor=1), {"block3_0": 32, "extra_cas": 64}),
    ("wrn", dict(depth=16, widen_factor=2), {"block3_1": 128, "extra_cas": 128}),
    ("wrn", dict(depth=10, widen_factor=1, cas_stages=()), {}),
    ("vgg16", dict(width=4), {"layer5_0": 32, "layer5_1": 32, "layer5_2": 32}),
    ("vgg16", dict(width=4, cas_stages=()), {}),
    # RobustBench's families: no CAS unless asked for.
    ("wide_resnet", dict(depth=10, widen_factor=1), {}),
    ("wide_resnet", dict(depth=10, widen_factor=1, cas_stages=None),
     {"block3_0": 32, "extra_cas": 64}),
    ("preact_resnet18", dict(width=4), {}),
    ("preact_resnet34", dict(width=4, cas_stages=(3, 4)),
     {**{f"layer3_{b}": 16 for b in range(6)}, **{f"layer4_{b}": 32 for b in range(3)}}),
    ("dm_wide_resnet", dict(depth=10, width=1, cas_stages=None),
     {"block3_0": 32, "extra_cas": 64}),
    ("dm_preact_resnet", dict(width=4, cas_stages=(4,)), {"layer4_0": 32, "layer4_1": 32}),
])
def test_output_shapes_and_cas_heads(name, options, cas_modules):
  variables, (logits, cas_logits) = _abstract(models.create(name, NUM_CLASSES, **options))
  chex.assert_shape(logits, (2, NUM_CLASSES))
  assert len(cas_logits) == len(cas_modules)
  for head in cas_logits:
    chex.assert_shape(head, (2, NUM_CLASSES))
  params = variables["params"]
  for module, channels in cas_modules.items():
    inner = params[module] if module == "extra_cas" else params[module]["cas"]
    chex.assert_shape(inner["fc"]["kernel"], (channels, NUM_CLASSES))
  with_cas = {k for k, v in params.items() if "cas" in v or k == "extra_cas"}
  assert with_cas == set(cas_modules)


def test_full_width_parameter_counts_match_torch():
  def count(name):
    variables, _ = _abstract(models.create(name))
    return sum(a.size for a in jax.tree.leaves(variables["params"]))
  # torch's ResNet-18 / WRN-34-10 / VGG16-BN counts, plus (K * 10 + 10) per CAS head;
  # ResNet-50: the CIFAR Bottleneck network of kuangliu/pytorch-cifar (23,520,842).
  assert count("resnet18") == 11_173_962 + 2 * (512 * 10 + 10)
  assert count("resnet50") == 23_520_842 + 3 * (2048 * 10 + 10)
  assert count("wrn34_10") == 46_160_474 + 2 * (640 * 10 + 10)
  cas = jax.eval_shape(lambda: models.create("vgg16", cas_stages=()).init(
      jax.random.key(0), jnp.zeros((2, 32, 32, 3))))
  plain = sum(a.size for a in jax.tree.leaves(cas["params"]))
  assert count("vgg16") == plain + 3 * (512 * 10 + 10)


def test_bfloat16_computation_keeps_float32_params_and_outputs():
  variables, (logits, cas_logits) = _abstract(
      models.create("resnet18", NUM_CLASSES, width=4, dtype=jnp.bfloat16))
  assert {a.dtype for a in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  assert logits.dtype == jnp.float32 and all(c.dtype == jnp.float32 for c in cas_logits)


# ------------------------------------------------------------------------- networks: modes


@pytest.fixture(scope="module")
def small_resnet():
  model = models.create("resnet18", NUM_CLASSES, width=4)
  variables = _init(model, _images())
  return model, variables


def test_evaluation_ignores_labels_and_is_per_example(small_resnet):
  model, variables = small_resnet
  x = _images()
  logits, cas_logits = model.apply(variables, x, train=False)
  relabelled, _ = model.apply(variables, x, labels=jnp.array([0, 1, 2, 3]), train=False)
  chex.assert_trees_all_close(logits, relabelled)
  single, single_cas = model.apply(variables, x[1:2], train=False)
  expected = (logits[1:2], tuple(c[1:2] for c in cas_logits))
  chex.assert_trees_all_close((single, single_cas), expected, atol=1e-5)


def test_training_uses_labels_and_updates_batch_stats(small_resnet):
  model, variables = small_resnet
  x = _images()
  (logits_a, _), updates = model.apply(variables, x, labels=jnp.array([0, 1, 2, 3]), train=True,
                                       mutable=["batch_stats"])
  (logits_b, _), _ = model.apply(variables, x, labels=jnp.array([4, 4, 4, 4]), train=True,
                                 mutable=["batch_stats"])
  assert not np.allclose(logits_a, logits_b)
  old = variables["batch_stats"]["layer1_0"]["bn1"]["mean"]
  new = updates["batch_stats"]["layer1_0"]["bn1"]["mean"]
  assert not np.allclose(old, new)
  with pytest.raises(ValueError, match="labels"):
    model.apply(variables, x, train=True, mutable=["batch_stats"])


def test_bn_train_override_uses_batch_stats_with_predicted_masks():
  # One block per stage: a single CAS head, whose input does not depend on any mask.
  model = models.ResNet(stage_sizes=(1, 1, 1, 1), num_classes=NUM_CLASSES, width=4)
  x = _images()
  variables = _init(model, x)
  (logits, cas_logits), updates = model.apply(variables, x, train=False, bn_train=True,
                                              mutable=["batch_stats"])
  predicted = jnp.argmax(cas_logits[0], axis=-1)
  (train_logits, _), train_updates = model.apply(variables, x, labels=predicted, train=True,
                                                 mutable=["batch_stats"])
  chex.assert_trees_all_close((logits, updates), (train_logits, train_updates), atol=1e-5)
  eval_logits, eval_cas_logits = model.apply(variables, x, train=False)
  assert not np.allclose(logits, eval_logits, atol=1e-3)
  # And train=True, bn_train=False: running averages with label masks, nothing to update.
  eval_predicted = jnp.argmax(eval_cas_logits[0], axis=-1)
  logits_running, _ = model.apply(variables, x, labels=eval_predicted, train=True, bn_train=False)
  chex.assert_trees_all_close(logits_running, eval_logits, atol=1e-5)


def test_wrn_cas_reads_bn1_relu_and_masks_only_the_residual_branch():
  model = models.create("wrn", NUM_CLASSES, depth=16, widen_factor=1)
  x = _images()
  variables = _init(model, x)

  def intermediates(params):
    (_, cas_logits), state = model.apply({**variables, "params": params}, x, train=False,
                                         capture_intermediates=True, mutable=["intermediates"])
    return cas_logits, state["intermediates"]

  cas_logits, inner = intermediates(variables["params"])
  fc = variables["params"]["block3_1"]["cas"]["fc"]
  activated = jax.nn.relu(inner["block3_1"]["bn1"]["__call__"][0])
  expected = jnp.mean(activated, (1, 2)) @ fc["kernel"] + fc["bias"]
  chex.assert_trees_all_close(cas_logits[0], expected, atol=1e-5)
  # A zero mask kills the conv branch (BN at init maps 0 to 0): the raw input passes unchanged.
  params = jax.tree.map(lambda a: a, variables["params"])
  params["block3_1"]["cas"]["fc"]["kernel"] = jnp.zeros_like(fc["kernel"])
  _, inner = intermediates(params)
  block_input = inner["block3_0"]["__call__"][0][0]
  block_output = inner["block3_1"]["__call__"][0][0]
  chex.assert_trees_all_close(block_output, block_input)
  assert float(jnp.min(block_input)) < 0.0  # raw (not bn-ReLU'd) input, so the check is sharp


# ------------------------------------------------------------------------- create: errors


@pytest.mark.parametrize("name, options, message", [
    ("resnet101", {}, "unknown model 'resnet101'; valid: resnet18, resnet34, resnet50, "
                      "wrn34_10, wrn, vgg16, wide_resnet, preact_resnet18, preact_resnet34, "
                      "dm_wide_resnet, dm_preact_resnet"),
    ("resnet18", dict(cas_stages=(5,)), r"cas_stages \(5,\) invalid for resnet18; choose any "
                                        r"subset of \(1, 2, 3, 4\)"),
    ("resnet18", dict(cas_stages=(4, 4)), "invalid for resnet18"),
    ("wrn34_10", dict(cas_stages=(3,)), r"cas_stages \(3,\) invalid for wrn34_10; choose None"),
    ("vgg16", dict(cas_stages=(5,)), "invalid for vgg16; choose None"),
    ("wrn34_10", dict(depth=28), "unknown option.*depth.*use 'wrn'"),
    ("resnet18", dict(depth=18), "unknown option.*valid: width, cas_stages"),
    ("wrn", dict(depth=12), "depth 12 invalid for wrn; choose 6n \\+ 4"),
    ("vgg16", dict(width=0), "width=0 invalid"),
    ("resnet18", dict(dtype=jnp.int32), "dtype=.*floating"),
    ("resnet18", dict(cas_suppress="no"), "cas_suppress='no' invalid"),
    ("wide_resnet", dict(depth=30), "depth 30 invalid for wide_resnet; choose 6n \\+ 4"),
    ("wide_resnet", dict(normalization="imagenet"), "normalization='imagenet' invalid for "
                                                    "wide_resnet; choose 'cifar10', 'cifar100'"),
    ("preact_resnet18", dict(normalization=((0.5,) * 3, (0.5, 0.5, 0.0))),
     r"normalization=.* invalid for preact_resnet18; .* or \(\(3 means\), \(3 stds > 0\)\)"),
    ("preact_resnet18", dict(cas_stages=(5,)), "invalid for preact_resnet18; choose any subset"),
    ("preact_resnet18", dict(bn_before_fc="yes"), "bn_before_fc='yes' invalid"),
    ("preact_resnet18", dict(activation="swish"), "unknown option.*activation.*valid: width, "
                                                  "bn_before_fc, out_shortcut, normalization"),
    ("dm_wide_resnet", dict(width=0), "width=0 invalid"),
    ("dm_wide_resnet", dict(activation="gelu"), "activation='gelu' invalid for dm_wide_resnet; "
                                                "choose 'swish'"),
    ("dm_wide_resnet", dict(cas_stages=(3,)), "invalid for dm_wide_resnet; choose None"),
    ("dm_preact_resnet", dict(depth=50), "depth=50 invalid for dm_preact_resnet; choose 18 or 34"),
])
def test_create_rejects_bad_input_naming_what_is_valid(name, options, message):
  with pytest.raises(ValueError, match=message):
    models.create(name, **options)


def test_create_options_reach_the_network(small_resnet):
  model, variables = small_resnet
  x = _images()
  # Doubling the first CAS head's weights changes the main logits through its mask, unless
  # the network is built with cas_suppress=False, where only its CAS logits change.
  params = jax.tree.map(lambda a: a, variables["params"])
  params["layer4_0"]["cas"]["fc"]["kernel"] = 2 * params["layer4_0"]["cas"]["fc"]["kernel"]
  doubled = {**variables, "params": params}
  plain = models.create("resnet18", NUM_CLASSES, width=4, cas_suppress=False)
  (logits, cas_logits), (logits_2, cas_logits_2) = (
      plain.apply(v, x, train=False) for v in (variables, doubled))
  chex.assert_trees_all_close(logits, logits_2)
  assert not np.allclose(cas_logits[0], cas_logits_2[0])
  suppressed, suppressed_2 = (model.apply(v, x, train=False)[0] for v in (variables, doubled))
  assert not np.allclose(suppressed, suppressed_2)
  # Stages are a set: their order does not matter.
  assert models.create("resnet18", cas_stages=[4, 3]).cas_stages == (3, 4)


def test_wide_resnet_is_the_wrn_module_without_cas():
  assert (models.create("wide_resnet", depth=16, widen_factor=2, cas_stages=None)
          == models.create("wrn", depth=16, widen_factor=2))
  assert models.create("wide_resnet").cas_stages == ()
  assert (models.create("wide_resnet").depth, models.create("wide_resnet").widen_factor) == (28, 10)


def test_dm_networks_standardise_with_the_dataset_statistics():
  # RobustBench builds its CIFAR-100 DeepMind entries with CIFAR-100's mean and std.
  cifar10, cifar100 = models.dm_networks.NORMALIZATIONS["cifar10"], \
      models.dm_networks.NORMALIZATIONS["cifar100"]
  assert models.create("dm_wide_resnet").mean_std == cifar10
  assert models.create("dm_preact_resnet", num_classes=100).mean_std == cifar100
  assert models.create("dm_wide_resnet", 100, normalization="cifar10").mean_std == cifar10
  assert models.create("preact_resnet18").mean_std is None
  assert models.create("dm_wide_resnet").activation == "swish"


@pytest.mark.parametrize("name, options, classifier", [
    ("wide_resnet", dict(depth=10, widen_factor=1), "fc"),
    ("preact_resnet18", dict(width=4, bn_before_fc=True), "linear"),
    ("dm_wide_resnet", dict(depth=10, width=1), "fc"),
    ("dm_preact_resnet", dict(width=4), "linear"),
])
def test_robustbench_families_sow_the_classifier_input(name, options, classifier):
  model = models.create(name, NUM_CLASSES, **options)
  x = _images(2)
  variables = _init(model, x)
  (logits, _), state = model.apply(variables, x, train=False, mutable=["intermediates"])
  features = state["intermediates"]["features"][0]
  dense = variables["params"][classifier]
  chex.assert_trees_all_close(features @ dense["kernel"] + dense["bias"], logits, atol=1e-5)
