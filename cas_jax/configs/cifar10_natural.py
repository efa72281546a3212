"""ResNet-18 on CIFAR-10, Natural training.

Run: python main.py --config=configs/cifar10_natural.py --workdir=runs/cifar10_natural
"""
from cas_jax.configs import default


def get_config():
  """ResNet-18 on CIFAR-10, Natural training."""
  return default.setting(objective="natural", cas=False, model="resnet18", dataset="cifar10")
