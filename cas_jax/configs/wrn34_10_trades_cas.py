"""WRN-34-10 on CIFAR-10, TRADES + CAS.

Run: python main.py --config=configs/wrn34_10_trades_cas.py --workdir=runs/wrn34_10_trades_cas
"""
from cas_jax.configs import default


def get_config():
  """WRN-34-10 on CIFAR-10, TRADES + CAS."""
  return default.setting(objective="trades", cas=True, model="wrn34_10", dataset="cifar10")
