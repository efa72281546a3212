"""VGG16-BN on CIFAR-10, TRADES + CAS.

Run: python main.py --config=configs/vgg16_trades_cas.py --workdir=runs/vgg16_trades_cas
"""
from cas_jax.configs import default


def get_config():
  """VGG16-BN on CIFAR-10, TRADES + CAS."""
  return default.setting(objective="trades", cas=True, model="vgg16", dataset="cifar10")
