"""VGG16-BN on CIFAR-10, TRADES.

Run: python main.py --config=configs/vgg16_trades.py --workdir=runs/vgg16_trades
"""
from cas_jax.configs import default


def get_config():
  """VGG16-BN on CIFAR-10, TRADES."""
  return default.setting(objective="trades", cas=False, model="vgg16", dataset="cifar10")
