"""ResNet-18 on CIFAR-10, MART + CAS (stage 4, S = 2, beta = 2).

Run: python main.py --config=configs/cifar10_mart_cas.py --workdir=runs/cifar10_mart_cas
"""
from cas_jax.configs import default


def get_config():
  """ResNet-18 on CIFAR-10, MART + CAS (stage 4, S = 2, beta = 2)."""
  return default.setting(objective="mart", cas=True, model="resnet18", dataset="cifar10")
