"""ResNet-18 on CIFAR-10, PGD-AT with the Table 1 baseline PCL (Mustafa et al. 2019):
prototype conformity loss on two feature branches after 10 epochs of CE warm-up.

Run: python main.py --config=configs/cifar10_at_pcl.py --workdir=runs/cifar10_at_pcl
Evaluate: python main.py --config=configs/cifar10_at_pcl.py --workdir=runs/cifar10_at_pcl --mode=eval
"""
from cas_jax.configs import default


def get_config():
  """ResNet-18 on CIFAR-10, PGD-AT, no CAS, baseline pcl (paper Table 1)."""
  config = default.setting(objective="at", cas=False, model="resnet18", dataset="cifar10")
  config.baseline = "pcl"
  return config
