"""WRN-34-10 on CIFAR-10, TRADES.

Run: python main.py --config=configs/wrn34_10_trades.py --workdir=runs/wrn34_10_trades
"""
from cas_jax.configs import default


def get_config():
  """WRN-34-10 on CIFAR-10, TRADES."""
  return default.setting(objective="trades", cas=False, model="wrn34_10", dataset="cifar10")
