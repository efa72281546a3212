"""WRN-34-10 on CIFAR-10, PGD-AT + CAS.

Run: python main.py --config=configs/wrn34_10_at_cas.py --workdir=runs/wrn34_10_at_cas
"""
from cas_jax.configs import default


def get_config():
  """WRN-34-10 on CIFAR-10, PGD-AT + CAS."""
  return default.setting(objective="at", cas=True, model="wrn34_10", dataset="cifar10")
