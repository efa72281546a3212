"""ResNet-18 on CIFAR-10, Natural training + CAS (stage 4, S = 2, beta = 2).

Run: python main.py --config=configs/cifar10_natural_cas.py --workdir=runs/cifar10_natural_cas
"""
from cas_jax.configs import default


def get_config():
  """ResNet-18 on CIFAR-10, Natural training + CAS (stage 4, S = 2, beta = 2)."""
  return default.setting(objective="natural", cas=True, model="resnet18", dataset="cifar10")
