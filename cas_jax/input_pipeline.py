"""Input pipeline: config.data -> host numpy batches -> global jax.Array.

Images live in host memory as uint8 NHWC and become float32 in [0, 1] per batch; labels are
int32. Sources: "tfds" (`tfds.data_source`, no TensorFlow needed), "cifar_dir" (the official
CIFAR python-pickle files) and "synthetic" (class-dependent patterns, for smoke tests).

    dataset = input_pipeline.create_dataset(config)
    mesh = input_pipeline.data_mesh()
    for epoch in range(num_epochs):
      for host_batch in dataset.train_batches(epoch):
        batch = input_pipeline.to_global_array(host_batch, mesh)   # sharded over "data"
    for host_batch in dataset.eval_batches(num_images=1000):
      ...  # host_batch['mask'] marks real images, host_batch['index'] their test indices

Training batches are reshuffled and augmented (pad 4 + random crop, horizontal flip) from
(seed, epoch) alone; each process takes its contiguous slice of every global batch, so the
global batch is the same whatever the number of hosts.
"""
import dataclasses
import os
import pickle
from typing import Dict, Iterator, Optional, Sequence, Tuple

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cas_jax import errors

Arrays = Tuple[np.ndarray, np.ndarray]  # (images uint8 (N, H, W, C), labels int32 (N,))
Batch = Dict[str, np.ndarray]

SOURCES = ("tfds", "cifar_dir", "synthetic")
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "svhn_cropped": 10}
CROP_PADDING = 4
TFDS_DOWNLOAD_RETRIES = 2
_CIFAR_URLS = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
}
_CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
_CIFAR_FILES = {
    "cifar10": ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels"),
    "cifar100": (["train"], ["test"], "fine_labels"),
}


class DatasetNotFoundError(FileNotFoundError):
  """The requested data is not on this machine; the message says how to get it."""


# ----------------------------------------------------------------------------- loaders


def _cifar_missing(path: str, dataset: str, what: str) -> DatasetNotFoundError:
  folder = _CIFAR_FOLDERS[dataset]
  return DatasetNotFoundError(
      f"{what} (config.data.cifar_dir={path!r}). Download and extract {_CIFAR_URLS[dataset]}, "
      f"then pass --config.data.cifar_dir=/path/to/{folder}.")


def _read_cifar_pickle(path: str, label_key: str) -> Arrays:
  with open(path, "rb") as f:
    # The official files are Python 2 pickles (byte-string keys); like any pickle, only
    # load files from a source you trust.
    entries = pickle.load(f, encoding="bytes")
  entries = {k.decode() if isinstance(k, bytes) else k: v for k, v in entries.items()}
  data = np.asarray(entries["data"], dtype=np.uint8)
  # Each row is 1024 red, then 1024 green, then 1024 blue values, row-major 32x32. The image
  # count comes from the array itself: batches.meta may say 10000 for a subset.
  images = data.reshape(data.shape[0], 3, 32, 32).transpose(0, 2, 3, 1)
  labels = np.asarray(entries[label_key], dtype=np.int32)
  return images, labels


def load_cifar_dir(path: str, dataset: str = "cifar10",
                   splits: Sequence[str] = ("train", "test")) -> Tuple[Arrays, ...]:
  """The arrays of each split in `splits` (train, test) from the official CIFAR-10/100 folder."""
  if dataset not in _CIFAR_FILES:
    raise errors.UserError(f"source='cifar_dir' reads cifar10 or cifar100, not dataset={dataset!r}")
  if not path:
    raise _cifar_missing(path, dataset, "source='cifar_dir' needs a folder")
  if not os.path.isdir(path):
    raise _cifar_missing(path, dataset, f"CIFAR folder {path} does not exist")
  if os.path.isdir(os.path.join(path, _CIFAR_FOLDERS[dataset])):  # the folder above it
    path = os.path.join(path, _CIFAR_FOLDERS[dataset])
  train_files, test_files, label_key = _CIFAR_FILES[dataset]
  arrays = []
  for split in splits:
    parts = []
    for name in {"train": train_files, "test": test_files}[split]:
      file_path = os.path.join(path, name)
      if not os.path.isfile(file_path):
        raise _cifar_missing(path, dataset, f"{file_path} is missing")
      try:
        parts.append(_read_cifar_pickle(file_path, label_key))
      except (EOFError, pickle.UnpicklingError, ValueError, KeyError, TypeError) as error:
        raise errors.UserError(
                   f"{file_path} is damaged or not a CIFAR python pickle ({type(error).__name__}); "
                   f"download and extract {_CIFAR_URLS[dataset]} again") from None
    arrays.append((np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])))
  return tuple(arrays)


