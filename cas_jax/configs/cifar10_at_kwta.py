"""ResNet-18 on CIFAR-10, PGD-AT with the Table 1 baseline kWTA (Xiao et al. 2020):
every ReLU replaced by k-winners-take-all, the top 20% of each layer kept.

Run: python main.py --config=configs/cifar10_at_kwta.py --workdir=runs/cifar10_at_kwta
Evaluate: python main.py --config=configs/cifar10_at_kwta.py --workdir=runs/cifar10_at_kwta --mode=eval
"""
from cas_jax.configs import default


def get_config():
  """ResNet-18 on CIFAR-10, PGD-AT, no CAS, baseline kwta (paper Table 1)."""
  config = default.setting(objective="at", cas=False, model="resnet18", dataset="cifar10")
  config.baseline = "kwta"
  return config
