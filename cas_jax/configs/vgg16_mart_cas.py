"""VGG16-BN on CIFAR-10, MART + CAS.

Run: python main.py --config=configs/vgg16_mart_cas.py --workdir=runs/vgg16_mart_cas
"""
from cas_jax.configs import default


def get_config():
  """VGG16-BN on CIFAR-10, MART + CAS."""
  return default.setting(objective="mart", cas=True, model="vgg16", dataset="cifar10")