def _read_tfds_split(source, limit: int) -> Arrays:
  count = len(source) if limit <= 0 else min(limit, len(source))
  examples = [source[i] for i in range(count)]  # decodes one record at a time
  images = np.stack([np.asarray(e["image"], dtype=np.uint8) for e in examples])
  labels = np.asarray([e["label"] for e in examples], dtype=np.int32)
  return images, labels


def _tfds_sources(name: str, splits: Sequence[str], data_dir: Optional[str], download: bool):
  """tfds.data_source of each split, or one DatasetNotFoundError line saying how to prepare it."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.core.download import downloader  # pylint: disable=g-import-not-at-top

  # TFDS retries a failed download 10 times with exponential backoff (~200 s without a
  # network); a prepared dataset needs no download and a real outage is not fixed by waiting.
  max_retries = downloader.MAX_RETRIES
  downloader.MAX_RETRIES = min(max_retries, TFDS_DOWNLOAD_RETRIES)
  try:
    return tfds.data_source(name, split=tuple(splits), data_dir=data_dir, download=download)
  except Exception as e:  # tfds raises many types here; all mean "not prepared / not usable"
    where = data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
    hint = (f" or use local files: --config.data.source=cifar_dir "
            f"--config.data.cifar_dir=/path/to/{_CIFAR_FOLDERS[name]}" if name in _CIFAR_FOLDERS
            else "")
    raise DatasetNotFoundError(
        f"TFDS dataset {name!r} is not prepared as array_record in {where} "
        f"({type(e).__name__}). Prepare it with `tfds build {name} --file_format=array_record` "
        f"on a machine with network and point "
        f"--config.data.tfds_data_dir at it{hint}.") from None
  finally:
    downloader.MAX_RETRIES = max_retries


def load_tfds(name: str, data_dir: Optional[str] = None, num_train: int = 0, num_test: int = 0,
              download: bool = False) -> Tuple[Arrays, Arrays]:
  """(train, test) arrays of a prepared TFDS dataset, read through `tfds.data_source`."""
  sources = _tfds_sources(name, ("train", "test"), data_dir, download)
  return _read_tfds_split(sources[0], num_train), _read_tfds_split(sources[1], num_test)


def load_test_split(dataset: str, num_images: int, cifar_dir: Optional[str] = None,
                    tfds_data_dir: Optional[str] = None) -> Arrays:
  """The first num_images test images (uint8 NHWC) and labels of a CIFAR folder, else TFDS."""
  if cifar_dir:
    (test,) = load_cifar_dir(cifar_dir, dataset, splits=("test",))
    size = len(test[1])
  else:
    (source,) = _tfds_sources(dataset, ("test",), tfds_data_dir, download=False)
    size = len(source)
  if num_images > size:
    where = cifar_dir or f"TFDS {dataset}"
    raise errors.UserError(f"{num_images} test images asked for, but the {dataset} test split in "
                           f"{where} holds {size}; ask for at most {size}")
  return _cap(test, num_images) if cifar_dir else _read_tfds_split(source, num_images)


def synthetic_data(seed: int, num_train: int, num_test: int, num_classes: int = 10,
                   image_shape: Sequence[int] = (32, 32, 3)) -> Tuple[Arrays, Arrays]:
  """Deterministic class-dependent images: a blocky per-class pattern plus uniform noise."""
  height, width, channels = image_shape
  template_rng, train_rng, test_rng = (
      np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
  # 4x4 blocks of colour survive a 4-pixel crop shift, so the classes stay learnable.
  coarse = template_rng.uniform(size=(num_classes, 4, 4, channels))
  templates = coarse.repeat(-(-height // 4), axis=1)[:, :height]
  templates = templates.repeat(-(-width // 4), axis=2)[:, :, :width]

  def draw(rng, n):
    labels = rng.integers(0, num_classes, size=n).astype(np.int32)
    noise = rng.uniform(size=(n, height, width, channels))
    images = 0.6 * templates[labels] + 0.4 * noise
    return np.round(images * 255).astype(np.uint8), labels

  return draw(train_rng, num_train), draw(test_rng, num_test)


# ----------------------------------------------------------------------------- augmentation


def pad_crop_flip(images: np.ndarray, offsets: np.ndarray, flips: np.ndarray,
                  padding: int = CROP_PADDING) -> np.ndarray:
  """Crop each zero-padded image at offsets[i] = (row, col), then mirror it where flips[i].

  Same as torchvision's RandomCrop(size, padding=4) then RandomHorizontalFlip, with the
  random draws passed in. offsets are in [0, 2 * padding].
  """
  n, height, width, _ = images.shape
  padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  rows = offsets[:, 0, None] + np.arange(height)  # (n, height)
  cols = offsets[:, 1, None] + np.arange(width)  # (n, width)
  cols = np.where(flips[:, None], cols[:, ::-1], cols)
  return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def _to_float(images: np.ndarray) -> np.ndarray:
  return images.astype(np.float32) / np.float32(255)


# ----------------------------------------------------------------------------- dataset


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """Host-memory train/test arrays and the batch iterators of one process."""
  train_images: np.ndarray  # uint8 (N, H, W, C)
  train_labels: np.ndarray  # int32 (N,)
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int
  batch_size: int  # global training batch
  eval_batch_size: int  # global evaluation batch
  seed: int = 0
  augment: bool = True
  process_index: int = 0
  process_count: int = 1
  local_device_count: int = 1

  def __post_init__(self):
    if self.steps_per_epoch == 0:
      raise errors.UserError(f"batch_size={self.batch_size} is larger than the {self.num_train} "
                              "training images; lower --config.batch_size.")
    self._host_slice(self.batch_size, "batch_size")
    self._host_slice(self.eval_batch_size, "eval_batch_size")

  @property
  def num_train(self) -> int:
    return len(self.train_labels)

  @property
  def num_test(self) -> int:
    return len(self.test_labels)

  @property
  def steps_per_epoch(self) -> int:
    return self.num_train // self.batch_size  # the last incomplete batch is dropped

  def _host_slice(self, global_size: int, name: str) -> slice:
    """This process's contiguous part of a global batch of `global_size` examples."""
    if global_size <= 0 or global_size % self.process_count:
      raise errors.UserError(f"{name}={global_size} must be a positive multiple of the "
                              f"{self.process_count} processes.")
    host_size = global_size // self.process_count
    if host_size % self.local_device_count:
      raise errors.UserError(f"{name}={global_size} gives {host_size} examples per process, not "
                              f"divisible by its {self.local_device_count} local devices; use a "
                              f"multiple of {self.process_count * self.local_device_count}.")
    return slice(self.process_index * host_size, (self.process_index + 1) * host_size)

  def epoch_draws(self, epoch: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(permutation, crop offsets (N, 2), flips (N,)) of an epoch, from (seed, epoch) only."""
    rng = np.random.default_rng([self.seed, epoch])
    permutation = rng.permutation(self.num_train)
    offsets = rng.integers(0, 2 * CROP_PADDING + 1, size=(self.num_train, 2))
    flips = rng.random(self.num_train) < 0.5
    return permutation, offsets, flips

  def train_batches(self, epoch: int) -> Iterator[Batch]:
    """This process's part of each shuffled, augmented global batch of `epoch`."""
    permutation, offsets, flips = self.epoch_draws(epoch)
    host = self._host_slice(self.batch_size, "batch_size")
    for step in range(self.steps_per_epoch):
      positions = np.arange(step * self.batch_size, (step + 1) * self.batch_size)[host]
      indices = permutation[positions]
      images = self.train_images[indices]
      if self.augment:
        images = pad_crop_flip(images, offsets[positions], flips[positions])
      yield {"image": _to_float(images), "label": self.train_labels[indices]}

  def eval_batches(self, batch_size: Optional[int] = None,
                   num_images: Optional[int] = None) -> Iterator[Batch]:
    """The first num_images test images (default all) once each, in order, in full batches.

    The last global batch is padded with zero images; `mask` is True for real images and
    `index` holds each slot's position in the test set (>= num_images on padding).
    """
    batch_size = batch_size or self.eval_batch_size
    num_images = self.num_test if not num_images else min(num_images, self.num_test)
    host = self._host_slice(batch_size, "eval batch_size")
    for start in range(0, num_images, batch_size):
      index = np.arange(start, start + batch_size, dtype=np.int32)[host]
      mask = index < num_images
      real = index[mask]
      images = np.zeros((len(index),) + self.test_images.shape[1:], np.uint8)
      images[mask] = self.test_images[real]
      labels = np.zeros(len(index), np.int32)
      labels[mask] = self.test_labels[real]
      yield {"image": _to_float(images), "label": labels, "mask": mask, "index": index}


def _image_shape(image_size) -> Tuple[int, int, int]:
  if image_size is None:
    return (32, 32, 3)
  if isinstance(image_size, int):
    return (image_size, image_size, 3)
  shape = tuple(int(s) for s in image_size)
  if len(shape) == 2:
    shape += (3,)
  if len(shape) != 3:
    raise errors.UserError(
        f"data.image_size={image_size!r}: give an int or (height, width, channels)")
  return shape


def _cap(arrays: Arrays, limit: int) -> Arrays:
  return arrays if not limit else (arrays[0][:limit], arrays[1][:limit])


def create_dataset(config, *, process_index: Optional[int] = None,
                   process_count: Optional[int] = None,
                   local_device_count: Optional[int] = None) -> Dataset:
  """The Dataset that config.data / batch_size / eval_batch_size / seed describe."""
  data = config.data
  get = lambda name, default: default if data.get(name, None) is None else data.get(name)
  source, name = get("source", "tfds"), get("dataset", "cifar10")
  if source not in SOURCES:
    raise errors.UserError(f"config.data.source={source!r}; valid: {', '.join(SOURCES)}")
  num_train, num_test = get("num_train", 0), get("num_test", 0)
  if source == "synthetic":
    num_classes = get("num_classes", 10)
    train, test = synthetic_data(config.seed, get("synthetic_num_train", 512),
                                 get("synthetic_num_test", 256), num_classes,
                                 _image_shape(data.get("image_size", None)))
  else:
    if name not in NUM_CLASSES:
      raise errors.UserError(f"config.data.dataset={name!r}; valid: {', '.join(NUM_CLASSES)}")
    num_classes = NUM_CLASSES[name]
    if source == "cifar_dir":
      train, test = load_cifar_dir(get("cifar_dir", ""), name)
    else:
      train, test = load_tfds(name, get("tfds_data_dir", None) or None, num_train, num_test,
                              download=get("tfds_download", False))
  train, test = _cap(train, num_train), _cap(test, num_test)
  return Dataset(
      train_images=train[0], train_labels=train[1], test_images=test[0], test_labels=test[1],
      num_classes=num_classes, batch_size=config.batch_size,
      eval_batch_size=config.get("eval_batch_size", None) or config.batch_size,
      seed=config.seed, augment=get("augment", True),
      process_index=jax.process_index() if process_index is None else process_index,
      process_count=jax.process_count() if process_count is None else process_count,
      local_device_count=(jax.local_device_count() if local_device_count is None
                          else local_device_count))


# ----------------------------------------------------------------------------- devices


def data_mesh() -> jax.sharding.Mesh:
  """A 1-D mesh over every device, with the batch axis named "data"."""
  # Auto axes: XLA propagates the batch sharding through the model (no sharding-in-types).
  return jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))


def to_global_array(host_batch: Batch, mesh: jax.sharding.Mesh):
  """Each host's batch -> global jax.Arrays sharded along their first axis over "data"."""
  sharding = NamedSharding(mesh, P("data"))
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), host_batch)
