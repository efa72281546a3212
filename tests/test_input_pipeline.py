"""Tests for cas_jax.input_pipeline: readers, augmentation, shuffling, host split, eval padding."""
import os
import pickle

import chex
import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from cas_jax import input_pipeline


def make_config(source="synthetic", batch_size=8, eval_batch_size=4, seed=0, **data):
  data = {"source": source, "dataset": "cifar10", "synthetic_num_train": 40,
          "synthetic_num_test": 10, "num_classes": 10, **data}
  return ml_collections.ConfigDict({"data": data, "batch_size": batch_size,
                                    "eval_batch_size": eval_batch_size, "seed": seed})


def tiny_dataset(num_train=12, image_shape=(8, 8, 3), **kwargs):
  """A dataset whose training images are all different, so an image tells its index."""
  rng = np.random.default_rng(0)
  images = rng.integers(1, 256, size=(num_train,) + image_shape, dtype=np.uint8)
  options = dict(train_images=images, train_labels=np.arange(num_train, dtype=np.int32) % 3,
                 test_images=images[:5], test_labels=np.arange(5, dtype=np.int32),
                 num_classes=3, batch_size=4, eval_batch_size=2, seed=0)
  options.update(kwargs)
  return input_pipeline.Dataset(**options)


def write_pickle(path, entries):
  with open(path, "wb") as f:
    pickle.dump(entries, f, protocol=2)


def handmade_row():
  """One image as an official CIFAR row: red = row index, green = column index, blue = 7."""
  rows, cols = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
  return np.concatenate([rows.ravel(), cols.ravel(), np.full(1024, 7)]).astype(np.uint8)


def write_fake_cifar10(folder, batch_sizes=(2, 3, 1, 2, 3), test_size=4):
  """The official cifar-10-batches-py layout, with a hand-made first training image."""
  folder.mkdir()
  rng = np.random.default_rng(1)
  for i, n in enumerate(batch_sizes, start=1):
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    if i == 1:
      data[0] = handmade_row()
    write_pickle(folder / f"data_batch_{i}", {b"batch_label": b"x", b"data": data,
                                              b"labels": [(i + j) % 10 for j in range(n)]})
  write_pickle(folder / "test_batch", {b"batch_label": b"t", b"labels": list(range(test_size)),
                                       b"data": rng.integers(0, 256, (test_size, 3072), np.uint8)})
  write_pickle(folder / "batches.meta", {b"num_cases_per_batch": 10000, b"num_vis": 3072})
  return batch_sizes, test_size


# ----------------------------------------------------------------------------- readers


def test_cifar_dir_reads_official_layout_and_pixel_order(tmp_path):
  batch_sizes, test_size = write_fake_cifar10(tmp_path / "cifar-10-batches-py")
  dataset = input_pipeline.create_dataset(
      make_config("cifar_dir", batch_size=2, eval_batch_size=2,
                  cifar_dir=str(tmp_path / "cifar-10-batches-py")),
      process_index=0, process_count=1, local_device_count=1)
  assert (dataset.num_train, dataset.num_test) == (sum(batch_sizes), test_size)
  assert dataset.num_classes == 10
  rows, cols = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
  expected = np.stack([rows, cols, np.full((32, 32), 7)], axis=-1).astype(np.uint8)
  np.testing.assert_array_equal(dataset.train_images[0], expected)
  np.testing.assert_array_equal(dataset.train_labels[:3], [1, 2, 2])  # batch 1, then batch 2
  assert dataset.train_labels.dtype == np.int32
  # The folder above cifar-10-batches-py works too.
  train, _ = input_pipeline.load_cifar_dir(str(tmp_path))
  np.testing.assert_array_equal(train[0], dataset.train_images)


def test_cifar100_dir_uses_fine_labels(tmp_path):
  folder = tmp_path / "cifar-100-python"
  folder.mkdir()
  data = np.zeros((3, 3072), np.uint8)
  write_pickle(folder / "train", {b"data": data, b"fine_labels": [50, 60, 99],
                                  b"coarse_labels": [1, 2, 3]})
  write_pickle(folder / "test", {b"data": data[:2], b"fine_labels": [70, 80],
                                 b"coarse_labels": [4, 5]})
  (train_images, train_labels), (_, test_labels) = input_pipeline.load_cifar_dir(
      str(folder), "cifar100")
  chex.assert_shape(train_images, (3, 32, 32, 3))
  np.testing.assert_array_equal(train_labels, [50, 60, 99])
  np.testing.assert_array_equal(test_labels, [70, 80])


