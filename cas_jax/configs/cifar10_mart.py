"""ResNet-18 on CIFAR-10, MART.

Run: python main.py --config=configs/cifar10_mart.py --workdir=runs/cifar10_mart
"""
from cas_jax.configs import default


def get_config():
  """ResNet-18 on CIFAR-10, MART."""
  return default.setting(objective="mart", cas=False, model="resnet18", dataset="cifar10")
