"""WRN-34-10 on CIFAR-10, MART.

Run: python main.py --config=configs/wrn34_10_mart.py --workdir=runs/wrn34_10_mart
"""
from cas_jax.configs import default


def get_config():
  """WRN-34-10 on CIFAR-10, MART."""
  return default.setting(objective="mart", cas=False, model="wrn34_10", dataset="cifar10")
