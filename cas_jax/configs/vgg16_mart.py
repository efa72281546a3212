"""VGG16-BN on CIFAR-10, MART.

Run: python main.py --config=configs/vgg16_mart.py --workdir=runs/vgg16_mart
"""
from cas_jax.configs import default


def get_config():
  """VGG16-BN on CIFAR-10, MART."""
  return default.setting(objective="mart", cas=False, model="vgg16", dataset="cifar10")
