"""WRN-34-10 on CIFAR-10, MART + CAS.

Run: python main.py --config=configs/wrn34_10_mart_cas.py --workdir=runs/wrn34_10_mart_cas
"""
from cas_jax.configs import default


def get_config():
  """WRN-34-10 on CIFAR-10, MART + CAS."""
  return default.setting(objective="mart", cas=True, model="wrn34_10", dataset="cifar10")
