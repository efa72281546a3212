"""VGG16-BN on CIFAR-10, PGD-AT + CAS.

Run: python main.py --config=configs/vgg16_at_cas.py --workdir=runs/vgg16_at_cas
"""
from cas_jax.configs import default


def get_config():
  """VGG16-BN on CIFAR-10, PGD-AT + CAS."""
  return default.setting(objective="at", cas=True, model="vgg16", dataset="cifar10")
