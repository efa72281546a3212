"""ResNet-18 on CIFAR-10, PGD-AT + CAS (stage 4, S = 2, beta = 2).

Run: python main.py --config=configs/cifar10_at_cas.py --workdir=runs/cifar10_at_cas
"""
from cas_jax.configs import default


def get_config():
  """ResNet-18 on CIFAR-10, PGD-AT + CAS (stage 4, S = 2, beta = 2)."""
  return default.setting(objective="at", cas=True, model="resnet18", dataset="cifar10")
