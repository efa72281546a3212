"""ResNet-18 on CIFAR-10, TRADES.

Run: python main.py --config=configs/cifar10_trades.py --workdir=runs/cifar10_trades
"""
from cas_jax.configs import default


def get_config():
  """ResNet-18 on CIFAR-10, TRADES."""
  return default.setting(objective="trades", cas=False, model="resnet18", dataset="cifar10")