@pytest.mark.skipif(not os.environ.get("CAS_JAX_CIFAR_DIR"), reason="CAS_JAX_CIFAR_DIR not set")
def test_cifar_dir_reads_real_files():
  path = os.environ["CAS_JAX_CIFAR_DIR"]
  (train_images, train_labels), (test_images, test_labels) = input_pipeline.load_cifar_dir(path)
  with open(os.path.join(path, "data_batch_1"), "rb") as f:
    batch = pickle.load(f, encoding="bytes")
  with open(os.path.join(path, "test_batch"), "rb") as f:
    test_count = len(pickle.load(f, encoding="bytes")[b"labels"])
  first = len(batch[b"labels"])
  assert len(train_labels) == 5 * first and len(test_labels) == test_count  # N from the files
  chex.assert_shape(train_images, (5 * first, 32, 32, 3))
  chex.assert_shape(test_images, (test_count, 32, 32, 3))
  np.testing.assert_array_equal(train_images[0], batch[b"data"][0].reshape(3, 32, 32)
                                .transpose(1, 2, 0))
  np.testing.assert_array_equal(train_labels[:first], batch[b"labels"])
  assert set(np.unique(train_labels)) == set(range(10))


def test_missing_cifar_dir_gives_one_line_error(tmp_path):
  config = make_config("cifar_dir", cifar_dir=str(tmp_path / "nowhere"))
  with pytest.raises(input_pipeline.DatasetNotFoundError) as error:
    input_pipeline.create_dataset(config)
  message = str(error.value)
  assert isinstance(error.value, FileNotFoundError)
  assert "\n" not in message and "--config.data.cifar_dir" in message and "nowhere" in message


def test_tfds_through_mock_data():
  config = make_config("tfds", batch_size=4, num_train=9, eval_batch_size=3)
  with tfds.testing.mock_data(num_examples=12):
    dataset = input_pipeline.create_dataset(config, process_index=0, process_count=1,
                                            local_device_count=1)
    source = tfds.data_source("cifar10", split="test")
    expected = np.stack([source[i]["image"] for i in range(12)])
    expected_labels = [source[i]["label"] for i in range(12)]
  assert (dataset.num_train, dataset.num_test, dataset.steps_per_epoch) == (9, 12, 2)
  np.testing.assert_array_equal(dataset.test_images, expected)
  np.testing.assert_array_equal(dataset.test_labels, expected_labels)
  batch = next(dataset.eval_batches())
  assert batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32
  np.testing.assert_allclose(batch["image"], expected[:3] / 255.0, rtol=1e-6)


def test_tfds_not_prepared_gives_one_line_error(tmp_path):
  config = make_config("tfds", tfds_data_dir=str(tmp_path))
  with pytest.raises(input_pipeline.DatasetNotFoundError) as error:
    input_pipeline.create_dataset(config)
  message = str(error.value)
  assert "\n" not in message and "tfds build cifar10" in message and "cifar_dir" in message


def test_bad_source_is_a_value_error():
  with pytest.raises(ValueError, match="synthetic"):
    input_pipeline.create_dataset(make_config("imagenet"))


def test_synthetic_data_is_deterministic_and_learnable():
  first = input_pipeline.synthetic_data(3, 200, 100, num_classes=4, image_shape=(16, 16, 3))
  again = input_pipeline.synthetic_data(3, 200, 100, num_classes=4, image_shape=(16, 16, 3))
  other = input_pipeline.synthetic_data(4, 200, 100, num_classes=4, image_shape=(16, 16, 3))
  chex.assert_trees_all_equal(first, again)
  assert not np.array_equal(first[0][0], other[0][0])
  (train_images, train_labels), (test_images, test_labels) = first
  chex.assert_shape(train_images, (200, 16, 16, 3))
  # A nearest-class-mean classifier fitted on train separates the test images.
  means = np.stack([train_images[train_labels == c].mean(0) for c in range(4)])
  distances = ((test_images[:, None].astype(float) - means[None]) ** 2).sum(axis=(2, 3, 4))
  assert (distances.argmin(1) == test_labels).mean() > 0.95


# ----------------------------------------------------------------------------- augmentation


def test_crop_is_window_of_zero_padded_image_and_flip_mirrors():
  images = np.random.default_rng(0).integers(1, 256, size=(6, 8, 8, 3), dtype=np.uint8)
  offsets = np.array([[0, 0], [8, 8], [4, 4], [1, 7], [3, 0], [8, 2]])
  flips = np.array([False, False, False, True, True, False])
  out = input_pipeline.pad_crop_flip(images, offsets, flips)
  for image, (row, col), flip, result in zip(images, offsets, flips, out):
    padded = np.zeros((16, 16, 3), np.uint8)
    padded[4:12, 4:12] = image
    window = padded[row:row + 8, col:col + 8]
    np.testing.assert_array_equal(result, window[:, ::-1] if flip else window)
  np.testing.assert_array_equal(out[2], images[2])  # centred and unflipped: the image itself
  assert (out[0, :4] == 0).all() and (out[0, :, :4] == 0).all()  # top-left: zero padding


def candidate_views(image, padding=4):
  """Every crop and flip of `image` the augmentation can produce."""
  size = image.shape[0]
  padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
  crops = [padded[r:r + size, c:c + size] for r in range(2 * padding + 1)
           for c in range(2 * padding + 1)]
  return np.stack(crops + [crop[:, ::-1] for crop in crops])


