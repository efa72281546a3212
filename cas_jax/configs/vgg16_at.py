"""VGG16-BN on CIFAR-10, PGD-AT.

Run: python main.py --config=configs/vgg16_at.py --workdir=runs/vgg16_at
"""
from cas_jax.configs import default


def get_config():
  """VGG16-BN on CIFAR-10, PGD-AT."""
  return default.setting(objective="at", cas=False, model="vgg16", dataset="cifar10")
