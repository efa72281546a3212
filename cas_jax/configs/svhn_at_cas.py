"""ResNet-18 on SVHN, PGD-AT + CAS (lr 0.01, step 1/255).

Run: python main.py --config=configs/svhn_at_cas.py --workdir=runs/svhn_at_cas
"""
from cas_jax.configs import default


def get_config():
  """ResNet-18 on SVHN, PGD-AT + CAS (lr 0.01, step 1/255)."""
  return default.setting(objective="at", cas=True, model="resnet18", dataset="svhn_cropped")