def test_train_batches_are_augmented_views_of_a_shuffled_epoch():
  dataset = tiny_dataset()
  views = [candidate_views(image) for image in dataset.train_images]
  permutation, _, _ = dataset.epoch_draws(0)
  batches = list(dataset.train_batches(0))
  assert len(batches) == dataset.steps_per_epoch == 3
  images = np.concatenate([b["image"] for b in batches])
  for image, source in zip(images, permutation):
    uint8_image = np.round(image * 255).astype(np.uint8)
    assert (views[source] == uint8_image).all(axis=(1, 2, 3)).any()
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]),
                                dataset.train_labels[permutation])


def test_epoch_is_a_permutation_subset_and_drops_last_batch():
  dataset = tiny_dataset(num_train=14, augment=False)
  images = np.concatenate([b["image"] for b in dataset.train_batches(5)])
  chex.assert_shape(images, (12, 8, 8, 3))  # 14 // 4 = 3 full batches
  flat_data = dataset.train_images.reshape(14, -1)
  flat = np.round(images * 255).astype(np.uint8).reshape(12, -1)
  sources = [int(np.flatnonzero((flat_data == row).all(1))[0]) for row in flat]
  assert len(set(sources)) == 12  # every image at most once


def test_batches_reproducible_per_epoch_and_reshuffled_across_epochs():
  first, again = tiny_dataset(), tiny_dataset()
  for a, b in zip(first.train_batches(1), again.train_batches(1)):
    chex.assert_trees_all_equal(a, b)
  epoch_1 = np.concatenate([b["image"] for b in first.train_batches(1)])
  epoch_2 = np.concatenate([b["image"] for b in first.train_batches(2)])
  assert not np.array_equal(epoch_1, epoch_2)
  assert not np.array_equal(first.epoch_draws(1)[0], first.epoch_draws(2)[0])
  other_seed = np.concatenate([b["image"] for b in tiny_dataset(seed=1).train_batches(1)])
  assert not np.array_equal(epoch_1, other_seed)


# ----------------------------------------------------------------------------- evaluation


@pytest.mark.parametrize("num_images", [None, 6])
def test_eval_covers_each_test_image_once_with_static_shapes(num_images):
  dataset = input_pipeline.create_dataset(make_config(eval_batch_size=4), process_count=1,
                                          process_index=0, local_device_count=1)
  expected = dataset.num_test if num_images is None else num_images  # 10 is not a multiple of 4
  batches = list(dataset.eval_batches(num_images=num_images))
  assert len(batches) == -(-expected // 4)
  for batch in batches:
    chex.assert_shape([batch["image"], batch["label"], batch["mask"], batch["index"]],
                      [(4, 32, 32, 3), (4,), (4,), (4,)])
    assert batch["index"].dtype == np.int32 and batch["mask"].dtype == bool
  mask = np.concatenate([b["mask"] for b in batches])
  index = np.concatenate([b["index"] for b in batches])[mask]
  np.testing.assert_array_equal(index, np.arange(expected))
  images = np.concatenate([b["image"] for b in batches])[mask]
  labels = np.concatenate([b["label"] for b in batches])[mask]
  np.testing.assert_allclose(images, dataset.test_images[:expected] / 255.0, rtol=1e-6)
  np.testing.assert_array_equal(labels, dataset.test_labels[:expected])


# ----------------------------------------------------------------------------- hosts, devices


def test_two_hosts_slices_concatenate_to_the_single_host_batch():
  config = make_config(batch_size=8, eval_batch_size=4)
  single = input_pipeline.create_dataset(config, process_index=0, process_count=1,
                                         local_device_count=1)
  hosts = [input_pipeline.create_dataset(config, process_index=i, process_count=2,
                                         local_device_count=2) for i in range(2)]
  for name, iterate in [("train", lambda d: d.train_batches(3)),
                        ("eval", lambda d: d.eval_batches())]:
    host_batches = [list(iterate(h)) for h in hosts]
    global_batches = list(iterate(single))
    assert len(host_batches[0]) == len(host_batches[1]) == len(global_batches), name
    for whole, part_0, part_1 in zip(global_batches, *host_batches):
      chex.assert_trees_all_equal(
          whole, jax.tree.map(lambda a, b: np.concatenate([a, b]), part_0, part_1))


def test_host_batch_not_divisible_by_local_devices_is_a_value_error():
  with pytest.raises(ValueError, match="local devices"):
    input_pipeline.create_dataset(make_config(batch_size=6), process_index=0, process_count=2,
                                  local_device_count=2)
  with pytest.raises(ValueError, match="batch_size"):
    input_pipeline.create_dataset(make_config(batch_size=64))  # more than the 40 images


def test_to_global_array_shards_over_data_axis():
  dataset = input_pipeline.create_dataset(make_config(batch_size=8))
  host_batch = next(dataset.train_batches(0))
  mesh = input_pipeline.data_mesh()
  batch = input_pipeline.to_global_array(host_batch, mesh)
  assert batch["image"].sharding.spec == jax.sharding.PartitionSpec("data")
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, batch), host_batch)
