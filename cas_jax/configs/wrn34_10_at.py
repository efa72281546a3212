"""WRN-34-10 on CIFAR-10, PGD-AT.

Run: python main.py --config=configs/wrn34_10_at.py --workdir=runs/wrn34_10_at
"""
from cas_jax.configs import default


def get_config():
  """WRN-34-10 on CIFAR-10, PGD-AT."""
  return default.setting(objective="at", cas=False, model="wrn34_10", dataset="cifar10")
