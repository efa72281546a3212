"""ResNet-18 on CIFAR-10, PGD-AT under L2: PGD-L2 adversaries, eps 0.5, step 0.125, 10 steps.

Run: python main.py --config=configs/cifar10_at_l2.py --workdir=runs/cifar10_at_l2
"""
from cas_jax.configs import default


def get_config():
  """ResNet-18 on CIFAR-10, PGD-AT under L2 (eps 0.5); reports at L2 eps 0.5."""
  return default.under_l2(default.setting(objective="at", cas=False, model="resnet18",
                                          dataset="cifar10"))
