"""ResNet-18 on SVHN, PGD-AT (lr 0.01, step 1/255).

Run: python main.py --config=configs/svhn_at.py --workdir=runs/svhn_at
"""
from cas_jax.configs import default


def get_config():
  """ResNet-18 on SVHN, PGD-AT (lr 0.01, step 1/255)."""
  return default.setting(objective="at", cas=False, model="resnet18", dataset="svhn_cropped")
