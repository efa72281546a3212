"""ResNet-18 on CIFAR-10, PGD-AT.

Run: python main.py --config=configs/cifar10_at.py --workdir=runs/cifar10_at
"""
from cas_jax.configs import default


def get_config():
  """ResNet-18 on CIFAR-10, PGD-AT."""
  return default.setting(objective="at", cas=False, model="resnet18", dataset="cifar10")
